"""The storage seam: every Delta operation the pipeline needs, behind one interface, two engines.

* ``rs`` (embedded default): Spark computes and writes Parquet files into the table folder; delta-rs commits
  them (add/remove actions) in one transaction. Spark never collects table data to the driver; only file
  lists, partition values and Parquet footers cross.
* ``spark`` (cluster / Databricks): delta-spark's own writers, MERGE and readers.

Both engines create the same tables: protocol (1, 2), no table features, UTC ``timestamp`` columns, so either
engine (and any Delta reader) can read what the other wrote. Snapshots are always read from the snapshot's
active files, never by listing a folder: removed files stay on disk until VACUUM.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide.config import StorageConf
from ebbtide.spark import delta_spark_available
from ebbtide.tables import TableSpec

log = logging.getLogger(__name__)

WhereValues = dict[str, list[Any]]


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
    path: str                          # absolute URI or path, readable by Spark
    rel_path: str                      # path as recorded in the Delta log
    size: int
    partition_values: dict[str, Any]
    num_records: int | None = None


@dataclass(frozen=True)
class CommitResult:
    version: int | None
    files_added: int
    files_removed: int


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


def clustered(spec: TableSpec, df: DataFrame) -> DataFrame:
    """Lay rows out for writing: shuffle by partition where asked, cluster by sort keys inside each file."""
    out = df.select(*spec.columns)
    if spec.max_files:
        out = out.coalesce(spec.max_files)
    if spec.shuffle_by_partition and spec.partition_by:
        out = out.repartition(*spec.partition_by)
    if spec.sort_by:
        out = out.sortWithinPartitions(*spec.partition_by, *spec.sort_by)
    return out


class DeltaStorage(ABC):
    engine: str

    def __init__(self, spark: SparkSession, conf: StorageConf):
        self.spark = spark
        self.conf = conf

    # -- addressing -------------------------------------------------------------------------------------
    def location(self, spec: TableSpec) -> str:
        root = self.conf.root
        if "://" not in root and not root.startswith("/"):
            root = os.path.abspath(root)
        return f"{root.rstrip('/')}/{spec.name}"

    # -- operations -------------------------------------------------------------------------------------
    @abstractmethod
    def ensure(self, spec: TableSpec) -> None:
        """Create the table (schema, partitioning, properties) if missing; check an existing one matches."""

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
    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]: ...

    @abstractmethod
    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult: ...

    @abstractmethod
    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        """Atomically replace the rows matching `where` (partition columns) with `df`, which must match too."""

    @abstractmethod
    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None) -> CommitResult:
        """Upsert by spec.keys. With delete_flag, source rows whose flag is true delete the matching row.

        The source must be unique by key. Its partition-column values restrict which files are read.
        """

    @abstractmethod
    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult: ...

    @abstractmethod
    def optimize(self, spec: TableSpec) -> dict[str, Any]: ...

    @abstractmethod
    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        """Delete files removed from the table more than retention_hours ago; returns the deleted paths.

        With enforce_retention, a retention below the table's delta.deletedFileRetentionDuration is refused
        (readers of older versions, and concurrent writers, still need those files)."""

    @abstractmethod
    def txn_version(self, spec: TableSpec, app_id: str) -> int | None: ...

    @abstractmethod
    def txn_versions(self, spec: TableSpec, app_ids: list[str], version: int | None = None) -> dict[str, int | None]:
        """The application-transaction version of each app id in the snapshot at `version` (latest by default)."""

    @abstractmethod
    def protocol(self, spec: TableSpec) -> tuple[int, int]: ...

    # -- shared helpers ---------------------------------------------------------------------------------
    def _check_buckets(self, spec: TableSpec, configuration: dict[str, str]) -> None:
        want = spec.properties.get("ebbtide.user_buckets")
        have = configuration.get("ebbtide.user_buckets")
        if want is not None and have is not None and want != have:
            raise StorageError(
                f"table {spec.name} was created with ebbtide.user_buckets={have} but storage.user_buckets={want}; "
                "bucket count is fixed per table (rewrite the table to change it)")


# ---------------------------------------------------------------------------------------------------------
# Engine rs: Spark writes Parquet, delta-rs commits.
# ---------------------------------------------------------------------------------------------------------
class RsStorage(DeltaStorage):
    engine = "rs"

    def _table(self, spec: TableSpec, version: int | None = None):
        from deltalake import DeltaTable

        path = self.location(spec)
        if not DeltaTable.is_deltatable(path):
            raise StorageError(f"no Delta table {spec.name} at {path}; run the job that creates it first")
        return DeltaTable(path, version=version) if version is not None else DeltaTable(path)

    def exists(self, spec: TableSpec) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.location(spec))

    def ensure(self, spec: TableSpec) -> None:
        from deltalake import DeltaTable, Schema

        path = self.location(spec)
        if DeltaTable.is_deltatable(path):
            self._check_buckets(spec, DeltaTable(path).metadata().configuration)
            return
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        # Spark's StructType JSON is Delta's schema serialization, so one schema serves both engines.
        DeltaTable.create(path, schema=Schema.from_json(spec.schema.json()), mode="ignore",
                          partition_by=list(spec.partition_by) or None, name=spec.name,
                          configuration=dict(spec.properties), raise_if_key_not_exists=False)
        log.info("created Delta table %s at %s", spec.name, path)

    def version(self, spec: TableSpec) -> int:
        return self._table(spec).version()

    def protocol(self, spec: TableSpec) -> tuple[int, int]:
        p = self._table(spec).protocol()
        return p.min_reader_version, p.min_writer_version

    def _files_of(self, spec: TableSpec, table) -> list[ActiveFile]:
        import pyarrow as pa

        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        root = table.table_uri.rstrip("/")
        files = []
        for a in actions:
            rel = a["path"]
            files.append(ActiveFile(
                path=f"{root}/{unquote(rel)}", rel_path=rel, size=a["size_bytes"],
                partition_values={c: a.get(f"partition.{c}") for c in spec.partition_by},
                num_records=a.get("num_records")))
        return files

    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]:
        return self._files_of(spec, self._table(spec, version))

    def read(self, spec: TableSpec, version: int | None = None, where: WhereValues | None = None) -> DataFrame:
        files = self.active_files(spec, version)
        if where:
            unknown = [c for c in where if c not in spec.partition_by]
            if unknown:
                raise StorageError(f"read of {spec.name}: {unknown} are not partition columns")
            allowed = {c: {_partition_str(v) for v in values} for c, values in where.items()}
            files = [f for f in files
                     if all(_partition_str(f.partition_values[c]) in allowed[c] for c in allowed)]
        return self._read_files(spec, files)

    def _read_files(self, spec: TableSpec, files: list[ActiveFile], with_file: bool = False) -> DataFrame:
        """Read exactly these files; partition values come from the Delta log, not from folder names."""
        if not files:
            empty = self.spark.createDataFrame([], spec.schema)
            return empty.withColumn("_file", F.lit(None).cast("string")) if with_file else empty
        if spec.partition_by and not with_file:
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
        # One key for a file whatever the URI spelling (file:/x, file:///x, /x): the path without its scheme.
        df = df.withColumn("_file", F.regexp_replace(F.col("_metadata.file_path"), _SCHEME_RE, ""))
        if spec.partition_by:
            part_schema = T.StructType([T.StructField("_file", T.StringType(), False)] + [
                T.StructField(c, spec.schema[c].dataType, True) for c in spec.partition_by])
            rows = [(_file_key(f.path), *[f.partition_values[c] for c in spec.partition_by])
                    for f in files]
            df = df.join(F.broadcast(self.spark.createDataFrame(rows, part_schema)), "_file")
        cols = spec.columns + (["_file"] if with_file else [])
        return df.select(*cols)

    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]:
        return self._table(spec).history(limit)

    def txn_version(self, spec: TableSpec, app_id: str) -> int | None:
        return self._table(spec).transaction_version(app_id)

    # -- writing ----------------------------------------------------------------------------------------
    def _write_files(self, spec: TableSpec, table, df: DataFrame) -> list:
        """Spark writes Parquet files into a fresh folder inside the table; returns delta-rs AddActions."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
        from deltalake.transaction import AddAction

        folder = f"write-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        root = table.table_uri.rstrip("/")
        out = f"{root}/{folder}"
        (clustered(spec, df).write.mode("error").partitionBy(*spec.partition_by)
            .option("maxRecordsPerFile", self.conf.max_rows_per_file).parquet(_spark_uri(out)))
        fs, base = pafs.FileSystem.from_uri(_spark_uri(out))
        adds = []
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
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
            adds.append(AddAction(path=f"{folder}/{sub}", size=info.size, partition_values=partition_values,
                                  modification_time=int(info.mtime.timestamp() * 1000) if info.mtime else
                                  int(time.time() * 1000), data_change=True, stats=json.dumps(stats)))
        return adds

    def _commit(self, spec: TableSpec, table, actions: list, mode: str = "append",
                partition_filters: list | None = None, txn: AppTxn | None = None) -> CommitResult:
        from deltalake.exceptions import CommitFailedError
        from deltalake.transaction import CommitProperties, Transaction

        props = CommitProperties(app_transactions=[Transaction(txn.app_id, txn.version)]) if txn else None
        try:
            table.create_write_transaction(actions, mode=mode, schema=table.schema(),
                                           partition_by=list(spec.partition_by) or None,
                                           partition_filters=partition_filters, commit_properties=props)
        except CommitFailedError as err:
            raise TableConflictError(
                f"commit to {spec.name} conflicts with a concurrent commit (read version {table.version()}): "
                f"{err}. Nothing was committed; the table is intact. Re-run the step.") from err
        table.update_incremental()
        adds = sum(1 for a in actions if type(a).__name__ == "AddAction")
        return CommitResult(table.version(), adds, len(actions) - adds)

    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult:
        table = self._table(spec)
        return self._commit(spec, table, self._write_files(spec, table, df), txn=txn)

    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        unknown = [c for c in where if c not in spec.partition_by]
        if unknown:
            raise StorageError(f"engine rs replaces whole partitions only; {unknown} are not partition columns "
                               f"of {spec.name} ({list(spec.partition_by)})")
        where_sql(where)  # validates non-empty
        table = self._table(spec)
        adds = self._write_files(spec, table, df)
        allowed = {c: {_partition_str(v) for v in vals} for c, vals in where.items()}
        stray = [a.path for a in adds
                 if any(a.partition_values.get(c) not in allowed[c] for c in allowed)]
        if stray:
            raise StorageError(f"replace_where on {spec.name}: rows outside {where_sql(where)} in {stray[:3]}; "
                               "nothing was committed")
        filters = [(c, "in", sorted(vals)) for c, vals in allowed.items()]
        before = {f.rel_path for f in self._files_of(spec, table)
                  if all(_partition_str(f.partition_values[c]) in allowed[c] for c in allowed)}
        result = self._commit(spec, table, adds, mode="overwrite", partition_filters=filters, txn=txn)
        return CommitResult(result.version, len(adds), len(before))

    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None) -> CommitResult:
        """Copy-on-write MERGE, the way Delta does it: find the files holding matched keys, rewrite only them.

        Inserted rows go to new files; files without a matched key are neither read in full nor rewritten.
        """
        from deltalake.transaction import RemoveAction

        if not spec.keys:
            raise StorageError(f"table {spec.name} has no merge key")
        table = self._table(spec)          # the snapshot this merge reads; the commit checks conflicts against it
        keys = list(spec.keys)
        src = source.persist()
        try:
            candidates = self._files_of(spec, table)
            if spec.partition_by and candidates:
                touched_parts = {tuple(_partition_str(r[c]) for c in spec.partition_by)
                                 for r in src.select(*spec.partition_by).distinct().collect()}
                candidates = [f for f in candidates if tuple(
                    _partition_str(f.partition_values[c]) for c in spec.partition_by) in touched_parts]
            touched: list[ActiveFile] = []
            if candidates:
                by_name = {_file_key(f.path): f for f in candidates}
                target_keys = self._read_files(spec, candidates, with_file=True).select(*keys, "_file")
                names = [r["_file"] for r in target_keys.join(src.select(*keys), keys, "left_semi")
                         .select("_file").distinct().collect()]
                touched = [by_name[n] for n in names]
            upserts = src if delete_flag is None else src.filter(~F.coalesce(F.col(delete_flag), F.lit(False)))
            new_rows = upserts.select(*spec.columns)
            if touched:
                kept = self._read_files(spec, touched).join(src.select(*keys), keys, "left_anti")
                new_rows = kept.unionByName(new_rows)
            adds = self._write_files(spec, table, new_rows)
            now_ms = int(time.time() * 1000)
            removes = [RemoveAction(path=f.rel_path, data_change=True, deletion_timestamp=now_ms, size=f.size,
                                    partition_values={c: _partition_str(v) for c, v in f.partition_values.items()})
                       for f in touched]
            result = self._commit(spec, table, adds + removes, txn=txn)
            log.info("merge %s: %d files rewritten, %d files added", spec.name, len(removes), len(adds))
            return result
        finally:
            src.unpersist()

    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult:
        table = self._table(spec)
        metrics = table.delete(predicate)
        return CommitResult(table.version(), metrics.get("num_added_files", 0), metrics.get("num_removed_files", 0))

    def optimize(self, spec: TableSpec) -> dict[str, Any]:
        return self._table(spec).optimize.compact()

    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        hours = self.conf.vacuum_retention_hours if retention_hours is None else retention_hours
        try:
            return self._table(spec).vacuum(retention_hours=hours, dry_run=False,
                                            enforce_retention_duration=enforce_retention)
        except Exception as err:  # delta-rs raises a generic DeltaError for the retention check
            if "retention" in str(err).lower():
                raise StorageError(f"vacuum {spec.name}: {err}") from None
            raise

    def txn_versions(self, spec: TableSpec, app_ids: list[str], version: int | None = None) -> dict[str, int | None]:
        table = self._table(spec, version)   # one snapshot load; the lookups are in memory
        return {app_id: table.transaction_version(app_id) for app_id in app_ids}


