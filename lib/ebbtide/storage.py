"""The storage seam: every Delta operation the pipeline needs, behind one interface, two engines.

* ``rs`` (embedded default): Spark computes and writes Parquet files into the table folder; delta-rs commits
  them (add/remove actions) in one transaction. Spark never collects table data to the driver; only file
  lists, partition values and Parquet footers cross.
* ``spark`` (cluster / Databricks): delta-spark's own writers, MERGE and readers.

Both engines create the same tables: protocol (1, 2), no table features, UTC ``timestamp`` columns, so either
engine (and any Delta reader) can read what the other wrote. Snapshots are always read from the snapshot's
active files, never by listing a folder: removed files stay on disk until VACUUM.

Concurrent writers (see README, "Concurrent writers"): a unit of work -- one operation, or a whole job inside
``storage.job(...)`` -- pins every table at the version it first saw and records which partitions it read. A
commit lands at exactly the version after the snapshot it was built on (put-if-absent of the log entry); if
another writer got there first, the versions in between are checked: one that changed a partition this unit
read before it raises `TableConflictError` and nothing is committed, else the commit is retried on top.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import math
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide import faults
from ebbtide.config import StorageConf
from ebbtide.spark import UNION_PUSHDOWN_RULES, delta_spark_available, optimizer_rules_excluded
from ebbtide.tables import TableSpec

log = logging.getLogger(__name__)

WhereValues = dict[str, list[Any]]
PartitionKey = tuple  # partition values as Delta strings, in spec.partition_by order


class StorageError(RuntimeError):
    """A Delta operation that cannot be carried out as asked; the table is left unchanged."""


class TableConflictError(StorageError):
    """A concurrent commit changed what this operation read; nothing was committed, retry the operation."""


@dataclass(frozen=True)
class AppTxn:
    """An application transaction recorded in the commit (delta-spark txnAppId/txnVersion, delta-rs Transaction)."""

    app_id: str
    version: int


@dataclass(frozen=True)
class ActiveFile:
    path: str                          # absolute path or URI, not percent-encoded (as Spark and delta-rs take it)
    rel_path: str                      # path as recorded in the Delta log
    size: int
    partition_values: dict[str, Any]
    num_records: int | None = None
    max_values: dict[str, Any] = field(default_factory=dict)   # column -> max in the file's Delta stats (UTC-aware)


@dataclass(frozen=True)
class CommitResult:
    version: int | None
    files_added: int
    files_removed: int


@dataclass
class _Pin:
    """What one unit of work has seen of one table."""

    version: int                                    # the table's version when the unit first touched it
    # partition (None: the whole table) -> the earliest version the unit read it at
    reads: dict[PartitionKey | None, int] = field(default_factory=dict)
    own: set[int] = field(default_factory=set)      # versions the unit committed itself
    checked: int = -1                               # versions up to here hold no conflicting foreign commit

    def note(self, parts: set[PartitionKey] | None, version: int) -> None:
        for part in ([None] if parts is None else parts):
            self.reads.setdefault(part, version)


@dataclass
class _Job:
    kind: str
    label: str
    pins: dict[str, _Pin] = field(default_factory=dict)   # by table location


def sql_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dt.datetime):
        return f"TIMESTAMP'{value.isoformat()}'"
    if isinstance(value, dt.date):
        return f"DATE'{value.isoformat()}'"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def where_sql(where: WhereValues) -> str:
    """{'event_date': [d1, d2]} -> "event_date IN (DATE'..', DATE'..')" (replaceWhere / MERGE pruning)."""
    if not where or any(not values for values in where.values()):
        raise ValueError(f"a replace predicate needs at least one value per column, got {where!r}")
    return " AND ".join(
        f"`{col}` IN ({', '.join(sql_literal(v) for v in values)})" for col, values in where.items())


def clustered(spec: TableSpec, df: DataFrame, shuffle: bool = True) -> DataFrame:
    """Lay rows out for writing: shuffle by partition where asked (not for rows that already sit one partition to
    a task, as rows kept from a file do), cluster by sort keys inside each file."""
    out = df.select(*spec.columns)
    if spec.max_files:
        out = out.coalesce(spec.max_files)
    if shuffle and spec.shuffle_by_partition and spec.partition_by:
        out = out.repartition(*spec.partition_by, *spec.spread_by)
    if spec.sort_by:
        out = out.sortWithinPartitions(*spec.partition_by, *spec.sort_by)
    return out


def unit_of_work(kind: str, writes: tuple[str, ...] = ()):
    """Method decorator: the method runs as one storage job (see `DeltaStorage.job`) that writes the tables named
    in `writes` (keys of `self.specs`); `self.storage` is the seam."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with self.storage.job(kind, " ".join(str(a) for a in args), [self.specs[n] for n in writes]):
                return method(self, *args, **kwargs)
        return run
    return wrap


