"""Sessionize one run date of raw logs into the Delta tables events, event_redeliveries, quarantine,
item_daily_counts, item_vocab, sessions and user_sequences.

Idempotence and order-independence come from the data, not from bookkeeping:
* the events of ingest date D are exactly what D's input holds (valid, one copy per event id): a re-run with a
  corrected input withdraws what the input no longer holds;
* each event id keeps the copy from the earliest ingest date that delivered it; later valid copies wait in
  event_redeliveries, so the next earliest takes over if that copy is withdrawn;
* quarantine and item_daily_counts replace whole partitions;
* sessions and sequences of the users whose events change are recomputed from a point where the result cannot
  depend on what came before (the start of the inactivity chain their earliest changed event joins) up to their
  last event, and a sequence's n_events is summed from the user's sessions, i.e. from the data.
Tables derived from events are committed before events itself: a run killed anywhere is completed by a re-run,
which plans the same changes from the events it left as they were (item_vocab indices excepted: they are
append-only, so they record first-processed order). Every commit carries the run's marker (runs.py), tables left
unchanged a marker-only one, so the marker in `events` says the whole run landed (backfill, nightly's guard).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from ebbtide.config import Config
from ebbtide.rawlogs import (  # noqa: F401  (re-exported: the job's public names)
    REASONS,
    InputError,
    input_folder,
    parse_timestamp,
    read_raw,
    typed_events,
)
from ebbtide.runs import sessionize_app_id
from ebbtide.spark import count_spark_jobs
from ebbtide.storage import BROADCAST_KEYS_MAX, AppTxn, DeltaStorage
from ebbtide.tables import EVENTS_SCHEMA, TableSpec, table_specs

log = logging.getLogger(__name__)

EVENT_COLUMNS = [f.name for f in EVENTS_SCHEMA.fields]
WRITES = ("quarantine", "item_daily_counts", "item_vocab", "sessions", "user_sequences", "event_redeliveries",
          "events")   # in commit order: events, the source of every other table but quarantine, last
MEMORY_AND_DISK = StorageLevel.MEMORY_AND_DISK


def _stage(df: DataFrame) -> DataFrame:
    """Materialize an intermediate result and cut its lineage: the plans built on it stay small (Spark re-analyzes
    and compares whole plans against its cache on every step, which dominated small runs). A lost executor fails
    the run, which a re-run completes."""
    return df.localCheckpoint(eager=True, storageLevel=MEMORY_AND_DISK)


@contextmanager
def _phase(spark: SparkSession, name: str, run_date: dt.date):
    """Log a phase's wall time and the Spark jobs it ran (where Spark lets them be counted)."""
    started = time.perf_counter()
    with count_spark_jobs(spark) as count:
        yield
        took = time.perf_counter() - started   # the phase's own time, before the listener bus is waited for
    jobs = "" if count.jobs is None else f", {count.jobs} Spark jobs"
    log.info("sessionize %s: %s took %.1fs%s", run_date, name, took, jobs)


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
    superseded_later: int = 0      # kept copies of later ingest dates this run's copies replaced
    withdrawn: int = 0             # copies an earlier run of this date kept that the input no longer holds
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    users_touched: int = 0
    sessions_written: int = 0
    seconds: float = 0.0
    spark_jobs: int | None = None      # None where Spark does not let us count them (Spark Connect)
    spark_stages: int | None = None

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
                f"{self.duplicates_of_earlier:,}) | superseded later copies {self.superseded_later:,}, withdrawn "
                f"{self.withdrawn:,} | quarantine: {reasons} | users {self.users_touched:,}, "
                f"sessions {self.sessions_written:,} | {self.seconds:.1f}s, Spark jobs {self.spark_jobs} / stages "
                f"{self.spark_stages}")

    def as_dict(self) -> dict:
        out = asdict(self)
        out["run_date"] = self.run_date.isoformat()
        return out


@dataclass
class _Plan:
    """What a run changes in `events`, computed before anything derived from it is written."""

    affected_ids: DataFrame     # event ids with a copy in this run's input or from an earlier run of this date
    winners: DataFrame          # the copy each affected id keeps after the run (event columns)
    events_changes: DataFrame   # winners that differ from the kept copy + kept copies to delete (`_delete`)
    redelivery_changes: DataFrame
    touched: DataFrame          # user_id, ts, item_id, event_date to recompute from (any of them may be null)
    dates: list[dt.date]        # event_date partitions whose item counts are recomputed
    old_dates: list[dt.date]    # event_date partitions of kept copies that go away (the events MERGE looks there)
    cached: list[DataFrame]

    def release(self) -> None:
        for df in self.cached:
            df.unpersist()


