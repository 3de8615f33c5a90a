"""Sessionize one run date of raw logs into the Delta tables events, quarantine, item_daily_counts, item_vocab,
sessions and user_sequences.

Idempotence and order-independence come from the data, not from bookkeeping:
* each event id keeps the copy delivered on the earliest run date (a re-run replaces its own copies);
* quarantine and item_daily_counts replace whole partitions;
* sessions and sequences of the users touched by a run are recomputed from a point where the result cannot
  depend on what came before: the start of the inactivity chain that the earliest new event joins.
Re-running a date, or running dates out of order, therefore converges to the in-order result (item_vocab
indices excepted: they are append-only, so they record first-processed order).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide.config import Config, SessionizeConf
from ebbtide.generate import day_folder
from ebbtide.storage import AppTxn, DeltaStorage
from ebbtide.tables import TableSpec, table_specs

log = logging.getLogger(__name__)

ID_FIELDS = ("event_id", "user_id", "item_id", "event_type")
RAW_FIELDS = (*ID_FIELDS, "ts", "weight")
REASONS = ("unparseable_record", "oversize_field", "wrong_type", "missing_user_id", "missing_item_id",
           "unparseable_timestamp", "timestamp_too_old", "timestamp_in_future", "unknown_event_type")
MAX_MICROS = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z


@contextmanager
def _phase(name: str, run_date: dt.date):
    started = time.perf_counter()
    yield
    log.info("sessionize %s: %s took %.1fs", run_date, name, time.perf_counter() - started)


class InputError(ValueError):
    """The run's input cannot be read (missing folder, unreadable format)."""


class ReconciliationError(RuntimeError):
    """read != kept + quarantined + duplicates dropped: rows were lost or invented."""


@dataclass
class RunReport:
    run_date: dt.date
    read: int = 0
    kept: int = 0
    quarantined: int = 0
    duplicates_in_batch: int = 0
    duplicates_of_earlier: int = 0
    superseded_later: int = 0
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    users_touched: int = 0
    sessions_written: int = 0
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return self.duplicates_in_batch + self.duplicates_of_earlier

    def check(self) -> None:
        if self.read != self.kept + self.quarantined + self.duplicates:
            raise ReconciliationError(
                f"{self.run_date}: read {self.read} != kept {self.kept} + quarantined {self.quarantined} + "
                f"duplicates {self.duplicates} (in batch {self.duplicates_in_batch}, of earlier runs "
                f"{self.duplicates_of_earlier})")

    def line(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.quarantine_by_reason.items())) or "none"
        return (f"{self.run_date}: read {self.read:,} = kept {self.kept:,} + quarantined {self.quarantined:,} "
                f"+ duplicates {self.duplicates:,} (in batch {self.duplicates_in_batch:,}, of earlier runs "
                f"{self.duplicates_of_earlier:,}) | quarantine: {reasons} | users {self.users_touched:,}, "
                f"sessions {self.sessions_written:,} | {self.seconds:.1f}s")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["run_date"] = self.run_date.isoformat()
        return out


# ------------------------------------------------------------------------------------------------------
# Reading: every format becomes (raw, source_file, parsed, <field>_s strings, ts_native, wrong_type flags)
# ------------------------------------------------------------------------------------------------------
def input_folder(conf: SessionizeConf, run_date: dt.date) -> str:
    return day_folder(conf.input, run_date)


def _looks_structured(col: Column) -> Column:
    return F.coalesce(F.trim(col).startswith("{") | F.trim(col).startswith("["), F.lit(False))


def read_raw(spark: SparkSession, conf: SessionizeConf, run_date: dt.date) -> DataFrame:
    folder = input_folder(conf, run_date)
    try:
        if conf.format == "json":
            return _read_json(spark, folder)
        if conf.format == "parquet":
            return _from_typed(spark.read.option("mergeSchema", "true").parquet(folder))
        return _from_typed(spark.read.option("header", "true").option("inferSchema", "false").csv(folder))
    except Exception as err:  # AnalysisException: path does not exist / unreadable
        if "PATH_NOT_FOUND" in str(err) or "does not exist" in str(err):
            raise InputError(f"no input for run date {run_date}: {folder} does not exist") from None
        raise InputError(f"cannot read {conf.format} input {folder}: {str(err).splitlines()[0]}") from err