class DeltaStorage(ABC):
    engine: str

    def __init__(self, spark: SparkSession, conf: StorageConf):
        self.spark = spark
        self.conf = conf
        self._job: _Job | None = None

    # -- addressing -------------------------------------------------------------------------------------
    def location(self, spec: TableSpec) -> str:
        """The table's absolute path or URI, not percent-encoded (a root may hold spaces or '%')."""
        root = self.conf.root
        if "://" not in root and not root.startswith("/"):
            root = os.path.abspath(root)
        return f"{root.rstrip('/')}/{spec.name}"

    # -- units of work ----------------------------------------------------------------------------------
    @contextmanager
    def job(self, kind: str, label: str = "", writes: list[TableSpec] = ()) -> Iterator[None]:
        """One job run (a sessionize date, a nightly date) as one unit of work: each table it touches is pinned at
        the version the job first saw, and every commit fails with `TableConflictError` if another writer has
        since committed to a partition the job read. The tables in `writes` are pinned whole when the job starts:
        of two overlapping jobs that write the same tables, the first to commit to a table wins it and the other
        fails there, before it commits anything more. A failed job leaves the commits it made; re-running it
        completes the work (every job is idempotent). Inside a job Spark does not push semi/anti joins into the
        per-partition branches of this class's reads (see spark.UNION_PUSHDOWN_RULES)."""
        if self._job is not None:
            raise StorageError(f"{kind} {label}: this storage object already runs {self._job.kind} "
                               f"{self._job.label}; use one storage object per concurrent job")
        self._job = _Job(kind, label)
        try:
            for spec in writes:
                # a table the job (or a concurrent one) creates is pinned before its creation, version -1
                version = self.version(spec) if self.exists(spec) else -1
                self._pin(spec, version).note(None, version)
            with optimizer_rules_excluded(self.spark, UNION_PUSHDOWN_RULES):
                yield
            faults.point(f"end:{kind}")
        finally:
            self._job = None

    def _pin(self, spec: TableSpec, version: int) -> _Pin:
        if self._job is None:
            return _Pin(version)
        return self._job.pins.setdefault(self.location(spec), _Pin(version))

    def committed_in_job(self, spec: TableSpec) -> bool:
        """Whether the running job has committed to `spec` (data or marker)."""
        pin = self._job.pins.get(self.location(spec)) if self._job else None
        return bool(pin and pin.own)

    def _own(self, spec: TableSpec, version: int) -> None:
        """Record a commit the running job made outside the write path (ensure's schema change)."""
        if self._job is not None and self.location(spec) in self._job.pins:
            self._job.pins[self.location(spec)].own.add(version)

    def _unit(self) -> str:
        return f"{self._job.kind} {self._job.label}".strip() if self._job else "this operation"

    @staticmethod
    def _partition_keys(spec: TableSpec, where: WhereValues | None) -> set[PartitionKey] | None:
        """The partitions a `where` selects (None: the whole table)."""
        if not where or not spec.partition_by or set(where) != set(spec.partition_by):
            return None
        values = [[_partition_str(v) for v in where[c]] for c in spec.partition_by]
        return set(itertools.product(*values))

    # -- operations -------------------------------------------------------------------------------------
    @abstractmethod
    def ensure(self, spec: TableSpec) -> None:
        """Create the table (schema, partitioning, properties) if missing; check an existing one matches and add
        columns the spec gained since (nullable ones only)."""

    @abstractmethod
    def exists(self, spec: TableSpec) -> bool: ...

    @abstractmethod
    def version(self, spec: TableSpec) -> int: ...

    @abstractmethod
    def read(self, spec: TableSpec, version: int | None = None, where: WhereValues | None = None) -> DataFrame:
        """The latest snapshot, or a given version, as a Spark DataFrame (read from its active files).

        `where` restricts partition columns to value lists; only the matching files are read.
        """

    @abstractmethod
    def read_matching(self, spec: TableSpec, keys: DataFrame, where: WhereValues | None = None) -> DataFrame:
        """Rows whose values in `keys.columns` appear in `keys`, from every partition (or those in `where`)."""

    @abstractmethod
    def partition_values(self, spec: TableSpec, column: str) -> list[Any]:
        """The distinct values of a partition column in the latest snapshot."""

    @abstractmethod
    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]: ...

    @abstractmethod
    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult:
        """Add rows. The partitions written count as read: a concurrent commit to them is a conflict."""

    @abstractmethod
    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        """Atomically replace the rows matching `where` (partition columns) with `df`, which must match too."""

    @abstractmethod
    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None, search: WhereValues | None = None,
              since: tuple[str, dt.datetime] | None = None) -> CommitResult:
        """Upsert by spec.keys. With delete_flag, source rows whose flag is true delete the matching row.

        The source must be unique by key. Matching rows are looked for in the partitions of the source rows plus
        those in `search` (a row that moves to another partition names its old one there). `since` = (column,
        value) promises that every row the source matches has column >= value: files whose statistics say
        otherwise are skipped (a MERGE of recent sessions does not search the whole history).
        """

    @abstractmethod
    def mark(self, spec: TableSpec, txn: AppTxn) -> CommitResult:
        """Commit only an application-transaction marker: a run that changed no row of the table records that it
        ran (runs.py reads the markers)."""

    @abstractmethod
    def delete_rows(self, spec: TableSpec, column: str, values: list[Any]) -> int:
        """Delete every row whose `column` is one of `values`, in every partition; returns the rows deleted."""

    @abstractmethod
    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult: ...

    @abstractmethod
    def optimize(self, spec: TableSpec) -> dict[str, Any]: ...

    @abstractmethod
    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        """Delete files removed from the table more than retention_hours ago, and files of writes that were never
        committed (killed jobs); returns the deleted paths.

        With enforce_retention, a retention below the table's delta.deletedFileRetentionDuration is refused
        (readers of older versions, and concurrent writers, still need those files)."""

    @abstractmethod
    def txn_version(self, spec: TableSpec, app_id: str) -> int | None: ...

    @abstractmethod
    def txn_versions(self, spec: TableSpec, app_ids: list[str], version: int | None = None) -> dict[str, int | None]:
        """The application-transaction version of each app id in the snapshot at `version` (latest by default)."""

    @abstractmethod
    def protocol(self, spec: TableSpec) -> tuple[int, int]: ...

    def version_with_marker(self, spec: TableSpec, app_id: str, txn_version: int | None) -> int:
        """The latest version whose snapshot carries `txn_version` as `app_id`'s marker (None: no marker), or -1 if
        none does or the walk reaches a version whose log entries were cleaned up (delta.logRetentionDuration).
        Walks back one snapshot at a time: meant for the few commits of a run that did not land."""
        for version in range(self.version(spec), -1, -1):
            try:
                marker = self.txn_versions(spec, [app_id], version)[app_id]
            except Exception as err:   # noqa: BLE001 - delta-rs: "No files in log segment"
                log.warning("%s: version %d cannot be loaded (%s); comparing with no version", spec.name, version,
                            str(err).splitlines()[0][:200])
                return -1
            if marker == txn_version:
                return version
        return -1

    def rows_changed_since(self, spec: TableSpec, version: int) -> tuple[DataFrame, DataFrame | None]:
        """What the commits after `version` did to the table: the rows they wrote (in the latest snapshot, not in
        the one at `version`) and the rows they took away (the other way round). The second is None when it cannot
        be told: no such version (-1). A version whose files were vacuumed fails the read (time travel)."""
        now = self.read(spec)   # first: inside a job, the table counts as read at its latest version
        if version < 0:
            return now, None
        then = self.read(spec, version=version)
        return now.exceptAll(then), then.exceptAll(now)

    # -- shared helpers ---------------------------------------------------------------------------------
    def _check_buckets(self, spec: TableSpec, configuration: dict[str, str]) -> None:
        want = spec.properties.get("ebbtide.user_buckets")
        have = configuration.get("ebbtide.user_buckets")
        if want is not None and have is not None and want != have:
            raise StorageError(
                f"table {spec.name} was created with ebbtide.user_buckets={have} but storage.user_buckets={want}; "
                "bucket count is fixed per table (rewrite the table to change it)")

    def _conflict(self, spec: TableSpec, version: int, parts: list, read_at: int, what: str) -> TableConflictError:
        shown = ", ".join("whole table" if p is None else "/".join(str(v) for v in p) for p in parts[:5])
        return TableConflictError(
            f"table {spec.name}: concurrent writer conflict. Version {version} ({what}) was committed by another "
            f"writer and changed what {self._unit()} read at version {read_at} ({shown}). Nothing was committed "
            f"to {spec.name}; tables this run committed before stay as they are. Re-run it once the other writer "
            "is done (runs are idempotent).")