# ---------------------------------------------------------------------------------------------------------
# Engine spark: delta-spark (cluster, Databricks).
# ---------------------------------------------------------------------------------------------------------
class SparkDeltaStorage(DeltaStorage):
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

    def ensure(self, spec: TableSpec) -> None:
        from delta.tables import DeltaTable

        if self.exists(spec):
            self._check_buckets(spec, self._detail(spec).get("properties") or {})
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
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", version)
        name = self._name(spec)
        df = (reader.table(name) if name else reader.load(self.location(spec))).select(*spec.columns)
        return df.where(where_sql(where)) if where else df  # Delta prunes partitions from the predicate

    def active_files(self, spec: TableSpec, version: int | None = None) -> list[ActiveFile]:
        # inputFiles() comes from Delta's snapshot file index: the active files of that version only.
        return [ActiveFile(path=p, rel_path=p, size=-1, partition_values={})
                for p in self.read(spec, version).inputFiles()]

    def history(self, spec: TableSpec, limit: int | None = None) -> list[dict[str, Any]]:
        rows = self._delta_table(spec).history(limit) if limit else self._delta_table(spec).history()
        return [r.asDict(recursive=True) for r in rows.collect()]

    def _writer(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None):
        writer = clustered(spec, df).write.format("delta").option("maxRecordsPerFile", self.conf.max_rows_per_file)
        if txn:
            writer = writer.option("txnAppId", txn.app_id).option("txnVersion", txn.version)
        return writer

    def _save(self, spec: TableSpec, writer) -> CommitResult:
        name = self._name(spec)
        if name:
            writer.saveAsTable(name)
        else:
            writer.save(self.location(spec))
        last = self.history(spec, 1)[0]
        metrics = last.get("operationMetrics") or {}
        return CommitResult(int(last["version"]), int(metrics.get("numFiles", metrics.get("numAddedFiles", 0))),
                            int(metrics.get("numRemovedFiles", 0)))

    def append(self, spec: TableSpec, df: DataFrame, txn: AppTxn | None = None) -> CommitResult:
        return self._save(spec, self._writer(spec, df, txn).mode("append"))

    def replace_where(self, spec: TableSpec, df: DataFrame, where: WhereValues,
                      txn: AppTxn | None = None) -> CommitResult:
        writer = self._writer(spec, df, txn).mode("overwrite").option("replaceWhere", where_sql(where))
        return self._save(spec, writer)

    def merge(self, spec: TableSpec, source: DataFrame, delete_flag: str | None = None,
              txn: AppTxn | None = None) -> CommitResult:
        src = source.persist()
        try:
            cond = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.keys)
            if spec.partition_by:  # explicit partition pruning: Delta reads only the touched partitions
                parts = src.select(*spec.partition_by).distinct().collect()
                for col in spec.partition_by:
                    values = sorted({r[col] for r in parts if r[col] is not None})
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
            if txn:
                self.spark.conf.set("spark.databricks.delta.write.txnAppId", txn.app_id)
                self.spark.conf.set("spark.databricks.delta.write.txnVersion", str(txn.version))
            try:
                builder.execute()
            finally:
                if txn:
                    self.spark.conf.unset("spark.databricks.delta.write.txnAppId")
                    self.spark.conf.unset("spark.databricks.delta.write.txnVersion")
            last = self.history(spec, 1)[0]
            metrics = last.get("operationMetrics") or {}
            return CommitResult(int(last["version"]), int(metrics.get("numTargetFilesAdded", 0)),
                                int(metrics.get("numTargetFilesRemoved", 0)))
        finally:
            src.unpersist()

    def delete_where(self, spec: TableSpec, predicate: str) -> CommitResult:
        self._delta_table(spec).delete(predicate)
        last = self.history(spec, 1)[0]
        metrics = last.get("operationMetrics") or {}
        return CommitResult(int(last["version"]), int(metrics.get("numAddedFiles", 0)),
                            int(metrics.get("numRemovedFiles", 0)))

    def optimize(self, spec: TableSpec) -> dict[str, Any]:
        rows = self._delta_table(spec).optimize().executeCompaction().collect()
        return rows[0].asDict(recursive=True) if rows else {}

    def vacuum(self, spec: TableSpec, retention_hours: int | None = None, enforce_retention: bool = True) -> list[str]:
        """DeltaTable.vacuum() returns nothing, so the files are listed first with VACUUM ... DRY RUN (the same
        retention rule), then deleted; delta-spark's retentionDurationCheck stays on unless told otherwise."""
        hours = self.conf.vacuum_retention_hours if retention_hours is None else retention_hours
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