def _read_json(spark: SparkSession, folder: str) -> DataFrame:
    # Lines are read as text so a broken line survives verbatim into quarantine.
    lines = spark.read.text(folder).select(F.col("value").alias("raw"),
                                           F.col("_metadata.file_path").alias("source_file"))
    # A map keeps nested values as JSON text, so wrong types stay visible instead of turning into nulls.
    parsed = lines.withColumn("_m", F.from_json("raw", "MAP<STRING,STRING>"))
    cols = [F.col("raw"), F.length("raw").alias("record_chars"), F.col("source_file"),
            F.col("_m").isNotNull().alias("parsed")]
    cols += [F.col("_m")[f].alias(f"{f}_s") for f in RAW_FIELDS]
    cols += [F.lit(None).cast("timestamp").alias("ts_native")]
    wrong = F.lit(False)
    for f in (*ID_FIELDS, "ts"):
        wrong = wrong | _looks_structured(F.col("_m")[f])
    weight = F.col("_m")["weight"]
    wrong = wrong | (weight.isNotNull() & weight.try_cast("double").isNull())
    return parsed.select(*cols, wrong.alias("wrong_type"))


def _from_typed(df: DataFrame) -> DataFrame:
    """Parquet / CSV columns -> the common shape; column types decide what is a wrong type."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    # The record as JSON text is only built for rows that end up in quarantine (see typed_events).
    cols = [F.to_json(F.struct(*[F.col(c) for c in df.columns])).alias("raw"), F.lit(0).alias("record_chars"),
            F.col("_metadata.file_path").alias("source_file"), F.lit(True).alias("parsed")]
    wrong = F.lit(False)
    for f in RAW_FIELDS:
        dtype = fields.get(f)
        if dtype is None:
            cols.append(F.lit(None).cast("string").alias(f"{f}_s"))
        elif isinstance(dtype, (T.StructType, T.ArrayType, T.MapType, T.BinaryType)):
            cols.append(F.lit(None).cast("string").alias(f"{f}_s"))
            wrong = wrong | F.col(f).isNotNull()
        elif f == "ts" and isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
            cols.append(F.lit(None).cast("string").alias("ts_s"))
        else:
            cols.append(F.col(f).cast("string").alias(f"{f}_s"))
    ts_type = fields.get("ts")
    # timestamp_ntz is read as a UTC wall clock (the session time zone is UTC).
    ts_native = (F.col("ts").cast("timestamp")
                 if isinstance(ts_type, (T.TimestampType, T.TimestampNTZType, T.DateType)) else F.lit(None))
    cols.append(ts_native.cast("timestamp").alias("ts_native"))
    if "weight" in fields and isinstance(fields["weight"], T.StringType):
        wrong = wrong | (F.col("weight").isNotNull() & F.col("weight").try_cast("double").isNull())
    return df.select(*cols, wrong.alias("wrong_type"))


# ------------------------------------------------------------------------------------------------------
# Typing and validation
# ------------------------------------------------------------------------------------------------------
def parse_timestamp(ts_s: Column, ts_native: Column, epoch_unit: str) -> Column:
    """ISO-8601 with or without zone (no zone = UTC), epoch s/ms/us (fixed or inferred by magnitude)."""
    numeric = ts_s.rlike(r"^\s*-?[0-9]+(\.[0-9]+)?\s*$")
    value = F.trim(ts_s).try_cast("double")
    if epoch_unit == "auto":
        # Seconds until year ~5138, milliseconds until ~5138, else microseconds.
        factor = (F.when(F.abs(value) < 1e11, F.lit(1e6)).when(F.abs(value) < 1e14, F.lit(1e3))
                  .otherwise(F.lit(1.0)))
    else:
        factor = F.lit({"s": 1e6, "ms": 1e3, "us": 1.0}[epoch_unit])
    micros = (value * factor).try_cast("bigint")
    from_number = F.when(F.abs(micros) <= MAX_MICROS, F.timestamp_micros(micros))
    from_text = F.try_to_timestamp(F.trim(ts_s))
    return F.coalesce(ts_native, F.when(numeric, from_number).otherwise(from_text))


def typed_events(raw: DataFrame, conf: SessionizeConf, run_date: dt.date) -> DataFrame:
    """Adds typed columns plus `reason`/`message` (null when the row is valid). First failing rule wins."""
    user = F.trim(F.col("user_id_s"))
    item = F.trim(F.col("item_id_s"))
    etype = F.lower(F.trim(F.col("event_type_s")))
    ts = parse_timestamp(F.col("ts_s"), F.col("ts_native"), conf.epoch_unit)
    floor = dt.datetime.combine(conf.ts_floor, dt.time(), tzinfo=dt.timezone.utc)
    ceiling = dt.datetime.combine(run_date + dt.timedelta(days=1 + conf.max_future_days), dt.time(),
                                  tzinfo=dt.timezone.utc)
    known = list(conf.event_types)
    longest = F.greatest(*[F.coalesce(F.length(F.col(f"{f}_s")), F.lit(0)) for f in RAW_FIELDS])
    df = raw.select("*", user.alias("user_id"), item.alias("item_id"), etype.alias("event_type"),
                    ts.alias("ts"))
    checks = [
        ("unparseable_record", ~F.col("parsed"), F.lit("not a JSON object / unreadable record")),
        ("oversize_field", (F.col("record_chars") > conf.max_record_chars) | (longest > conf.max_field_chars),
         F.format_string(f"a field is longer than {conf.max_field_chars} chars (longest %d) or the record "
                         f"longer than {conf.max_record_chars}", longest)),
        ("wrong_type", F.col("wrong_type"), F.lit("an id/timestamp is an object or array, or weight is not numeric")),
        ("missing_user_id", F.coalesce(F.col("user_id") == "", F.lit(True)), F.lit("user_id missing or empty")),
        ("missing_item_id", F.coalesce(F.col("item_id") == "", F.lit(True)), F.lit("item_id missing or empty")),
        ("unparseable_timestamp", F.col("ts").isNull(),
         F.concat(F.lit("cannot parse ts: "), F.coalesce(F.col("ts_s"), F.lit("<missing>")))),
        ("timestamp_too_old", F.col("ts") < F.lit(floor),
         F.concat(F.lit(f"ts before floor {conf.ts_floor}: "), F.col("ts").cast("string"))),
        ("timestamp_in_future", F.col("ts") >= F.lit(ceiling),
         F.concat(F.lit(f"ts at/after {ceiling:%Y-%m-%d %H:%M} (run date + {conf.max_future_days} day(s)): "),
                  F.col("ts").cast("string"))),
        ("unknown_event_type", ~F.coalesce(F.col("event_type").isin(known), F.lit(False)),
         F.concat(F.lit(f"event_type not in {known}: "), F.coalesce(F.col("event_type_s"), F.lit("<missing>")))),
    ]
    reason: Column = F.lit(None).cast("string")
    message: Column = F.lit(None).cast("string")
    for code, failed, text in reversed(checks):
        reason = F.when(failed, F.lit(code)).otherwise(reason)
        message = F.when(failed, text).otherwise(message)
    weights = F.create_map(*[x for k, w in conf.event_types.items() for x in (F.lit(k), F.lit(float(w)))])
    given_id = F.trim(F.col("event_id_s"))
    stable_id = F.substring(F.sha2(F.concat_ws("\u0001", "user_id", "item_id", "event_type",
                                               F.unix_micros("ts").cast("string")), 256), 1, 32)
    return df.select(
        F.when(reason.isNotNull(), F.col("raw")).alias("raw"), "source_file", "user_id", "item_id", "event_type",
        "ts", reason.alias("reason"), message.alias("message"),
        F.when(given_id != "", given_id).otherwise(stable_id).alias("event_id"),
        F.coalesce(F.col("weight_s").try_cast("double"), weights[F.col("event_type")]).alias("weight"),
        F.to_date("ts").alias("event_date"),
    )


def dense_index(df: DataFrame, order: list[str], name: str, start: int) -> tuple[DataFrame, DataFrame]:
    """Number rows start, start+1, ... in `order` without funnelling them through one partition: range-partition,
    number inside each partition, add the sizes of the partitions before. Persisted, because range boundaries
    come from sampling and must not be recomputed differently: the caller unpersists the second frame."""
    ranged = (df.repartitionByRange(*order).sortWithinPartitions(*order)
              .withColumn("_pid", F.spark_partition_id()).persist(StorageLevel.MEMORY_AND_DISK))
    sizes = dict(ranged.groupBy("_pid").count().collect())
    offsets, total = {}, 0
    for pid in sorted(sizes):
        offsets[pid] = total
        total += sizes[pid]
    offset = F.create_map(*[x for pid, off in offsets.items() for x in (F.lit(pid), F.lit(off))]) if offsets \
        else F.create_map(F.lit(0), F.lit(0))
    numbered = ranged.withColumn(name, (F.lit(start) + offset[F.col("_pid")] - 1 + F.row_number().over(
        Window.partitionBy("_pid").orderBy(*order))).cast("int")).drop("_pid")
    return numbered, ranged


def user_bucket(n_buckets: int) -> Column:
    return F.pmod(F.xxhash64("user_id"), F.lit(n_buckets)).cast("int")


# ------------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------------
class Sessionizer:
    def __init__(self, spark: SparkSession, cfg: Config, storage: DeltaStorage):
        self.spark = spark
        self.cfg = cfg
        self.conf = cfg.sessionize
        self.storage = storage
        self.specs: dict[str, TableSpec] = table_specs(cfg)
        for spec in self.specs.values():
            storage.ensure(spec)

    def run_range(self, first: dt.date, last: dt.date) -> list[RunReport]:
        days = (last - first).days
        if days < 0:
            raise ValueError(f"--to {last} is before --date {first}")
        return [self.run(first + dt.timedelta(days=d)) for d in range(days + 1)]

    def run(self, run_date: dt.date) -> RunReport:
        started = time.time()
        report = RunReport(run_date)
        txn = AppTxn(f"ebbtide.sessionize.{run_date.isoformat()}", int(started))
        raw = read_raw(self.spark, self.conf, run_date)
        typed = typed_events(raw, self.conf, run_date).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            with _phase("read and validate", run_date):
                report.read = typed.count()
            with _phase("quarantine", run_date):
                self._write_quarantine(typed, run_date, txn, report)
            with _phase("dedup", run_date):
                classified = self._classify(typed, run_date, report)
            kept = classified.where(~F.col("status").isin("duplicate_in_batch", "duplicate_of_earlier"))
            try:
                dates = sorted(r[0] for r in kept.select("event_date").distinct().collect())
                if dates:
                    with _phase("events merge", run_date):
                        self.storage.merge(self.specs["events"], kept.drop("status"), txn=txn)
                    with _phase("item counts and vocab", run_date):
                        self._update_item_counts(dates, txn)
                    with _phase("sessions and sequences", run_date):
                        self._update_users(kept, run_date, txn, report)
                with _phase("verify", run_date):
                    report.kept = self._count_written(dates, run_date)
            finally:
                classified.unpersist()
        finally:
            typed.unpersist()
        report.seconds = time.time() - started
        report.check()
        log.info("sessionize %s", report.line())
        return report

    # -- quarantine ---------------------------------------------------------------------------------------
    def _write_quarantine(self, typed: DataFrame, run_date: dt.date, txn: AppTxn, report: RunReport) -> None:
        bad = typed.where(F.col("reason").isNotNull()).select(
            "raw", "reason", "message", "source_file", F.lit(run_date).alias("run_date"))
        self.storage.replace_where(self.specs["quarantine"], bad, {"run_date": [run_date]}, txn=txn)
        # Counted from the table just written, so the reconciliation checks what actually landed.
        written = self.storage.read(self.specs["quarantine"], where={"run_date": [run_date]})
        report.quarantine_by_reason = {r["reason"]: r["count"] for r in written.groupBy("reason").count().collect()}
        report.quarantined = sum(report.quarantine_by_reason.values())

    # -- dedup and classification -------------------------------------------------------------------------
    def _classify(self, typed: DataFrame, run_date: dt.date, report: RunReport) -> DataFrame:
        """Valid rows, one per event id, that this run keeps; counts the duplicates it drops (one pass)."""
        valid = typed.where(F.col("reason").isNull())
        # Deterministic pick among copies of one event id inside the batch.
        w = Window.partitionBy("event_id").orderBy("ts", "source_file", "user_id", "item_id", "event_type", "weight")
        ranked = valid.withColumn("_copy", F.row_number().over(w)).select(
            "event_id", "user_id", "item_id", "event_type", "ts", "weight", "event_date",
            F.lit(run_date).alias("ingest_date"), "source_file", "_copy")
        dates = [r[0] for r in valid.select("event_date").distinct().collect()]
        events = self.specs["events"]
        existing = (self.storage.read(events, where={"event_date": dates}) if dates
                    else self.spark.createDataFrame([], events.schema))
        prior = existing.select("event_id", F.col("ingest_date").alias("_prior_ingest"))
        classified = ranked.join(prior, "event_id", "left").withColumn(
            "status",
            F.when(F.col("_copy") > 1, "duplicate_in_batch")
            .when(F.col("_prior_ingest").isNull(), "new")
            .when(F.col("_prior_ingest") < F.lit(run_date), "duplicate_of_earlier")
            .when(F.col("_prior_ingest") > F.lit(run_date), "supersedes_later")
            .otherwise("rerun")).drop("_prior_ingest", "_copy").persist(StorageLevel.MEMORY_AND_DISK)
        counts = {r["status"]: r["count"] for r in classified.groupBy("status").count().collect()}
        report.duplicates_in_batch = counts.get("duplicate_in_batch", 0)
        report.duplicates_of_earlier = counts.get("duplicate_of_earlier", 0)
        report.superseded_later = counts.get("supersedes_later", 0)
        return classified

    def _count_written(self, dates: list[dt.date], run_date: dt.date) -> int:
        if not dates:
            return 0
        events = self.storage.read(self.specs["events"], where={"event_date": dates})
        return events.where(F.col("ingest_date") == F.lit(run_date)).count()

    # -- items ------------------------------------------------------------------------------------------
    def _update_item_counts(self, dates: list[dt.date], txn: AppTxn) -> None:
        events = self.storage.read(self.specs["events"], where={"event_date": dates})
        daily = events.groupBy("item_id", "event_date").agg(F.count("*").alias("n_events"),
                                                            F.sum("weight").alias("weight_sum"))
        self.storage.replace_where(self.specs["item_daily_counts"], daily, {"event_date": dates}, txn=txn)
        touched = daily.select("item_id").distinct()
        totals = (self.storage.read(self.specs["item_daily_counts"]).join(touched, "item_id", "left_semi")
                  .groupBy("item_id").agg(F.min("event_date").alias("first_seen_date"),
                                          F.sum("n_events").alias("n_events")))
        vocab = self.storage.read(self.specs["item_vocab"])
        max_idx = vocab.agg(F.max("item_idx")).collect()[0][0]
        next_idx = -1 if max_idx is None else max_idx
        known = totals.join(vocab.select("item_id", "item_idx"), "item_id", "inner")
        # New items are appended after the largest index, in (first seen, id) order; indices never move.
        fresh, staged = dense_index(totals.join(vocab.select("item_id"), "item_id", "left_anti"),
                                    ["first_seen_date", "item_id"], "item_idx", start=next_idx + 1)
        try:
            self.storage.merge(self.specs["item_vocab"], known.unionByName(fresh), txn=txn)
        finally:
            staged.unpersist()

    # -- sessions and sequences ---------------------------------------------------------------------------
    def _update_users(self, kept: DataFrame, run_date: dt.date, txn: AppTxn, report: RunReport) -> None:
        conf, specs = self.conf, self.specs
        gap_us = int(conf.session_gap_minutes * 60e6)
        max_us = int(conf.max_session_minutes * 60e6)
        n_buckets = self.cfg.storage.user_buckets
        affected = (kept.groupBy("user_id").agg(
            F.min("ts").alias("t0"), F.max("ts").alias("t_max"),
            F.sum(F.when(F.col("status") == "new", 1).otherwise(0)).cast("long").alias("n_new"))
            .withColumn("user_bucket", user_bucket(n_buckets))).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            buckets = sorted(r[0] for r in affected.select("user_bucket").distinct().collect())
            sessions = self.storage.read(specs["sessions"], where={"user_bucket": buckets})
            # The session in progress at the earliest new event; if the event continues its chain (gap within
            # the limit), recomputation restarts at the chain start, else at the event itself.
            prev = (sessions.join(affected.select("user_id", "t0"), "user_id")
                    .where(F.col("start_ts") <= F.col("t0"))
                    .groupBy("user_id").agg(F.max_by(F.struct("chain_start_ts", "end_ts"), "start_ts").alias("p")))
            continues = (F.unix_micros("t0") - F.unix_micros("p.end_ts")) <= gap_us
            starts = (affected.join(prev, "user_id", "left").select(
                "user_id", "user_bucket", "t0", "t_max", "n_new",
                F.date_trunc("second", F.when(F.col("p").isNotNull() & continues, F.col("p.chain_start_ts"))
                             .otherwise(F.col("t0"))).alias("from_ts"))).persist(StorageLevel.MEMORY_AND_DISK)
            with _phase("  affected users", run_date):
                report.users_touched = starts.count()
            first_day = starts.agg(F.min("from_ts")).collect()[0][0].date()
            last_day = run_date + dt.timedelta(days=1 + conf.max_future_days)
            window_days = [first_day + dt.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
            events = self.storage.read(specs["events"], where={"event_date": window_days})
            recent = (events.join(starts.select("user_id", "from_ts"), "user_id")
                      .where(F.col("ts") >= F.col("from_ts")))
            cut = sessionize_events(recent, gap_us, max_us).persist(StorageLevel.MEMORY_AND_DISK)
            with _phase("  cut sessions", run_date):
                cut.count()
            try:
                new_sessions = session_rows(cut, n_buckets)
                stale = (sessions.join(starts.select("user_id", "from_ts"), "user_id")
                         .where(F.col("start_ts") >= F.col("from_ts"))
                         .join(new_sessions.select("user_id", "session_id"), ["user_id", "session_id"], "left_anti")
                         .select(*specs["sessions"].columns, F.lit(True).alias("_delete")))
                upserts = new_sessions.withColumn("_delete", F.lit(False)).unionByName(stale)
                with _phase("  sessions merge", run_date):
                    self.storage.merge(specs["sessions"], upserts, delete_flag="_delete", txn=txn)
                with _phase("  sessions count", run_date):
                    report.sessions_written = new_sessions.count()
                with _phase("  sequences", run_date):
                    self._update_sequences(cut, starts, buckets, txn)
            finally:
                cut.unpersist()
                starts.unpersist()
        finally:
            affected.unpersist()

    def _update_sequences(self, cut: DataFrame, starts: DataFrame, buckets: list[int], txn: AppTxn) -> None:
        conf, spec = self.conf, self.specs["user_sequences"]
        vocab = self.storage.read(self.specs["item_vocab"]).select("item_id", "item_idx")
        type_codes = F.array(*[F.lit(t) for t in conf.event_types])
        # One snapshot of the touched buckets serves both the kept events and the previous counters.
        previous = self.storage.read(spec, where={"user_bucket": buckets})
        old = previous.join(starts.select("user_id", "from_ts"), "user_id")
        # Events before the recompute point keep their place; their session keys stay distinct from new ones.
        kept_old = (old.select("user_id", "from_ts", F.posexplode(F.arrays_zip(
            "item_idx", "ts", "event_type", "session_idx", "weight")).alias("pos", "e"))
            .where(F.col("e.ts") < F.unix_seconds("from_ts"))
            .select("user_id", (F.col("e.ts") * 1_000_000).alias("order_us"),
                    F.format_string("%08d", "pos").alias("tie"), F.col("e.item_idx").alias("item_idx"),
                    F.col("e.ts").alias("ts_s"), F.col("e.event_type").alias("etype"),
                    F.col("e.weight").alias("weight"),
                    F.concat(F.lit("o"), F.col("e.session_idx").cast("string")).alias("skey")))
        fresh = (cut.join(vocab, "item_id").select(
            "user_id", F.unix_micros("ts").alias("order_us"), F.col("event_id").alias("tie"), "item_idx",
            F.unix_seconds("ts").alias("ts_s"),
            (F.array_position(type_codes, F.col("event_type")) - 1).cast("int").alias("etype"),
            F.col("weight").cast("float").alias("weight"), F.col("session_id").alias("skey")))
        both = kept_old.unionByName(fresh)
        latest = Window.partitionBy("user_id").orderBy(F.desc("order_us"), F.desc("tie"))
        window = both.withColumn("_rn", F.row_number().over(latest)).where(F.col("_rn") <= conf.max_len)
        window = window.withColumn("_sfirst", F.min("order_us").over(Window.partitionBy("user_id", "skey")))
        window = window.withColumn("session_idx", (F.dense_rank().over(
            Window.partitionBy("user_id").orderBy("_sfirst", "skey")) - 1).cast("int"))
        seq = window.groupBy("user_id").agg(F.array_sort(F.collect_list(F.struct(
            "order_us", "tie", "item_idx", "ts_s", "etype", "session_idx", "weight"))).alias("_e"))
        prev_stats = previous.select(
            "user_id", F.col("n_events").alias("_n"), F.col("first_ts").alias("_first"),
            F.col("last_ts").alias("_last"))
        rows = (seq.join(starts, "user_id").join(prev_stats, "user_id", "left").select(
            "user_id",
            F.col("_e.item_idx").alias("item_idx"), F.col("_e.ts_s").alias("ts"),
            F.col("_e.etype").alias("event_type"), F.col("_e.session_idx").alias("session_idx"),
            F.col("_e.weight").alias("weight"),
            (F.coalesce(F.col("_n"), F.lit(0)) + F.col("n_new")).alias("n_events"),
            F.least(F.col("_first"), F.col("t0")).alias("first_ts"),
            F.greatest(F.col("_last"), F.col("t_max")).alias("last_ts"),
            "user_bucket"))
        self.storage.merge(spec, rows, txn=txn)


def sessionize_events(events: DataFrame, gap_us: int, max_us: int) -> DataFrame:
    """Cut each user's time-ordered events into sessions: a new chain after an inactivity gap > gap_us,
    and a chain cut every max_us from its start. All windows share one partitioning (user), one shuffle."""
    w = Window.partitionBy("user_id").orderBy("ts", "event_id")
    running = w.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    micros = F.unix_micros("ts")
    gap = micros - F.lag(micros).over(w)
    df = events.withColumn("_new_chain", gap.isNull() | (gap > gap_us))
    df = df.withColumn("chain_start_ts", F.max(F.when(F.col("_new_chain"), F.col("ts"))).over(running))
    df = df.withColumn("_chunk", F.floor((micros - F.unix_micros("chain_start_ts")) / max_us))
    df = df.withColumn("_new_session", F.col("_new_chain") | (F.col("_chunk") != F.lag("_chunk").over(w)))
    df = df.withColumn("session_start_ts", F.max(F.when(F.col("_new_session"), F.col("ts"))).over(running))
    session_id = F.substring(F.sha2(F.concat_ws("|", "user_id", F.unix_micros("session_start_ts").cast("string")),
                                    256), 1, 24)
    return df.withColumn("session_id", session_id).drop("_new_chain", "_chunk", "_new_session")


def session_rows(cut: DataFrame, n_buckets: int) -> DataFrame:
    ordered = F.array_sort(F.collect_list(F.struct("ts", "event_id", "item_id")))
    return (cut.groupBy("user_id", "session_id").agg(
        F.min("ts").alias("start_ts"), F.max("ts").alias("end_ts"),
        F.min("chain_start_ts").alias("chain_start_ts"), F.count("*").cast("int").alias("n_events"),
        ordered.alias("_items"))
        .select("user_id", "session_id", "start_ts", "end_ts", "chain_start_ts", "n_events",
                F.col("_items.item_id").alias("item_ids"), user_bucket(n_buckets).alias("user_bucket")))