# ---------------------------------------------------------------------------------------------------------
# Engine rs: Spark writes Parquet, delta-rs commits.
# ---------------------------------------------------------------------------------------------------------
class RsStorage(DeltaStorage):
    engine = "rs"

    def __init__(self, spark: SparkSession, conf: StorageConf):
        super().__init__(spark, conf)
        escape = re.search(r"%[0-9A-Fa-f]{2}", conf.root)
        if escape:
            # delta-rs 1.6 percent-decodes a local table path when it reads the log: "a%41b" would be read as
            # "aAb", another folder. Spaces, '+', non-ASCII and other '%' are fine (tested).
            raise StorageError(f"storage.root {conf.root!r} contains {escape.group()!r}, which delta-rs (engine rs) "
                               "decodes as an escape and would read tables from another folder; rename the folder")

    def _table(self, spec: TableSpec, version: int | None = None):
        from deltalake import DeltaTable

        uri = _rs_uri(self.location(spec))
        if not DeltaTable.is_deltatable(uri):
            raise StorageError(f"no Delta table {spec.name} at {self.location(spec)}; run the job that creates it "
                               "first")
        return DeltaTable(uri, version=version) if version is not None else DeltaTable(uri)

    def exists(self, spec: TableSpec) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(_rs_uri(self.location(spec)))

    def ensure(self, spec: TableSpec) -> None:
        from deltalake import DeltaTable, Schema

        path, uri = self.location(spec), _rs_uri(self.location(spec))
        if DeltaTable.is_deltatable(uri):
            table = DeltaTable(uri)
            self._check_buckets(spec, table.metadata().configuration)
            self._add_missing_columns(spec, table)
            return
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        # Spark's StructType JSON is Delta's schema serialization, so one schema serves both engines.
        DeltaTable.create(uri, schema=Schema.from_json(spec.schema.json()), mode="ignore",
                          partition_by=list(spec.partition_by) or None, name=spec.name,
                          configuration=dict(spec.properties), raise_if_key_not_exists=False)
        log.info("created Delta table %s at %s", spec.name, path)

    def _add_missing_columns(self, spec: TableSpec, table) -> None:
        from deltalake.schema import Field

        have = {f.name for f in table.schema().fields}
        missing = [f for f in spec.schema.fields if f.name not in have]
        if not missing:
            return
        if any(not f.nullable for f in missing):
            raise StorageError(f"table {spec.name} lacks required columns {[f.name for f in missing]}; "
                               "it was created by an incompatible version")
        table.alter.add_columns([Field.from_json(f.json()) for f in missing])
        self._own(spec, table.version())
        log.info("table %s: added columns %s", spec.name, [f.name for f in missing])

    def version(self, spec: TableSpec) -> int:
        return self._table(spec).version()

    def protocol(self, spec: TableSpec) -> tuple[int, int]:
        p = self._table(spec).protocol()
        return p.min_reader_version, p.min_writer_version

    def _files_of(self, spec: TableSpec, table) -> list[ActiveFile]:
        import pyarrow as pa

        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        root = self.location(spec)
        files = []
        for a in actions:
            rel = a["path"]
            files.append(ActiveFile(
                path=f"{root}/{unquote(rel)}", rel_path=rel, size=a["size_bytes"],
                partition_values={c: a.get(f"partition.{c}") for c in spec.partition_by},
                num_records=a.get("num_records"),
                max_values={k[4:]: v for k, v in a.items() if k.startswith("max.") and v is not None}))
        return files

    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]:
        return self._files_of(spec, self._table(spec, version))

    def _snapshot(self, spec: TableSpec, version: int | None, where: WhereValues | None) -> list[ActiveFile]:
        """The files of a snapshot restricted to `where`; inside a job the read is recorded for the commit check."""
        table = self._table(spec, version)
        files = self._files_of(spec, table)
        if where:
            unknown = [c for c in where if c not in spec.partition_by]
            if unknown:
                raise StorageError(f"read of {spec.name}: {unknown} are not partition columns")
            allowed = {c: {_partition_str(v) for v in values} for c, values in where.items()}
            files = [f for f in files
                     if all(_partition_str(f.partition_values[c]) in allowed[c] for c in allowed)]
        if self._job is not None:
            self._pin(spec, table.version()).note(self._partition_keys(spec, where), table.version())
        faults.point(f"read:{spec.name}")
        return files

    def read(self, spec: TableSpec, version: int | None = None, where: WhereValues | None = None) -> DataFrame:
        return self._read_files(spec, self._snapshot(spec, version, where))

    def partition_values(self, spec: TableSpec, column: str) -> list[Any]:
        return sorted({f.partition_values[column] for f in self._snapshot(spec, None, None)} - {None})

    def read_matching(self, spec: TableSpec, keys: DataFrame, where: WhereValues | None = None) -> DataFrame:
        files = self._snapshot(spec, None, where)   # keys may repeat: they are only semi-joined
        holding, matched, _ = self._key_hits(spec, files, keys)
        return self._read_files(spec, holding).join(matched, keys.columns, "left_semi")

    def _files_holding(self, spec: TableSpec, files: list[ActiveFile], keys: DataFrame) -> list[ActiveFile]:
        return self._key_hits(spec, files, keys)[0]

    def _key_hits(self, spec: TableSpec, files: list[ActiveFile],
                  keys: DataFrame) -> tuple[list[ActiveFile], DataFrame, bool]:
        """The files holding a row whose key matches `keys` on its data columns (a partition column in the key
        leaves a superset, which the callers' joins on the whole key make exact), found by a scan of those columns
        only; the keys to pick those files' rows by: the ones that matched, broadcast when few (as a rule: the
        day's redeliveries), so that the picking shuffles neither the files' rows nor all of `keys`; and whether
        they are broadcast.
        Each row carries Spark's file URI as it is; only the distinct hits are decoded, here on the driver
        (decoding it in every row, and carrying the decoded form through the join, cost 7x the scan)."""
        columns = [c for c in keys.columns if c not in spec.partition_by]
        if not files or not columns:
            return list(files), keys, False
        by_name = {_file_key(f.path): f for f in files}
        scan = (self.spark.read.schema(spec.data_schema).parquet(*[_spark_uri(f.path) for f in files])
                .select(*columns, F.col("_metadata.file_path").alias("_uri")))
        hits = scan.join(keys.select(*columns), columns, "left_semi").localCheckpoint(eager=True)
        per_file = hits.groupBy("_uri").count().collect()
        # One key for a file whatever the URI's spelling (file:/x, file:///x, /x) or escaping (percent-encoded)
        names = {unquote(re.sub(_SCHEME_RE, "", r["_uri"])) for r in per_file}
        unknown = [n for n in names if n not in by_name]
        if unknown:  # a path spelled differently than the log's: matching rows would be missed, so stop here
            raise StorageError(f"{spec.name}: cannot map scanned files {sorted(unknown)[:3]} back to the Delta log")
        matched, few = keys, False
        if len(columns) == len(keys.columns):
            few = sum(r["count"] for r in per_file) <= BROADCAST_KEYS_MAX
            matched = F.broadcast(hits.select(*columns)) if few else hits.select(*columns)
        return [by_name[n] for n in sorted(names)], matched, few

    def _read_files(self, spec: TableSpec, files: list[ActiveFile]) -> DataFrame:
        """Read exactly these files; partition values come from the Delta log, not from folder names."""
        if not files:
            return self.spark.createDataFrame([], spec.schema)
        if spec.partition_by:
            groups: dict[tuple, list[str]] = {}
            for f in files:
                groups.setdefault(tuple(f.partition_values[c] for c in spec.partition_by), []).append(f.path)
            if len(groups) <= _LITERAL_PARTITIONS_MAX:
                # Few partitions: one scan per partition with its values as literals (no per-row work).
                parts = []
                for values, paths in groups.items():
                    part = self.spark.read.schema(spec.data_schema).parquet(*[_spark_uri(p) for p in paths])
                    for col, value in zip(spec.partition_by, values):
                        part = part.withColumn(col, F.lit(value).cast(spec.schema[col].dataType))
                    parts.append(part.select(*spec.columns))
                return functools.reduce(DataFrame.unionByName, parts)
        df = self.spark.read.schema(spec.data_schema).parquet(*[_spark_uri(f.path) for f in files])
        if spec.partition_by:
            # Spark's file_path is percent-encoded ('+' stays literal, url_decode would read it as a space)
            raw = F.regexp_replace(F.regexp_replace(F.col("_metadata.file_path"), _SCHEME_RE, ""), r"\+", "%2B")
            df = df.withColumn("_file", F.url_decode(raw))
            part_schema = T.StructType([T.StructField("_file", T.StringType(), False)] + [
                T.StructField(c, spec.schema[c].dataType, True) for c in spec.partition_by])
            rows = [(_file_key(f.path), *[f.partition_values[c] for c in spec.partition_by])
                    for f in files]
            df = df.join(F.broadcast(self.spark.createDataFrame(rows, part_schema)), "_file")
        return df.select(*spec.columns)

    def rows_changed_since(self, spec: TableSpec, version: int) -> tuple[DataFrame, DataFrame | None]:
        """As the base class, comparing only the files that differ: a rewritten file's unchanged rows cancel out.
        When the files the commits replaced were vacuumed, what they took away cannot be told (None), and their
        replacements count as written whole."""
        if version < 0:
            return self.read(spec), None
        now = {f.rel_path: f for f in self.active_files(spec)}
        then = {f.rel_path: f for f in self.active_files(spec, version)}
        added = self._read_files(spec, [f for p, f in now.items() if p not in then])
        replaced = [f for p, f in then.items() if p not in now]
        if not _all_exist([f.path for f in replaced]):
            return added, None
        removed = self._read_files(spec, replaced)
        return added.exceptAll(removed), removed.exceptAll(added)

    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]:
        return self._table(spec).history(limit)

    def txn_version(self, spec: TableSpec, app_id: str) -> int | None:
        return self._table(spec).transaction_version(app_id)

    # -- writing ----------------------------------------------------------------------------------------
    def _write_files(self, spec: TableSpec, parts: list[DataFrame]) -> tuple[str, list]:
        """The parts are laid out (`clustered`) each on its own and written in one Spark job, their rows never in
        one file: a MERGE writes the rows it keeps from rewritten files apart from the rows it upserts, which keeps
        the table's layout (a file of yesterday's sessions stays one, with tight statistics, instead of growing
        into one file of the whole history). This rests on Spark's union keeping its children's partitions apart
        (4.0; test_storage checks it).
        Spark writes Parquet files into a fresh folder inside the table; returns it and delta-rs AddActions.
        A failed write removes its folder."""
        import pyarrow.parquet as pq
        from deltalake.transaction import AddAction

        folder = f"write-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        out = f"{self.location(spec)}/{folder}"
        try:
            (functools.reduce(DataFrame.union, parts).write.mode("error").partitionBy(*spec.partition_by)
                .option("maxRecordsPerFile", self.conf.max_rows_per_file).parquet(_spark_uri(out)))
            fs, base = _filesystem(out)
            adds = []
            for info in fs.get_file_info(_selector(base)):
                if info.type.name != "File":
                    continue
                name = info.base_name
                if name.startswith((".", "_")):
                    if name.endswith(".crc"):
                        fs.delete_file(info.path)  # local checksum side files: clutter vacuum would never remove
                    continue
                sub = info.path[len(base):].lstrip("/")
                partition_values = _partition_values_from(sub, spec.partition_by)
                with fs.open_input_file(info.path) as fh:
                    stats = _parquet_stats(pq.read_metadata(fh))
                # delta-rs takes the plain relative path and percent-encodes it into the log itself
                adds.append(AddAction(path=f"{folder}/{sub}", size=info.size,
                                      partition_values=partition_values,
                                      modification_time=int(info.mtime.timestamp() * 1000) if info.mtime else
                                      int(time.time() * 1000), data_change=True,
                                      stats=json.dumps(stats, allow_nan=False)))
        except Exception:
            _discard(out)
            raise
        return out, adds

    def _write_and_commit(self, spec: TableSpec, table, pin: _Pin, parts: list[DataFrame], removes: list | None = None,
                          before_commit=None, **commit_args) -> CommitResult:
        """Write the parts' files (see `clustered`) and commit them with `removes`; a write that is not committed leaves no files behind
        (unless the process is killed: vacuum removes those)."""
        out, adds = self._write_files(spec, parts)
        try:
            if before_commit:
                before_commit(adds)
            faults.point(f"write:{spec.name}")
            result = self._commit(spec, table, pin, adds + (removes or []), **commit_args)
        except Exception:
            if not self._committed(spec, adds):
                _discard(out)
            raise
        faults.point(f"commit:{spec.name}")
        return result

    def _committed(self, spec: TableSpec, adds: list) -> bool:
        if not adds:
            return False
        try:
            return adds[0].path in {unquote(f.rel_path) for f in self.active_files(spec)}
        except Exception:  # cannot tell: keep the files (vacuum removes them if they are orphans)
            return True

    def _commit(self, spec: TableSpec, table, pin: _Pin, actions: list, mode: str = "append",
                partition_filters: list | None = None, txn: AppTxn | None = None) -> CommitResult:
        """Commit at exactly the version after `table`'s snapshot (delta-rs writes the log entry put-if-absent
        with max_commit_retries=0). When another writer took that version, the commits in between are checked
        against what this unit read (`_check_foreign`); none conflicting, the commit is retried on top of them."""
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, Transaction

        props = CommitProperties(max_commit_retries=0,
                                 app_transactions=[Transaction(txn.app_id, txn.version)] if txn else None)
        self._check_foreign(spec, pin, table.version())
        for _ in range(_MAX_REBASES):
            target = table.version() + 1
            try:
                table.create_write_transaction(actions, mode=mode, schema=table.schema(),
                                               partition_by=list(spec.partition_by) or None,
                                               partition_filters=partition_filters, commit_properties=props)
                break
            except CommitFailedError as err:
                latest = self._table(spec).version()
                if latest < target:
                    raise StorageError(f"commit to {spec.name} failed: {err}; nothing was committed") from err
                self._check_foreign(spec, pin, latest)
                table.load_as_version(latest)   # nothing this unit read changed: build on the newer version
        else:
            raise TableConflictError(f"table {spec.name}: {_MAX_REBASES} other commits landed in a row while "
                                     f"{self._unit()} tried to commit; nothing was committed, re-run it")
        pin.own.add(target)
        pin.checked = target
        adds = sum(1 for a in actions if type(a).__name__ == "AddAction")
        return CommitResult(target, adds, len(actions) - adds)

    def _check_foreign(self, spec: TableSpec, pin: _Pin, upto: int) -> None:
        """Raise TableConflictError if a version in (pin, upto] that this unit did not commit changed a partition
        the unit read before that version."""
        for version in range(max(pin.version, pin.checked) + 1, upto + 1):
            if version in pin.own:
                continue
            changed, what = self._changes(spec, version)
            if version == 0 and changed == set():   # the empty creation of a table the unit found missing
                continue
            hits = [(p, at) for p, at in pin.reads.items()
                    if at < version and (changed is None or p is None or p in changed)]
            if hits:
                raise self._conflict(spec, version, [p for p, _ in hits], min(at for _, at in hits), what)
        pin.checked = max(pin.checked, upto)

    def _changes(self, spec: TableSpec, version: int) -> tuple[set[PartitionKey] | None, str]:
        """Partitions whose files commit `version` added or removed (None: the whole table, e.g. a schema or
        protocol change), and its operation; from the snapshots before and after it."""
        from deltalake import DeltaTable

        uri = _rs_uri(self.location(spec))
        try:
            # version 0 creates the table, possibly while a job that found none was running (pinned at -1)
            before = DeltaTable(uri, version=version - 1) if version > 0 else None
            after = DeltaTable(uri, version=version)
        except Exception as err:  # log entries cleaned up: cannot prove there is no conflict
            return None, f"unreadable: {err}"
        commit = (after.history(1) or [{}])[0]
        what = f"{commit.get('operation', '?')} at {commit.get('timestamp', '?')}"

        def shape(t):
            m, p = t.metadata(), t.protocol()
            return (t.schema().to_json(), tuple(m.partition_columns), sorted(m.configuration.items()),
                    p.min_reader_version, p.min_writer_version)
        if before is not None and shape(before) != shape(after):
            return None, what
        old = {f.rel_path: f for f in self._files_of(spec, before)} if before is not None else {}
        new = {f.rel_path: f for f in self._files_of(spec, after)}
        changed = [old[p] for p in old.keys() - new.keys()] + [new[p] for p in new.keys() - old.keys()]
        if not spec.partition_by:
            return (None if changed else set()), what
        return {_partition_key(spec, f.partition_values) for f in changed}, what

    def _begin(self, spec: TableSpec, parts: set[PartitionKey] | None):
        """The latest snapshot for an operation that reads `parts`, and the unit's pin of the table."""
        table = self._table(spec)
        pin = self._pin(spec, table.version())
        pin.note(parts if spec.partition_by else None, table.version())
        return table, pin

    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult:
        table = self._table(spec)
        pin = self._pin(spec, table.version())

        def note_written(adds):  # the partitions written count as read, as of the snapshot loaded above
            parts = {_partition_key(spec, a.partition_values) for a in adds} if spec.partition_by else None
            pin.note(parts, table.version())
        return self._write_and_commit(spec, table, pin, [clustered(spec, df)], before_commit=note_written, txn=txn)

    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        unknown = [c for c in where if c not in spec.partition_by]
        if unknown:
            raise StorageError(f"engine rs replaces whole partitions only; {unknown} are not partition columns "
                               f"of {spec.name} ({list(spec.partition_by)})")
        where_sql(where)  # validates non-empty
        allowed = {c: {_partition_str(v) for v in vals} for c, vals in where.items()}
        table, pin = self._begin(spec, self._partition_keys(spec, where))

        def inside(adds):
            stray = [a.path for a in adds if any(a.partition_values.get(c) not in allowed[c] for c in allowed)]
            if stray:
                raise StorageError(f"replace_where on {spec.name}: rows outside {where_sql(where)} in {stray[:3]}; "
                                   "nothing was committed")
        filters = [(c, "in", sorted(vals)) for c, vals in allowed.items()]
        before = [f for f in self._files_of(spec, table)
                  if all(_partition_str(f.partition_values[c]) in allowed[c] for c in allowed)]
        result = self._write_and_commit(spec, table, pin, [clustered(spec, df)], before_commit=inside, mode="overwrite",
                                        partition_filters=filters, txn=txn)
        return CommitResult(result.version, result.files_added, len(before))

    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None, search: WhereValues | None = None,
              since: tuple[str, dt.datetime] | None = None) -> CommitResult:
        """Copy-on-write MERGE, the way Delta does it: find the files holding matched keys, rewrite only them.

        Inserted rows go to new files; files without a matched key are neither read in full nor rewritten.
        """
        if not spec.keys:
            raise StorageError(f"table {spec.name} has no merge key")
        keys = list(spec.keys)
        src = source.persist()
        try:
            searched = None
            if spec.partition_by:
                searched = {_partition_key(spec, r.asDict())
                            for r in src.select(*spec.partition_by).distinct().collect()}
                searched |= self._partition_keys(spec, search) or set()
            table, pin = self._begin(spec, searched)   # the snapshot this merge reads; the commit is checked against it
            candidates = self._files_of(spec, table)
            if spec.partition_by:
                candidates = [f for f in candidates if _partition_key(spec, f.partition_values) in searched]
            if since:
                column, value = since
                candidates = [f for f in candidates if f.max_values.get(column) is None
                              or f.max_values[column] >= value]
            # The files' rows whose key matched are the ones replaced: the matched keys are few as a rule, and then
            # broadcast, so the rows the files keep are not shuffled
            touched, matched, few = self._key_hits(spec, candidates, src.select(*keys))
            upserts = src if delete_flag is None else src.filter(~F.coalesce(F.col(delete_flag), F.lit(False)))
            parts = [clustered(spec, upserts)]
            if touched:   # the rows these files keep are written apart from the upserts (see `_write_files`)
                kept = self._read_files(spec, touched).join(matched, keys, "left_anti")
                # past a broadcast join, the kept rows are still one partition to a task: no shuffle to lay them out
                parts.append(clustered(spec, kept, shuffle=not few))
            result = self._write_and_commit(spec, table, pin, parts, _removes(spec, touched), txn=txn)
            log.info("merge %s: %d files rewritten, %d files added", spec.name, len(touched), result.files_added)
            return result
        finally:
            src.unpersist()

    def delete_rows(self, spec: TableSpec, column: str, values: list[Any]) -> int:
        keys = self.spark.createDataFrame([(v,) for v in sorted(set(values))], T.StructType(
            [T.StructField(column, spec.schema[column].dataType, False)]))
        table, pin = self._begin(spec, None)   # every partition is searched, so any concurrent commit conflicts
        touched = self._files_holding(spec, self._files_of(spec, table), keys)
        if not touched:
            return 0
        rows = self._read_files(spec, touched).persist()
        try:
            deleted = rows.join(keys, column, "left_semi").count()
            self._write_and_commit(spec, table, pin, [clustered(spec, rows.join(keys, column, "left_anti"))],
                                   _removes(spec, touched))
        finally:
            rows.unpersist()
        return deleted

    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult:
        table, pin = self._begin(spec, None)
        self._check_foreign(spec, pin, table.version())
        metrics = table.delete(predicate)
        pin.own.add(table.version())
        return CommitResult(table.version(), metrics.get("num_added_files", 0), metrics.get("num_removed_files", 0))

    def mark(self, spec: TableSpec, txn: AppTxn) -> CommitResult:
        table, pin = self._begin(spec, set())
        result = self._commit(spec, table, pin, [], txn=txn)
        faults.point(f"commit:{spec.name}")
        return result

    def optimize(self, spec: TableSpec) -> dict[str, Any]:
        return self._table(spec).optimize.compact()

    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        """Removed files older than the retention (lite vacuum), then files no commit ever referenced -- writes
        of killed jobs -- once older than max(retention, ORPHAN_MIN_AGE_HOURS), so that a concurrent writer's
        files, written but not yet committed, are never deleted (full vacuum); then empty write folders."""
        hours = self.conf.vacuum_retention_hours if retention_hours is None else retention_hours
        table = self._table(spec)
        try:
            removed = table.vacuum(retention_hours=hours, dry_run=False, enforce_retention_duration=enforce_retention)
        except Exception as err:  # delta-rs raises a generic DeltaError for the retention check
            if "retention" in str(err).lower():
                raise StorageError(f"vacuum {spec.name}: {err}") from None
            raise
        # the retention check passed above (or is off), and the orphans' age is at least that retention
        removed += table.vacuum(retention_hours=max(hours, ORPHAN_MIN_AGE_HOURS), dry_run=False,
                                enforce_retention_duration=False, full=True)
        _remove_empty_write_folders(self.location(spec))
        return removed

    def txn_versions(self, spec: TableSpec, app_ids: list[str], version: int | None = None) -> dict[str, int | None]:
        table = self._table(spec, version)   # one snapshot load; the lookups are in memory
        return {app_id: table.transaction_version(app_id) for app_id in app_ids}