def _file_key(path: str) -> str:
    return re.sub(_SCHEME_RE, "", path)


def _spark_uri(path: str) -> str:
    return f"file://{path}" if path.startswith("/") else path


def _partition_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


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


def _stat_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _parquet_stats(meta) -> dict[str, Any]:
    """Delta file statistics (numRecords, min/max/nullCount of top-level primitive columns) from the footer."""
    stats: dict[str, Any] = {"numRecords": meta.num_rows, "minValues": {}, "maxValues": {}, "nullCount": {}}
    schema = meta.schema
    top_level = {}
    for i in range(len(schema)):
        col = schema.column(i)
        if "." not in col.path:  # nested (arrays) have dotted paths; Delta keeps no min/max for them
            top_level[i] = col.path
    for i, name in top_level.items():
        mins, maxs, nulls, complete = [], [], 0, True
        for rg in range(meta.num_row_groups):
            st = meta.row_group(rg).column(i).statistics
            if st is None:
                complete = False
                break
            nulls += st.null_count or 0
            if st.has_min_max:
                mins.append(st.min)
                maxs.append(st.max)
        if not complete:
            continue
        stats["nullCount"][name] = nulls
        if mins:
            stats["minValues"][name] = _stat_value(min(mins))
            stats["maxValues"][name] = _stat_value(max(maxs))
    return stats
