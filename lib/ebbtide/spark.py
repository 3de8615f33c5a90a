"""Spark session factory: reuse the platform's session, honour spark-submit, or build a tuned local one.

Three situations, one rule each:
* a session is already active (Databricks, a notebook, Spark Connect): reuse it untouched except for the SQL
  settings ebbtide depends on (UTC session time zone); never reach for ``spark.sparkContext``, which Spark
  Connect (Databricks standard/serverless access mode) rejects;
* under spark-submit (the JVM is already up): spark-submit's ``--master`` and ``--driver-memory`` stand; the
  config's ``spark.master`` may only be empty or agree (a disagreement is logged, spark-submit wins) and
  ``spark.driver_memory`` does not apply (the driver JVM already has its heap);
* a plain ``python``/``ebbtide`` process: ebbtide starts the JVM with the config's master (empty means
  ``$SPARK_MASTER`` or ``local[*]``), driver memory and local tuning.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pyspark.sql import SparkSession

from ebbtide.config import SparkConf

log = logging.getLogger(__name__)


def under_spark_submit() -> bool:
    """True inside a driver launched by spark-submit: PySpark then connects to the JVM it already started."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def is_connect(spark: SparkSession) -> bool:
    """A Spark Connect session (Databricks standard/serverless access mode, `spark.remote`)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def get_spark(conf: SparkConf) -> SparkSession:
    """The active session (never reconfigured), else a new one: spark-submit's settings, or a tuned local one."""
    active = SparkSession.getActiveSession()
    if active is not None:
        _apply_sql_confs(active, conf, local_cores=None)
        return active

    builder = SparkSession.builder.appName(conf.app_name)
    if under_spark_submit():
        # spark-submit always sets spark.master (its --master, or its own default): never override it.
        master = _submitted_master(conf)
    else:
        master = conf.master or os.environ.get("SPARK_MASTER", "") or "local[*]"
        builder = builder.master(master).config("spark.driver.memory", conf.driver_memory)
        if master.startswith("local"):
            # Python workers must run this interpreter (the virtualenv with ebbtide), not whatever python3 is on
            # PATH. Under spark-submit that choice is the user's (PYSPARK_PYTHON, spark.pyspark.python).
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = (builder.config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
                       .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC")
                       .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC"))
    local = master.startswith("local")
    if local:
        under_test = "PYTEST_CURRENT_TEST" in os.environ or os.environ.get("CI") == "true"
        builder = (
            builder.config("spark.ui.enabled", str(conf.ui_enabled and not under_test).lower())
            .config("spark.ui.showConsoleProgress", "false")
            # Spark's parquet writer must not drop _SUCCESS files into Delta table folders.
            .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
            .config("spark.hadoop.parquet.summary.metadata.level", "NONE")
        )
    for key, value in conf.extra.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(conf.log_level)   # a session we created: classic, never Connect
    log.info("spark master %s %s (driver memory %s)", spark.conf.get("spark.master"),
             "from spark-submit" if under_spark_submit() else "from the config",
             spark.conf.get("spark.driver.memory", "default"))
    _apply_sql_confs(spark, conf, local_cores=_local_cores(master) if local else None)
    return spark


def _submitted_master(conf: SparkConf) -> str:
    """spark-submit's master, read from the JVM it started (system properties become the SparkConf)."""
    from pyspark import SparkConf as JvmConf
    from pyspark import SparkContext

    SparkContext._ensure_initialized()   # connect to spark-submit's gateway so SparkConf loads its settings
    submitted = JvmConf().get("spark.master", "local[*]")
    if conf.master and conf.master != submitted:
        log.warning("spark.master %r from the config ignored: spark-submit set --master %s", conf.master, submitted)
    return submitted


def master_of(spark: SparkSession) -> str:
    """The session's master URL, without touching sparkContext (empty where Spark Connect hides it)."""
    try:
        return spark.conf.get("spark.master", "") or ""
    except Exception:  # Spark Connect may refuse to expose cluster-level settings
        return ""


def _local_cores(master: str) -> int:
    found = re.match(r"local\[(\d+)", master)
    return int(found.group(1)) if found else (os.cpu_count() or 1)


def _apply_sql_confs(spark: SparkSession, conf: SparkConf, local_cores: int | None) -> None:
    # Event time is UTC everywhere: dates, partition values and epoch conversions depend on it.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    if conf.shuffle_partitions:
        spark.conf.set("spark.sql.shuffle.partitions", str(conf.shuffle_partitions))
    elif local_cores:
        spark.conf.set("spark.sql.shuffle.partitions", str(2 * local_cores))
    try:
        # INT96 (Spark's default) carries no Parquet statistics and is legacy; Delta writers use micros. Only the
        # rs engine writes Parquet through Spark; serverless compute refuses most settings, so this one may fail.
        spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    except Exception as err:  # noqa: BLE001 - Spark Connect raises its own error types for refused settings
        log.warning("could not set spark.sql.parquet.outputTimestampType: %s", str(err).splitlines()[0])


def delta_spark_available(spark: SparkSession) -> bool:
    """True when delta-spark can run: its JVM classes are on the classpath of a classic session, or (Spark
    Connect, where the JVM is out of reach) the server is Databricks or delta-spark's Python API is present."""
    if is_connect(spark):
        try:
            import delta.tables  # noqa: F401
        except ImportError:
            return bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))
        return True
    from py4j.java_gateway import JavaClass

    jvm = spark.sparkContext._jvm  # type: ignore[attr-defined]
    try:
        # py4j resolves a name to JavaClass only when the class loads; otherwise it is a JavaPackage.
        return isinstance(jvm.io.delta.tables.DeltaTable, JavaClass)
    except Exception:
        return False