def _all_exist(paths: list[str]) -> bool:
    """Whether every one of these files is still there (False when that cannot be told)."""
    if not paths:
        return True
    try:
        from pyarrow.fs import FileType

        filesystem, _ = _filesystem(paths[0])
        infos = filesystem.get_file_info([_filesystem(p)[1] for p in paths])
        return all(info.type != FileType.NotFound for info in infos)
    except Exception:
        return False


def _removes(spec: TableSpec, files: list[ActiveFile]) -> list:
    from deltalake.transaction import RemoveAction

    now_ms = int(time.time() * 1000)
    # delta-rs takes the plain path (it encodes it); the log's encoded form would remove nothing
    return [RemoveAction(path=unquote(f.rel_path), data_change=True, deletion_timestamp=now_ms, size=f.size,
                         partition_values={c: _partition_str(v) for c, v in f.partition_values.items()})
            for f in files]


# ---------------------------------------------------------------------------------------------------------
# Engine spark: delta-spark (cluster, Databricks).
# ---------------------------------------------------------------------------------------------------------
class SparkDeltaStorage(DeltaStorage):
    """delta-spark mirror of the rs contract. Delta's own optimistic concurrency checks each MERGE / replaceWhere
    against its read predicate; a job's pins add the check across a whole run at table granularity (the rs engine
    checks partitions). Not runnable here (no Delta jars): see README, "What is verified where"."""

    engine = "spark"

    def _name(self, spec: TableSpec) -> str | None:
        if self.conf.catalog:
            return f"{self.conf.catalog}.{self.conf.schema_name}.{spec.name}"
        return None

    def _delta_table(self, spec: TableSpec):
        from delta.tables import DeltaTable

        name = self._name(spec)
        return (DeltaTable.forName(self.spark, name) if name
                else DeltaTable.forPath(self.spark, self.location(spec)))

    def exists(self, spec: TableSpec) -> bool:
        from delta.tables import DeltaTable

        name = self._name(spec)
        if name:
            return self.spark.catalog.tableExists(name)
        return DeltaTable.isDeltaTable(self.spark, self.location(spec))

    def _sql_name(self, spec: TableSpec) -> str:
        return self._name(spec) or f"delta.`{self.location(spec)}`"

    def ensure(self, spec: TableSpec) -> None:
        from delta.tables import DeltaTable

        if self.exists(spec):
            self._check_buckets(spec, self._detail(spec).get("properties") or {})
            have = set(self.read(spec).columns)
            missing = [f for f in spec.schema.fields if f.name not in have]
            if missing:
                cols = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
                self.spark.sql(f"ALTER TABLE {self._sql_name(spec)} ADD COLUMNS ({cols})")
                self._own(spec, self.version(spec))
            return
        builder = DeltaTable.createIfNotExists(self.spark)
        name = self._name(spec)
        builder = builder.tableName(name) if name else builder.location(self.location(spec))
        builder = builder.addColumns(spec.schema)
        if spec.partition_by:
            builder = builder.partitionedBy(*spec.partition_by)
        for key, value in spec.properties.items():
            builder = builder.property(key, value)
        builder.execute()

    def _detail(self, spec: TableSpec) -> dict[str, Any]:
        return self._delta_table(spec).detail().collect()[0].asDict()

    def version(self, spec: TableSpec) -> int:
        return int(self._delta_table(spec).history(1).collect()[0]["version"])

    def protocol(self, spec: TableSpec) -> tuple[int, int]:
        detail = self._detail(spec)
        return int(detail["minReaderVersion"]), int(detail["minWriterVersion"])

    def read(self, spec: TableSpec, version: int | None = None, where: WhereValues | None = None) -> DataFrame:
        if self._job is not None:
            seen = self.version(spec) if version is None else version
            self._pin(spec, seen).note(None, seen)
        faults.point(f"read:{spec.name}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        name = self._name(spec)
        df = (reader.table(name) if name else reader.load(self.location(spec))).select(*spec.columns)
        return df.where(where_sql(where)) if where else df  # Delta prunes partitions from the predicate

    def read_matching(self, spec: TableSpec, keys: DataFrame, where: WhereValues | None = None) -> DataFrame:
        return self.read(spec, where=where).join(keys.distinct(), keys.columns, "left_semi")

    def partition_values(self, spec: TableSpec, column: str) -> list[Any]:
        return sorted(r[0] for r in self.read(spec).select(column).distinct().collect() if r[0] is not None)

    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]:
        # inputFiles() comes from Delta's snapshot file index: the active files of that version only.
        return [ActiveFile(path=p, rel_path=p, size=-1, partition_values={})
                for p in self.read(spec, version).inputFiles()]

    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self._delta_table(spec).history(limit) if limit else self._delta_table(spec).history()
        return [r.asDict(recursive=True) for r in rows.collect()]

    # -- writing: every write goes through _write (pin check, conflict translation, fault points) -----------
    def _write(self, spec: TableSpec, action) -> CommitResult:
        latest = self.version(spec)
        pin = self._pin(spec, latest)
        # version 0 is ensure's creation of the empty table (a job that found no table pinned it at -1)
        foreign = [v for v in range(max(pin.version, pin.checked, 0) + 1, latest + 1) if v not in pin.own]
        if foreign and pin.reads:
            raise self._conflict(spec, foreign[0], [None], min(pin.reads.values()), "see DESCRIBE HISTORY")
        faults.point(f"write:{spec.name}")
        try:
            action()
        except Exception as err:
            if "Concurrent" in type(err).__name__ or "ConcurrentModificationException" in str(err)[:2000]:
                raise self._conflict(spec, latest + 1, [None], latest, type(err).__name__) from err
            raise
        last = self.history(spec, 1)[0]
        pin.own.add(int(last["version"]))
        pin.checked = int(last["version"])
        faults.point(f"commit:{spec.name}")
        metrics = last.get("operationMetrics") or {}
        added = metrics.get("numFiles", metrics.get("numAddedFiles", metrics.get("numTargetFilesAdded", 0)))
        removed = metrics.get("numRemovedFiles", metrics.get("numTargetFilesRemoved", 0))
        return CommitResult(int(last["version"]), int(added), int(removed))

    def _writer(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None):
        writer = clustered(spec, df).write.format("delta").option("maxRecordsPerFile", self.conf.max_rows_per_file)
        if txn:
            writer = writer.option("txnAppId", txn.app_id).option("txnVersion", txn.version)
        return writer

    def _save(self, spec: TableSpec, writer) -> None:
        name = self._name(spec)
        if name:
            writer.saveAsTable(name)
        else:
            writer.save(self.location(spec))

    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult:
        return self._write(spec, lambda: self._save(spec, self._writer(spec, df, txn).mode("append")))

    def mark(self, spec: TableSpec, txn: AppTxn) -> CommitResult:
        return self.append(spec, self.spark.createDataFrame([], spec.schema), txn)   # commits the txn action only

    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        writer = self._writer(spec, df, txn).mode("overwrite").option("replaceWhere", where_sql(where))
        return self._write(spec, lambda: self._save(spec, writer))

    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None, search: WhereValues | None = None,
              since: tuple[str, dt.datetime] | None = None) -> CommitResult:
        src = source.persist()
        try:
            cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.keys)
            if since:   # Delta's data skipping then leaves older files out of the search
                cond += f" AND t.`{since[0]}` >= {sql_literal(since[1])}"
            if spec.partition_by:  # explicit partition pruning: Delta reads only the touched partitions
                parts = src.select(*spec.partition_by).distinct().collect()
                for col in spec.partition_by:
                    values = sorted({r[col] for r in parts if r[col] is not None} | set((search or {}).get(col, [])))
                    if values:
                        cond += f" AND t.`{col}` IN ({', '.join(sql_literal(v) for v in values)})"
            values = {c: f"s.`{c}`" for c in spec.columns}
            builder = self._delta_table(spec).alias("t").merge(src.alias("s"), cond)
            if delete_flag:
                builder = (builder.whenMatchedDelete(condition=f"s.`{delete_flag}`")
                           .whenMatchedUpdate(set=values)
                           .whenNotMatchedInsert(condition=f"NOT s.`{delete_flag}`", values=values))
            else:
                builder = builder.whenMatchedUpdate(set=values).whenNotMatchedInsert(values=values)
            return self._write(spec, lambda: self._with_txn(txn, builder.execute))
        finally:
            src.unpersist()

    def _with_txn(self, txn: AppTxn | None, action) -> None:
        if txn:
            self.spark.conf.set("spark.databricks.delta.write.txnAppId", txn.app_id)
            self.spark.conf.set("spark.databricks.delta.write.txnVersion", str(txn.version))
        try:
            action()
        finally:
            if txn:
                self.spark.conf.unset("spark.databricks.delta.write.txnAppId")
                self.spark.conf.unset("spark.databricks.delta.write.txnVersion")

    def delete_rows(self, spec: TableSpec, column: str, values: list[Any]) -> int:
        if not values:
            return 0
        cond = F.col(column).isin(sorted(set(values)))
        self._write(spec, lambda: self._delta_table(spec).delete(cond))
        metrics = self.history(spec, 1)[0].get("operationMetrics") or {}
        return int(metrics.get("numDeletedRows", 0))

    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult:
        return self._write(spec, lambda: self._delta_table(spec).delete(predicate))

    def optimize(self, spec: TableSpec) -> dict[str, Any]:
        rows = self._delta_table(spec).optimize().executeCompaction().collect()
        return rows[0].asDict(recursive=True) if rows else {}

    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        """DeltaTable.vacuum() returns nothing, so the files are listed first with VACUUM ... DRY RUN (the same
        retention rule), then deleted; delta-spark's retentionDurationCheck stays on unless told otherwise.
        delta-spark's VACUUM also deletes written-but-never-committed files of killed writers, under the same
        retention, so it never goes below ORPHAN_MIN_AGE_HOURS (a concurrent writer's files are not yet committed)."""
        asked = self.conf.vacuum_retention_hours if retention_hours is None else retention_hours
        hours = max(asked, ORPHAN_MIN_AGE_HOURS)
        target = f"{self._name(spec)}" if self._name(spec) else f"delta.`{self.location(spec)}`"
        check = "spark.databricks.delta.retentionDurationCheck.enabled"
        if not enforce_retention:
            self.spark.conf.set(check, "false")
        try:
            listed = [r[0] for r in self.spark.sql(f"VACUUM {target} RETAIN {float(hours)} HOURS DRY RUN").collect()]
            self._delta_table(spec).vacuum(float(hours))
        finally:
            if not enforce_retention:
                self.spark.conf.unset(check)
        return listed

    def txn_versions(self, spec: TableSpec, app_ids: list[str], version: int | None = None) -> dict[str, int | None]:
        # Like txn_version, from the log read as data; commits and checkpoints after `version` are left out.
        log_dir = f"{self._detail(spec)['location'].rstrip('/')}/_delta_log"
        found: dict[str, int | None] = dict.fromkeys(app_ids)
        file_version = F.regexp_extract(F.col("_metadata.file_path"), r"(\d{20})\.[a-z.0-9]*(json|parquet)$", 1)
        for fmt, pattern in (("json", "*.json"), ("parquet", "*.checkpoint*.parquet")):
            try:
                df = self.spark.read.format(fmt).load(f"{log_dir}/{pattern}")
            except Exception:  # no checkpoint yet
                continue
            if "txn" not in df.columns:
                continue
            if version is not None:
                df = df.where(file_version.cast("long") <= version)
            rows = (df.where(F.col("txn.appId").isin(app_ids)).groupBy("txn.appId")
                    .agg(F.max("txn.version").alias("v")).collect())
            for app_id, v in rows:
                found[app_id] = v if found[app_id] is None else max(found[app_id], v)
        return found

    def txn_version(self, spec: TableSpec, app_id: str) -> int | None:
        # delta-spark has no public reader for SetTransaction actions; they live in the log (JSON commits
        # and checkpoints), which is small and is read here as data, not as the table.
        log_dir = f"{self._detail(spec)['location'].rstrip('/')}/_delta_log"
        found: list[int] = []
        for fmt, pattern in (("json", "*.json"), ("parquet", "*.checkpoint*.parquet")):
            try:
                df = self.spark.read.format(fmt).load(f"{log_dir}/{pattern}")
            except Exception:  # no checkpoint yet
                continue
            if "txn" in df.columns:
                found += [r[0] for r in df.where(F.col("txn.appId") == app_id)
                          .select(F.max("txn.version")).collect() if r[0] is not None]
        return max(found) if found else None


