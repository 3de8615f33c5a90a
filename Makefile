# Every target that runs code depends on .venv, so a fresh clone needs only `make demo` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONF    ?= local

.PHONY: setup test reliability demo bench lint clean java-check

setup: $(STAMP)

java-check:
	@$(PY) tools/check_java.py

# Install order matters, and pip cannot do it in one resolve:
#  1. torch==2.13.0 first, alone: pip takes the CPU wheel from the local find-links instead of the
#     multi-GB CUDA build, and later steps see it as satisfied.
#  2. the package with its dev extras under constraints.txt (pyarrow 14, numpy<2, pyspark 4.0 ...).
#  3. petastorm --no-deps: it pins setuptools<70 while torch 2.13 needs >=77; petastorm never imports
#     setuptools, and its real runtime needs are listed in pyproject.toml, so skipping its resolve is safe.
$(STAMP): pyproject.toml constraints.txt | java-check
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q -c constraints.txt --no-deps petastorm==0.13.1
	$(BIN)/python -c "import ebbtide, pyspark, deltalake, petastorm, torch; print('ebbtide env ok: torch', torch.__version__, 'pyspark', pyspark.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Fault injection (SIGKILL of sessionize, nightly and train at their commit boundaries), backfills in any order,
# re-runs, corrected inputs, concurrent runs and hostile input; prints its figures at the end. A fast slice of it
# runs in `make test`.
reliability: $(STAMP)
	$(BIN)/python -m pytest --reliability tests/test_reliability.py tests/test_reruns.py tests/test_hostile_input.py

demo: $(STAMP)
	$(BIN)/python -m ebbtide.demo --conf $(CONF)

bench: $(STAMP)
	$(BIN)/python bench/bench_sessionize.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_nightly.py

lint: $(STAMP)
	$(BIN)/ruff check lib jobs tests bench tools

clean:
	rm -rf data out spark-warehouse metastore_db derby.log
