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
