"""Spark session factory: reuse the cluster's session, or build a tuned local one."""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

from ebbtide.config import SparkConf

log = logging.getLogger(__name__)


def get_spark(conf: SparkConf) -> SparkSession:
    """The active session on a cluster or Databricks (never reconfigured); locally a new tuned one."""
    active = SparkSession.getActiveSession()
    if active is not None:
        _apply_sql_confs(active, conf, local=active.sparkContext.master.startswith("local"))
        return active

    master = conf.master or os.environ.get("SPARK_MASTER", "")
    local = not master or master.startswith("local")
    builder = SparkSession.builder.appName(conf.app_name)
    if master:
        builder = builder.master(master)
    elif local:
        builder = builder.master("local[*]")
    if local:
        under_test = "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("CI") == "true"
        # Python workers must run this interpreter (the virtualenv with ebbtide), not whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (
            builder.config("spark.driver.memory", conf.driver_memory)
            .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
            .config("spark.ui.enabled", str(conf.ui_enabled and not under_test).lower())
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
            .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
            # Spark's parquet writer must not drop _SUCCESS files into Delta table folders.
            .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
            .config("spark.hadoop.parquet.summary.metadata.level", "NONE")
        )
    for key, value in conf.extra.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(conf.log_level)
    _apply_sql_confs(spark, conf, local=local)
    return spark


def _apply_sql_confs(spark: SparkSession, conf: SparkConf, local: bool) -> None:
    # Event time is UTC everywhere: dates, partition values and epoch conversions depend on it.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    # INT96 (Spark's default) carries no Parquet statistics and is legacy; Delta writers use micros.
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    if conf.shuffle_partitions:
        spark.conf.set("spark.sql.shuffle.partitions", str(conf.shuffle_partitions))
    elif local:
        spark.conf.set("spark.sql.shuffle.partitions", str(2 * spark.sparkContext.defaultParallelism))


def delta_spark_available(spark: SparkSession) -> bool:
    """True when delta-spark's JVM classes are on the classpath (a cluster started with the Delta package)."""
    from py4j.java_gateway import JavaClass

    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    try:
        # py4j resolves a name to JavaClass only when the class loads; otherwise it is a JavaPackage.
        return isinstance(jvm.io.delta.tables.DeltaTable, JavaClass)
    except Exception:
        return False
