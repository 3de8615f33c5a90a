"""One local SparkSession for the whole test session; every table lives under a per-test tmp folder."""

from __future__ import annotations

import logging

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
