# Every target that runs code depends on .venv, so a fresh clone needs only `make demo` or `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONF    ?= local

.PHONY: setup test reliability demo bench bench-quality lint clean java-check package package-env smoke

setup: $(STAMP)

java-check:
	@$(PY) tools/check_java.py

# Install order matters, and pip cannot do it in one resolve:
#  1. torch==2.13.0 first, alone: pip takes the CPU wheel from the local find-links instead of the
#     multi-GB CUDA build, and later steps see it as satisfied.
#  2. the package with its `local` (embedded engine: pyspark 4.0, delta-spark, pyarrow 14, numpy<2), dev and
#     ann (faiss-cpu, for nightly.topk: ann) extras under constraints.txt.
#  3. petastorm --no-deps: it pins setuptools<70 while torch 2.13 needs >=77; petastorm never imports
#     setuptools, and its real runtime needs are listed in pyproject.toml, so skipping its resolve is safe.
$(STAMP): pyproject.toml constraints.txt | java-check
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[local,dev,ann]'
	$(BIN)/pip install -q -c constraints.txt --no-deps petastorm==0.13.1
	$(BIN)/python -c "import ebbtide, pyspark, deltalake, petastorm, torch, faiss; print('ebbtide env ok: torch', torch.__version__, 'pyspark', pyspark.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest --durations=25

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
	$(BIN)/python bench/bench_topk.py

# Model quality on real data (MovieLens 100k through the whole pipeline) and planted half-life recovery.
bench-quality: $(STAMP)
	$(BIN)/python bench/bench_quality.py

# Artifacts for clusters (README, "Deploying"):
#   dist/ebbtide-<v>-py3-none-any.whl  pip / cluster library / %pip install; conf/*.yaml inside (package data)
#   dist/ebbtide-<v>.zip               the same bytes under a .zip name for spark-submit --py-files (PySpark puts
#                                      only .zip/.egg/.jar on executors' path, never a .whl)
#   dist/jobs/*.py                     the thin spark-submit entry points
DIST    ?= dist
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
package: $(STAMP)
	rm -rf $(DIST) build/lib build/bdist.* && mkdir -p $(DIST)/jobs
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(DIST) .
	cp $(DIST)/ebbtide-$(VERSION)-py3-none-any.whl $(DIST)/ebbtide-$(VERSION).zip
	cp jobs/*.py $(DIST)/jobs/
	@ls -l $(DIST) $(DIST)/jobs

# A packed virtualenv for executors without cluster libraries (spark-submit --archives
# dist/ebbtide-env.tar.gz#environment, PYSPARK_PYTHON=./environment/bin/python): torch, the wheel and its
# dependencies under constraints.txt, petastorm. No pyspark: spark-submit puts the cluster's own PySpark on the
# workers' path. Large (torch); not part of `make test`.
package-env: package
	rm -rf build/env && $(PY) -m venv build/env
	build/env/bin/pip install -q --upgrade pip
	build/env/bin/pip install -q torch==2.13.0
	build/env/bin/pip install -q -c constraints.txt '$(DIST)/ebbtide-$(VERSION)-py3-none-any.whl[ann]'
	build/env/bin/pip install -q -c constraints.txt --no-deps petastorm==0.13.1
	$(BIN)/pip install -q venv-pack
	$(BIN)/venv-pack -p build/env -o $(DIST)/ebbtide-env.tar.gz --force
	@ls -lh $(DIST)/ebbtide-env.tar.gz

# spark-submit --master local[2] of every stage from the built artifacts, outside the repo (also in `make test`).
smoke: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_smoke_submit.py

lint: $(STAMP)
	$(BIN)/ruff check lib jobs tests bench tools

clean:
	rm -rf data out dist build spark-warehouse metastore_db derby.log