# ---------------------------------------------------------------------------------------------------------
def open_storage(spark: SparkSession, conf: StorageConf) -> DeltaStorage:
    engine = conf.engine
    if engine == "auto":
        engine = "spark" if delta_spark_available(spark) else "rs"
    if engine == "spark" and not delta_spark_available(spark):
        raise StorageError(
            "storage.engine=spark needs delta-spark on the JVM classpath: spark-submit --packages "
            "io.delta:delta-spark_2.13:4.0.1 with spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension "
            "and spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog "
            "(or set storage.engine=rs / auto)")
    log.info("storage engine: %s", engine)
    return SparkDeltaStorage(spark, conf) if engine == "spark" else RsStorage(spark, conf)


# ---------------------------------------------------------------------------------------------------------
_SCHEME_RE = r"^[a-zA-Z][a-zA-Z0-9+.-]*:/*|^/+"
# Above this many partitions in one read, partition values are attached by a broadcast join on the file path.
_LITERAL_PARTITIONS_MAX = 64
BROADCAST_KEYS_MAX = 1_000_000   # matched keys broadcast to pick rows from the files holding them (~40 MB)
# A commit retried on top of this many newer versions in a row gives up (each retry re-checks for conflicts).
_MAX_REBASES = 20
# Files no commit references are deleted by vacuum only once this old, whatever retention is asked for: a
# concurrent writer's files are on disk before its commit, for as long as its write takes.
ORPHAN_MIN_AGE_HOURS = 24