@dataclass
class SparkJobCount:
    """Spark jobs, and stages that ran tasks, triggered by a block of driver code (None: not countable here)."""

    jobs: int | None = None
    stages: int | None = None


@contextmanager
def count_spark_jobs(spark: SparkSession) -> Iterator[SparkJobCount]:
    """Count the jobs the block triggers: it runs under a fresh job tag (tags stack and leave a platform's job group
    alone), and Spark's own listener, through the status tracker, lists the jobs that carried it. With adaptive
    execution each shuffle stage is its own job, so this is what the cluster schedules. Spark Connect and locked-down
    shared clusters keep the tracker out of reach: the count stays None there and the block runs unchanged."""
    count = SparkJobCount()
    try:
        sc = None if is_connect(spark) else spark.sparkContext
        tag = f"ebbtide-{uuid.uuid4().hex[:12]}"
        if sc is not None:
            sc.addJobTag(tag)
    except Exception as err:   # e.g. py4j's allow-list on a shared cluster
        log.debug("Spark jobs not countable here: %s", err)
        sc = None
    try:
        yield count
    finally:
        if sc is not None:
            try:
                sc.removeJobTag(tag)
            except Exception as err:   # a dead JVM: the block's own error, if any, is the one to see
                log.debug("Spark job tag not removed: %s", err)
            else:
                count.jobs, count.stages = _jobs_and_stages(sc, tag)


# Spark pushes a semi/anti join into each branch of a union. ebbtide's reads are unions of per-partition scans (the
# partition values are literals from the Delta log), so every partition got its own shuffle of both sides, and under
# adaptive execution its own job: one later-day sessions MERGE ran 46 jobs over 16 user buckets. The rows are the
# same either way (optimizer rules preserve results; Spark keeps any rule it needs for correctness).
UNION_PUSHDOWN_RULES = ("org.apache.spark.sql.catalyst.optimizer.PushDownLeftSemiAntiJoin",)
_EXCLUDED_RULES = "spark.sql.optimizer.excludedRules"


@contextmanager
def optimizer_rules_excluded(spark: SparkSession, rules: tuple[str, ...]) -> Iterator[None]:
    """Exclude these optimizer rules for the block, on top of any the session already excludes, then restore the
    session's setting. The setting is per session: a query another thread plans meanwhile sees it too, and of two
    blocks that overlap in threads of one session, the one that ends last restores what it saw (possibly the
    exclusion). Results are the same either way. Where the platform refuses the setting, the block runs with the
    session's rules."""
    applied, before = False, None
    try:
        before = spark.conf.get(_EXCLUDED_RULES, None)
        wanted = [r for r in (before or "").split(",") if r.strip()]
        spark.conf.set(_EXCLUDED_RULES, ",".join(wanted + [r for r in rules if r not in wanted]))
        applied = True
    except Exception as err:   # noqa: BLE001 - e.g. a serverless compute that refuses optimizer settings
        log.debug("optimizer rules not excluded: %s", err)
    try:
        yield
    finally:
        if applied:
            try:
                if before is None:
                    spark.conf.unset(_EXCLUDED_RULES)
                else:
                    spark.conf.set(_EXCLUDED_RULES, before)
            except Exception as err:   # noqa: BLE001 - a dead JVM: the block's own error, if any, is the one to see
                log.debug("optimizer rules not restored: %s", err)


def _jobs_and_stages(sc, tag: str) -> tuple[int | None, int | None]:
    try:
        jsc = sc._jsc.sc()
        jsc.listenerBus().waitUntilEmpty(10_000)   # the tracker is fed asynchronously by the listener bus
        jobs = list(jsc.statusTracker().getJobIdsForTag(tag))
        tracker, stages = sc.statusTracker(), set()
        for job in jobs:
            info = tracker.getJobInfo(job)
            for stage_id in (info.stageIds if info else []):
                stage = tracker.getStageInfo(stage_id)
                # a stage whose shuffle output already existed is listed but skipped: none of its tasks ran
                if stage and (stage.numCompletedTasks > 0 or stage.numTasks == 0):
                    stages.add(stage_id)
    except Exception as err:   # runs in a finally: never mask the block's own error
        log.debug("Spark jobs not countable here: %s", err)
        return None, None
    return len(jobs), len(stages)