_TOUCHED = ("user_id", "ts", "item_id", "event_date")


def _residue_rows(name: str, rows: DataFrame) -> DataFrame:
    """The touched rows a derived table's rows stand for: its user from that time on (a sequence: from its first
    event, since a stored sequence's earlier entries are reused), its item, its event date."""
    none = {c: F.lit(None).cast(t) for c, t in zip(_TOUCHED, ("string", "timestamp", "string", "date"))}
    start = {"sessions": "start_ts", "user_sequences": "first_ts"}.get(name)
    if start:
        picked = {"user_id": F.col("user_id"), "ts": F.col(start), "event_date": F.to_date(start)}
    else:
        picked = {"item_id": F.col("item_id")} | ({"event_date": F.col("event_date")}
                                                 if name == "item_daily_counts" else {})
    return rows.select(*[picked.get(c, none[c]).alias(c) for c in _TOUCHED])


def _changes(new: DataFrame, old: DataFrame, keys: list[str]) -> tuple[DataFrame, DataFrame]:
    """Rows of `new` that differ from `old` (by key) to upsert, plus rows of `old` missing from `new` to delete
    (a MERGE source with `_delete`); and the `old` rows that go away (replaced or deleted)."""
    joined = (new.select(*keys, F.struct(*EVENT_COLUMNS).alias("n"))
              .join(old.select(*keys, F.struct(*EVENT_COLUMNS).alias("o")), keys, "full_outer")
              .where(~F.col("n").eqNullSafe(F.col("o"))))
    source = (joined.where(F.col("n").isNotNull()).select("n.*", F.lit(False).alias("_delete"))
              .unionByName(joined.where(F.col("n").isNull()).select("o.*", F.lit(True).alias("_delete"))))
    return source, joined.where(F.col("o").isNotNull()).select("o.*")


def _summarize(touched: DataFrame, leaving: DataFrame, winners: DataFrame, run_date: dt.date) -> Row:
    """One action for what the driver needs from a plan: the event_date partitions of the touched rows and of the
    rows that leave `events`, and how many of the leaving ones were superseded (a later ingest date's copy replaced
    by this run's) or withdrawn (this date's earlier run kept it; the input no longer holds it, or an earlier date's
    copy wins)."""
    gone = (leaving.select("event_id", "ingest_date", F.col("event_date").alias("_old_date"))
            .join(winners.select("event_id", F.col("ingest_date").alias("_now")), "event_id", "left"))
    rows = gone.unionByName(touched.select(F.col("event_date").alias("_date")), allowMissingColumns=True)
    this_run = F.lit(run_date)   # a touched row has no ingest_date here: it counts 0 below
    return rows.agg(
        F.collect_set("_date").alias("dates"), F.collect_set("_old_date").alias("old_dates"),
        F.sum(F.when((F.col("ingest_date") > this_run) & (F.col("_now") == this_run), 1).otherwise(0))
        .alias("superseded"),
        F.sum(F.when((F.col("ingest_date") == this_run) & F.coalesce(F.col("_now") != this_run, F.lit(True)), 1)
              .otherwise(0)).alias("withdrawn")).collect()[0]


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


