"""One local SparkSession for the whole test session; every table lives under a per-test tmp folder."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from ebbtide.config import load_config
from ebbtide.spark import get_spark


@pytest.fixture(scope="session")
def spark():
    cfg = load_config("local", {"spark.master": "local[2]", "spark.ui_enabled": False,
                                "spark.log_level": "ERROR", "spark.shuffle_partitions": 4,
                                "spark.driver_memory": "2g"})
    session = get_spark(cfg.spark)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    yield session
    session.stop()


@pytest.fixture
def make_config(tmp_path):
    """Config pointing every path into tmp_path; extra overrides as a dict of dotted keys."""

    def build(**overrides):
        base = {"storage.root": str(tmp_path / "tables"), "storage.engine": "rs",
                "generate.out": str(tmp_path / "raw"), "sessionize.input": str(tmp_path / "raw"),
                "storage.max_rows_per_file": 100_000}
        base.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_config("local", base)

    return build


# Figures of the reliability tests (fault injection, re-run/backfill orders, hostile input), printed at the end.
FIGURE_NAMES = ("faults injected", "faults survived", "orders tried", "re-runs tried", "corrected re-runs tried",
                "concurrent runs tried", "bad-input kinds tried", "rows lost", "rows duplicated")
FIGURES: Counter = Counter()


@pytest.fixture
def figures() -> Counter:
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name in FIGURE_NAMES:
            terminalreporter.write_line(f"{name:<24} {FIGURES[name]}")


def pytest_addoption(parser):
    parser.addoption("--reliability", action="store_true",
                     help="also run the long reliability suite (tests marked reliability; `make reliability`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: the long fault-injection / backfill suite (make reliability)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reliability"):
        return
    long = [item for item in items if "reliability" in item.keywords]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if "reliability" not in item.keywords]