def _file_key(path: str) -> str:
    return re.sub(_SCHEME_RE, "", path)


def _spark_uri(path: str) -> str:
    """A path for Spark/Hadoop: unescaped, with a scheme (Hadoop's Path escapes ' ' and '%' itself)."""
    return f"file://{path}" if path.startswith("/") else path


def _rs_uri(path: str) -> str:
    """A table location for delta-rs, which reads its argument as a URL: '%20' in a folder name must be '%2520'."""
    return "file://" + quote(path) if path.startswith("/") else quote(path, safe=":/@")


def _filesystem(path: str):
    """(pyarrow filesystem, path inside it) for an unescaped local path or URI."""
    import pyarrow.fs as pafs

    if path.startswith("/"):
        return pafs.LocalFileSystem(), path
    return pafs.FileSystem.from_uri(quote(path, safe=":/@"))


def _selector(base: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(base, recursive=True, allow_not_found=True)


def _discard(folder: str) -> None:
    """Remove the files of a write that was not committed (best effort: vacuum removes what is left)."""
    try:
        fs, base = _filesystem(folder)
        fs.delete_dir(base)
        log.info("removed uncommitted write folder %s", folder)
    except FileNotFoundError:
        pass
    except Exception as err:
        log.warning("could not remove uncommitted write folder %s (%s); `ebbtide maintain --vacuum` will", folder,
                    err)


def _remove_empty_write_folders(location: str) -> None:
    """Object stores have no folders; a local table keeps empty write-*/ trees after vacuum: drop them."""
    if not location.startswith("/") or not os.path.isdir(location):
        return
    for name in os.listdir(location):
        top = os.path.join(location, name)
        if not (name.startswith("write-") and os.path.isdir(top)):
            continue
        for root, _, _ in os.walk(top, topdown=False):   # bottom-up: rmdir only succeeds on empty folders
            try:
                os.rmdir(root)
            except OSError:
                pass


def _partition_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def _partition_key(spec: TableSpec, values: dict[str, Any]) -> PartitionKey:
    return tuple(_partition_str(values.get(c)) for c in spec.partition_by)


def _partition_values_from(sub_path: str, partition_by: tuple[str, ...]) -> dict[str, str | None]:
    """Spark's hive-style folders col=value of a file we just wrote -> Delta partitionValues strings."""
    found = {}
    for segment in sub_path.split("/")[:-1]:
        if "=" in segment:
            key, value = segment.split("=", 1)
            value = unquote(value)
            found[key] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    missing = [c for c in partition_by if c not in found]
    if missing:
        raise StorageError(f"written file {sub_path} lacks partition folders for {missing}")
    return {c: found[c] for c in partition_by}


def _stat_value(value: Any, round_up: bool = False) -> Any:
    """A footer min/max as Delta writes it; timestamps have millisecond precision, so a max is rounded up."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        value = value.astimezone(dt.timezone.utc)
        if round_up and value.microsecond % 1000:
            value += dt.timedelta(microseconds=1000 - value.microsecond % 1000)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("non-finite statistic")  # JSON has no Infinity / NaN
    if isinstance(value, (bytes, bytearray)):
        raise ValueError("binary statistic")       # Delta keeps no min/max for binary columns
    return value


def _parquet_stats(meta) -> dict[str, Any]:
    """Delta file statistics from the Parquet footer: numRecords, and per top-level primitive column nullCount and
    min/max. A column gets min/max only when every row group holding values has them (writers omit them for long
    values), they decode (strings must be UTF-8) and they are finite: a missing statistic only costs data
    skipping, a wrong one (a max below a value in the file) would make readers skip rows."""
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    schema = meta.schema
    for i in range(len(schema)):
        name = schema.column(i).path
        if "." in name:  # nested (arrays) have dotted paths; Delta keeps no min/max for them
            continue
        nulls, lows, highs, min_max_ok = 0, [], [], True
        for rg in range(meta.num_row_groups):
            chunk = meta.row_group(rg).column(i)
            st = chunk.statistics
            if st is None or not st.has_null_count:
                nulls = None
                break
            nulls += st.null_count
            if not st.has_min_max:
                min_max_ok = min_max_ok and chunk.num_values == st.null_count   # all-null groups have none
                continue
            try:
                lows.append(st.min)
                highs.append(st.max)
            except (UnicodeDecodeError, ValueError):
                min_max_ok = False
        if nulls is None:
            continue
        stats["nullCount"][name] = nulls
        if not (min_max_ok and lows) or any(isinstance(v, float) and not math.isfinite(v) for v in lows + highs):
            continue
        try:
            low, high = _stat_value(min(lows)), _stat_value(max(highs), round_up=True)
        except (ValueError, TypeError):
            continue
        stats["minValues"][name], stats["maxValues"][name] = low, high
    return stats