def update_item_counts(storage: DeltaStorage, specs: dict[str, TableSpec], events: DataFrame,
                       dates: list[dt.date], touched: DataFrame, txn: AppTxn | None = None) -> None:
    """Replace item_daily_counts of `dates` with counts of `events` (those partitions as they are now), and bring
    the vocabulary's totals of the `touched` items up to date; new items get the next indices."""
    daily = events.groupBy("item_id", "event_date").agg(F.count("*").alias("n_events"),
                                                        F.sum("weight").alias("weight_sum"))
    storage.replace_where(specs["item_daily_counts"], daily, {"event_date": dates}, txn=txn)
    totals = (storage.read(specs["item_daily_counts"]).join(touched, "item_id", "left_semi")
              .groupBy("item_id").agg(F.min("event_date").alias("_first"), F.sum("n_events").alias("_n")))
    vocab = storage.read(specs["item_vocab"])
    max_idx = vocab.agg(F.max("item_idx")).collect()[0][0]
    next_idx = -1 if max_idx is None else max_idx
    # Known items get their totals (0 when every event of the item went away: indices are never reused).
    known = (vocab.join(touched, "item_id", "left_semi").join(totals, "item_id", "left").select(
        "item_id", "item_idx", F.coalesce("_first", "first_seen_date").alias("first_seen_date"),
        F.coalesce("_n", F.lit(0)).cast("long").alias("n_events")))
    # New items are appended after the largest index, in (first seen, id) order; indices never move.
    fresh, staged = dense_index(totals.join(vocab.select("item_id"), "item_id", "left_anti").select(
        "item_id", F.col("_first").alias("first_seen_date"), F.col("_n").alias("n_events")),
        ["first_seen_date", "item_id"], "item_idx", start=next_idx + 1)
    try:
        storage.merge(specs["item_vocab"], known.unionByName(fresh), txn=txn)
    finally:
        staged.unpersist()


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
        for name in WRITES:
            storage.ensure(self.specs[name])

    def run_range(self, first: dt.date, last: dt.date) -> list[RunReport]:
        days = (last - first).days
        if days < 0:
            raise ValueError(f"--to {last} is before --date {first}")
        return [self.run(first + dt.timedelta(days=d)) for d in range(days + 1)]

    def run(self, run_date: dt.date) -> RunReport:
        """One run date, as one unit of work: a concurrent writer's commit to what it read fails it cleanly."""
        started = time.time()
        report = RunReport(run_date)
        with count_spark_jobs(self.spark) as count:
            with self.storage.job("sessionize", run_date.isoformat(), [self.specs[n] for n in WRITES]):
                self._process(run_date, report, AppTxn(sessionize_app_id(run_date), int(started)))
            with _phase(self.spark, "verify", run_date):   # bookkeeping, from the tables as committed
                self._count_written(run_date, report)
        report.seconds, report.spark_jobs, report.spark_stages = time.time() - started, count.jobs, count.stages
        report.check()
        log.info("sessionize %s", report.line())
        return report

    def _process(self, run_date: dt.date, report: RunReport, txn: AppTxn) -> None:
        typed = typed_events(read_raw(self.spark, self.conf, run_date), self.conf, run_date)
        try:
            with _phase(self.spark, "read and validate", run_date):
                try:
                    typed = _stage(typed)
                    report.read = typed.count()
                except Exception as err:  # a file Spark cannot decode (a corrupt Parquet page, ...)
                    raise InputError(f"cannot read the input of {run_date} ({input_folder(self.conf, run_date)}): "
                                     f"{str(err).strip().splitlines()[0][:500]}") from err
            if report.read == 0 and not self.conf.allow_empty_input:
                raise InputError(f"no records in {input_folder(self.conf, run_date)}: refusing to replace the "
                                 f"data of {run_date} with nothing (set sessionize.allow_empty_input=true if the "
                                 "day really is empty); nothing was written")
            with _phase(self.spark, "quarantine", run_date):
                self._write_quarantine(typed, run_date, txn)
            with _phase(self.spark, "plan", run_date):
                plan = self._plan(typed, run_date, report)
            try:
                if plan.dates:
                    with _phase(self.spark, "item counts and vocab", run_date):
                        self._update_item_counts(plan, txn)
                    with _phase(self.spark, "sessions and sequences", run_date):
                        self._update_users(plan, run_date, report, txn)
                with _phase(self.spark, "events", run_date):
                    self._write_events(plan, txn)
            finally:
                plan.release()
        finally:
            typed.unpersist()

    # -- quarantine ---------------------------------------------------------------------------------------
    def _write_quarantine(self, typed: DataFrame, run_date: dt.date, txn: AppTxn) -> None:
        bad = typed.where(F.col("reason").isNotNull()).select(
            "raw", "reason", "message", "source_file", F.lit(run_date).alias("run_date"), "raw_chars", "raw_sha256",
            F.col("quarantine_user_id").alias("user_id"))
        self.storage.replace_where(self.specs["quarantine"], bad, {"run_date": [run_date]}, txn=txn)

    # -- the plan: which copy of each event id is kept -----------------------------------------------------
    def _plan(self, typed: DataFrame, run_date: dt.date, report: RunReport) -> _Plan:
        events, redeliveries = self.specs["events"], self.specs["event_redeliveries"]
        valid = typed.where(F.col("reason").isNull())
        # Deterministic pick among copies of one event id inside the batch.
        in_batch = Window.partitionBy("event_id").orderBy("ts", "source_file", "user_id", "item_id", "event_type",
                                                          "weight")
        ranked = valid.withColumn("_copy", F.row_number().over(in_batch)).withColumn(
            "ingest_date", F.lit(run_date))
        batch = _stage(ranked.where(F.col("_copy") == 1).select(*EVENT_COLUMNS))
        shape = batch.agg(F.count("*").alias("n"), F.collect_set("event_date").alias("dates")).collect()[0]
        report.duplicates_in_batch = valid.count() - shape["n"]
        # Ids an earlier run of this date kept or parked: the input may have withdrawn them. (ingest_date is in
        # every file's statistics: Parquet skips the files other dates' runs wrote.)
        this_date = self.storage.read(events).where(F.col("ingest_date") == F.lit(run_date))
        earlier_run = (this_date.select("event_id")
                       .unionByName(self.storage.read(redeliveries, where={"ingest_date": [run_date]})
                                    .select("event_id")))
        # Only semi/anti-joined, so an id in both parts does no harm (no shuffle to make it distinct).
        affected = batch.select("event_id").unionByName(earlier_run)
        kept = _stage(self._kept_copies(affected, this_date, shape["dates"], run_date))
        parked = _stage(self.storage.read_matching(redeliveries, affected))
        # Most ids have no other copy: their batch copy enters `events` as it is. Only the contested ones (a kept
        # or parked copy exists) are ranked and compared; broadcast when few, so the batch is not shuffled.
        contested = _stage(kept.select("event_id").unionByName(parked.select("event_id")).distinct())
        ids = F.broadcast(contested) if contested.count() <= BROADCAST_KEYS_MAX else contested
        fresh = batch.join(ids, "event_id", "left_anti")
        # Every copy of the contested ids after this run: other dates' copies (a copy that took over may be in both
        # tables, see below), and this run's.
        copy_key = ["event_id", "ingest_date"]
        copies = (kept.unionByName(parked.join(kept.select(*copy_key), copy_key, "left_anti"))
                  .where(F.col("ingest_date") != F.lit(run_date))
                  .unionByName(batch.join(ids, "event_id", "left_semi")))
        by_ingest = Window.partitionBy("event_id").orderBy("ingest_date")
        ranked_copies = _stage(copies.withColumn("_rank", F.row_number().over(by_ingest)))
        rivals_won = ranked_copies.where(F.col("_rank") == 1).select(*EVENT_COLUMNS)
        losers = ranked_copies.where(F.col("_rank") > 1).select(*EVENT_COLUMNS)
        changes, replaced = _changes(rivals_won, kept, ["event_id"])
        events_changes = _stage(changes.unionByName(fresh.withColumn("_delete", F.lit(False))))
        replaced = _stage(replaced)
        winners = fresh.unionByName(rivals_won)
        # A parked copy that takes over stays parked until the events commit has landed: a run killed between the
        # two commits must find it again (the next run that touches the id removes it from event_redeliveries).
        taking_over = (rivals_won.join(parked.select(*copy_key), copy_key, "left_semi")
                       .join(kept.select(*copy_key), copy_key, "left_anti"))
        redelivery_changes = _stage(_changes(losers.unionByName(taking_over), parked, copy_key)[0])
        # What is derived from `events` changes only where rows enter or leave it: a winner identical to its kept
        # copy (an old event redelivered, a re-run of the same input) leaves its user, items and dates alone.
        # Unless a run of this date did not land: then every winner, and whatever that run wrote, is re-derived.
        residue = self._residue(run_date)
        entering = winners if residue is not None else \
            events_changes.where(~F.col("_delete")).select(*EVENT_COLUMNS)
        touched = entering.unionByName(replaced).select(*_TOUCHED)
        touched = touched if residue is None else touched.unionByName(residue)
        summary = _summarize(touched, replaced, rivals_won, run_date)   # only contested ids can leave
        report.superseded_later, report.withdrawn = summary["superseded"] or 0, summary["withdrawn"] or 0
        dates = sorted(summary["dates"])
        return _Plan(affected, winners, events_changes, redelivery_changes, touched, dates,
                     sorted(summary["old_dates"]),
                     [batch, kept, parked, contested, ranked_copies, events_changes, replaced, redelivery_changes]
                     + ([residue] if residue is not None else []))

    def _kept_copies(self, affected: DataFrame, this_date: DataFrame, batch_dates: list[dt.date],
                     run_date: dt.date) -> DataFrame:
        """The kept copies of the affected ids: this date's own, wherever they are, and other dates' copies in the
        event_date partitions within sessionize.dedup_lookback_days of the batch's event dates (the whole table
        when that is null)."""
        events, lookback = self.specs["events"], self.conf.dedup_lookback_days
        if lookback is None:
            return self.storage.read_matching(events, affected)
        near = {d + dt.timedelta(days=k) for d in batch_dates for k in range(-lookback, lookback + 1)}
        window = sorted(near & set(self.storage.partition_values(events, "event_date")))
        if not window:
            return this_date
        others = self.storage.read_matching(events, affected, where={"event_date": window})
        return this_date.unionByName(others.where(F.col("ingest_date") != F.lit(run_date)))

    def _residue(self, run_date: dt.date) -> DataFrame | None:
        """What runs of this date that did not land (killed, failed) did to the tables derived from `events`, as
        touched rows; None if the last run of the date landed. Such a run commits `events` last, so those tables
        may hold users, items and dates that neither `events` nor this run's input names, and may lack rows of
        events that `events` still holds (another date's copy its own copy replaced). Where the rows taken away
        cannot be told (vacuumed), every row of `events` is touched."""
        app = sessionize_app_id(run_date)
        landed = self.storage.txn_versions(self.specs["events"], [app])[app]
        parts = []
        for name in WRITES[1:WRITES.index("user_sequences") + 1]:
            spec = self.specs[name]
            if self.storage.txn_versions(spec, [app])[app] == landed:   # the usual case: one snapshot load
                continue
            written, gone = self.storage.rows_changed_since(spec, self.storage.version_with_marker(spec, app, landed))
            parts += [_residue_rows(name, written), _residue_rows(name, gone) if gone is not None
                      else self.storage.read(self.specs["events"]).select(*_TOUCHED)]
        return _stage(functools.reduce(DataFrame.unionByName, parts)) if parts else None

    def _events_after(self, plan: _Plan, dates: list[dt.date]) -> DataFrame:
        """`events` of these event_date partitions as they are once this run commits."""
        current = self.storage.read(self.specs["events"], where={"event_date": dates})
        return (current.join(plan.affected_ids, "event_id", "left_anti")
                .unionByName(plan.winners.where(F.col("event_date").isin(dates))))

    def _write_events(self, plan: _Plan, txn: AppTxn) -> None:
        """The commit point of a run: parked copies first, then the kept ones. A table the run did not change gets
        the run's marker instead, in commit order (WRITES): the marker in `events` means the whole run landed."""
        old_dates = {"event_date": plan.old_dates} if plan.old_dates else None
        for name, changes, search in (("event_redeliveries", plan.redelivery_changes, None),
                                      ("events", plan.events_changes, old_dates)):
            self._mark_unchanged(WRITES[:WRITES.index(name)], txn)
            if changes.isEmpty():
                self.storage.mark(self.specs[name], txn)
            else:
                self.storage.merge(self.specs[name], changes, delete_flag="_delete", txn=txn, search=search)

    def _mark_unchanged(self, names: tuple[str, ...], txn: AppTxn) -> None:
        for name in names:
            if not self.storage.committed_in_job(self.specs[name]):
                self.storage.mark(self.specs[name], txn)

    def _count_written(self, run_date: dt.date, report: RunReport) -> None:
        """Reconciliation counts, from the tables just written."""
        written = self.storage.read(self.specs["quarantine"], where={"run_date": [run_date]})
        report.quarantine_by_reason = {r["reason"]: r["count"] for r in written.groupBy("reason").count().collect()}
        report.quarantined = sum(report.quarantine_by_reason.values())
        kept = (self.storage.read(self.specs["events"]).where(F.col("ingest_date") == F.lit(run_date))
                .select("event_id", F.lit(True).alias("_kept")))
        parked = (self.storage.read(self.specs["event_redeliveries"], where={"ingest_date": [run_date]})
                  .select("event_id", F.lit(True).alias("_parked")))
        # One pass over both (event ids are unique in each); a copy left parked after it took over (see _plan) is
        # kept, not a duplicate.
        counts = kept.join(parked, "event_id", "full_outer").agg(
            F.count("_kept").alias("kept"),
            F.count(F.when(F.col("_parked") & F.col("_kept").isNull(), 1)).alias("parked")).collect()[0]
        report.kept, report.duplicates_of_earlier = counts["kept"], counts["parked"]

    # -- items ------------------------------------------------------------------------------------------
    def _update_item_counts(self, plan: _Plan, txn: AppTxn) -> None:
        update_item_counts(self.storage, self.specs, self._events_after(plan, plan.dates), plan.dates,
                           plan.touched.select("item_id").distinct(), txn)

    # -- sessions and sequences ---------------------------------------------------------------------------
    def _update_users(self, plan: _Plan, run_date: dt.date, report: RunReport, txn: AppTxn) -> None:
        conf, specs = self.conf, self.specs
        gap_us = int(conf.session_gap_minutes * 60e6)
        max_us = int(conf.max_session_minutes * 60e6)
        n_buckets = self.cfg.storage.user_buckets
        users = plan.touched.where(F.col("user_id").isNotNull())   # item and date rows of a residue have none
        affected = _stage(users.groupBy("user_id").agg(F.min("ts").alias("t0"))
                          .withColumn("user_bucket", user_bucket(n_buckets)))
        try:
            found = affected.agg(F.count("*").alias("n"), F.collect_set("user_bucket").alias("buckets"),
                                 F.unix_micros(F.min("t0")).alias("t0_us")).collect()[0]
            buckets = sorted(found["buckets"])
            sessions = self.storage.read(specs["sessions"], where={"user_bucket": buckets})
            # The session in progress at the earliest changed event; if the event continues its chain (gap within
            # the limit), recomputation restarts at the chain start, else at the event itself. Only a session that
            # started less than a gap plus the longest session before t0 can continue: the literal bound lets
            # Parquet skip the files of older sessions.
            # (Sessions cut under a larger max_session_minutes than this run's may start earlier and still
            # continue: a changed session setting applies to what is recomputed from then on.)
            continuable = F.col("start_ts") >= F.lit(_utc((found["t0_us"] or 0) - gap_us - max_us))
            prev = (sessions.where(continuable).join(_few(affected.select("user_id", "t0"), found["n"]), "user_id")
                    .where(F.col("start_ts") <= F.col("t0"))
                    .groupBy("user_id").agg(F.max_by(F.struct("chain_start_ts", "end_ts"), "start_ts").alias("p")))
            continues = (F.unix_micros("t0") - F.unix_micros("p.end_ts")) <= gap_us
            starts = (affected.join(prev, "user_id", "left").select(
                "user_id", "user_bucket",
                F.date_trunc("second", F.when(F.col("p").isNotNull() & continues, F.col("p.chain_start_ts"))
                             .otherwise(F.col("t0"))).alias("from_ts"))).persist(MEMORY_AND_DISK)
            with _phase(self.spark, "  affected users", run_date):   # one pass, which also fills the cache
                # the date as events' partitions name it (Spark's session zone): a collected timestamp would be
                # in the driver's local zone, a day off east of UTC
                users = starts.agg(F.count("*").alias("n"), F.to_date(F.min("from_ts")).alias("first_day"),
                                   F.unix_micros(F.min("from_ts")).alias("from_us")).collect()[0]
            report.users_touched = users["n"]
            if not users["n"]:   # only items and dates to recount (a re-run after a killed run, say)
                starts.unpersist()
                return
            # Every event from the recompute point on, up to the user's last: partitions after the run date too.
            existing = self.storage.partition_values(specs["events"], "event_date")
            window = sorted(d for d in set(existing) | set(plan.dates) if d >= users["first_day"])
            points = _few(starts.select("user_id", "from_ts"), users["n"])
            recent = self._events_after(plan, window).join(points, "user_id").where(F.col("ts") >= F.col("from_ts"))
            with _phase(self.spark, "  cut sessions", run_date):
                cut = _stage(sessionize_events(recent, gap_us, max_us))
            try:
                new_sessions = session_rows(cut, n_buckets)
                since = _utc(users["from_us"])   # no session the run replaces or deletes starts earlier
                stale = (sessions.where(F.col("start_ts") >= F.lit(since)).join(points, "user_id")
                         .where(F.col("start_ts") >= F.col("from_ts"))
                         .join(new_sessions.select("user_id", "session_id"), ["user_id", "session_id"], "left_anti")
                         .select(*specs["sessions"].columns, F.lit(True).alias("_delete")))
                upserts = new_sessions.withColumn("_delete", F.lit(False)).unionByName(stale)
                with _phase(self.spark, "  sessions merge", run_date):
                    self.storage.merge(specs["sessions"], upserts, delete_flag="_delete", txn=txn,
                                       since=("start_ts", since))
                with _phase(self.spark, "  sessions count", run_date):
                    report.sessions_written = new_sessions.count()
                with _phase(self.spark, "  sequences", run_date):
                    self._update_sequences(plan, cut, starts, points, sessions, buckets, existing, txn)
            finally:
                cut.unpersist()
                starts.unpersist()
        finally:
            affected.unpersist()

    def _update_sequences(self, plan: _Plan, cut: DataFrame, starts: DataFrame, points: DataFrame,
                          sessions: DataFrame, buckets: list[int], existing: list[dt.date], txn: AppTxn) -> None:
        """Sequences of the recomputed users: their stored entries before the recompute point, then the fresh
        ones. Counters come from the sessions before that point plus the fresh events: n_events is the number of
        the user's events in `events`, whatever happened to earlier runs."""
        conf, spec = self.conf, self.specs["user_sequences"]
        previous = self.storage.read(spec, where={"user_bucket": buckets})
        # cached: the short-history check (n_stored) and the rows both read it, and on a later day it is most of
        # the table
        stored = _stored_before(previous.join(points, "user_id")).persist(MEMORY_AND_DISK)
        stats = None
        try:
            before = (sessions.join(points, "user_id").where(F.col("start_ts") < F.col("from_ts"))
                      .groupBy("user_id").agg(F.sum("n_events").alias("n_before"),
                                              F.min("start_ts").alias("first_before"),
                                              F.max("end_ts").alias("last_before")))
            fresh_stats = cut.groupBy("user_id").agg(F.count("*").alias("n_fresh"),
                                                     F.min("ts").alias("first_fresh"), F.max("ts").alias("last_fresh"))
            stats = (starts.select("user_id", "user_bucket").join(before, "user_id", "left")
                     .join(fresh_stats, "user_id", "left")
                     .join(stored.select("user_id", F.size("_stored").alias("n_stored")), "user_id", "left")
                     .fillna(0, ["n_before", "n_fresh", "n_stored"])).persist(MEMORY_AND_DISK)
            # A window can hold fewer earlier entries than it needs when events after the recompute point went
            # away (a corrected input): those users are rebuilt from their whole history.
            short = stats.where(F.col("n_stored") < F.least(
                "n_before", F.greatest(F.lit(conf.max_len) - F.col("n_fresh"), F.lit(0)))).select("user_id")
            fresh_cut, carried = cut, stored
            if not short.isEmpty():
                every_day = sorted(set(existing) | set(plan.dates))
                history = self._events_after(plan, every_day).join(short, "user_id", "left_semi")
                gap_us, max_us = int(conf.session_gap_minutes * 60e6), int(conf.max_session_minutes * 60e6)
                fresh_cut = cut.join(short, "user_id", "left_anti").unionByName(
                    sessionize_events(history, gap_us, max_us), allowMissingColumns=True)
                carried = stored.join(short, "user_id", "left_anti")
            rows = self._sequence_rows(carried, fresh_cut, stats)
            self.storage.merge(spec, rows, delete_flag="_delete", txn=txn)
        finally:
            if stats is not None:
                stats.unpersist()
            stored.unpersist()

    def _sequence_rows(self, carried: DataFrame, cut: DataFrame, stats: DataFrame) -> DataFrame:
        """Each user's window: the stored entries carried over (those before the recompute point), then the fresh
        events in (ts, event_id) order, of which the last max_len are kept. Array functions on one row per user:
        the stored entries are never exploded or sorted again."""
        conf = self.conf
        vocab = self.storage.read(self.specs["item_vocab"]).select("item_id", "item_idx")
        type_codes = F.array(*[F.lit(t) for t in conf.event_types])
        # Only a user's last max_len fresh events can enter the window (a user rebuilt from a long history must
        # not become one huge row); Spark applies this limit per group before the shuffle.
        latest = Window.partitionBy("user_id").orderBy(F.desc("ts"), F.desc("event_id"))
        cut = cut.withColumn("_rn", F.row_number().over(latest)).where(F.col("_rn") <= conf.max_len)
        fresh = cut.join(vocab, "item_id").groupBy("user_id").agg(F.array_sort(F.collect_list(F.struct(
            F.unix_micros("ts").alias("order_us"), "event_id", "item_idx", F.unix_seconds("ts").alias("ts"),
            (F.array_position(type_codes, F.col("event_type")) - 1).cast("int").alias("event_type"),
            F.col("session_ordinal").alias("session_idx"), F.col("weight").cast("float").alias("weight"))))
            .alias("_fresh"))
        old = F.coalesce(F.col("_stored"), F.array())
        # Fresh sessions are numbered after the stored ones (they start after the recompute point, so the two
        # never share a session).
        offset = F.coalesce(F.col("_next_session"), F.lit(0))
        new = F.transform(F.coalesce(F.col("_fresh"), F.array()), lambda e: F.struct(
            *[(e[c] + offset).alias(c) if c == "session_idx" else e[c].alias(c) for c in SEQUENCE_ENTRY]))
        both = F.concat(old, new)
        window = (stats.join(carried, "user_id", "left").join(fresh, "user_id", "left")
                  .withColumn("_w", F.slice(both, F.greatest(F.size(both) - conf.max_len + 1, F.lit(1)),
                                            conf.max_len)))
        # session_idx counts sessions inside the window: 0 is the oldest one the window (partly) holds. _w is
        # referenced twice, so Spark computes it once instead of once per entry.
        first = F.try_element_at("_w", F.lit(1))["session_idx"]
        arrays = {c: F.transform("_w", _field(c)) for c in SEQUENCE_ENTRY}
        arrays["session_idx"] = F.transform("_w", lambda e: e["session_idx"] - first)
        n_events = (F.col("n_before") + F.col("n_fresh")).cast("long")
        return window.select(
            "user_id", *[arrays[c].alias(c) for c in SEQUENCE_ENTRY], n_events.alias("n_events"),
            F.least("first_before", "first_fresh").alias("first_ts"),
            F.greatest("last_before", "last_fresh").alias("last_ts"),
            "user_bucket", (n_events == 0).alias("_delete"))


SEQUENCE_ENTRY = ("item_idx", "ts", "event_type", "session_idx", "weight")   # user_sequences' parallel arrays


def _stored_before(old: DataFrame) -> DataFrame:
    """Each user's stored entries before the recompute point, in order, as one array of entries, and the number
    the next session gets (computed here, below a join, so that Spark does not inline it into a per-entry lambda)."""
    entries = F.arrays_zip(*[F.col(c) for c in SEQUENCE_ENTRY])
    before = old.select("user_id", F.filter(entries, lambda e: e["ts"] < F.unix_seconds("from_ts")).alias("_stored"))
    return before.withColumn("_next_session", F.array_max(F.transform("_stored", _field("session_idx"))) + 1)


def _few(users: DataFrame, n: int) -> DataFrame:
    """Per-user frames (a row per touched user) are broadcast to the joins with stored rows when they are few enough:
    then the stored sequences and sessions are never shuffled."""
    return F.broadcast(users) if n <= BROADCAST_KEYS_MAX else users


def _field(name: str):
    return lambda e: e[name]


def _utc(micros: int) -> dt.datetime:
    """An instant from epoch microseconds collected from Spark (a collected timestamp would be naive, in the
    driver's local zone)."""
    return dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=micros)


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
    df = df.withColumn("session_ordinal", (F.sum(F.col("_new_session").cast("int")).over(running) - 1).cast("int"))
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
