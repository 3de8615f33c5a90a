"""Every storage operation on the rs engine, against real Delta tables on disk."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from ebbtide.storage import AppTxn, RsStorage, StorageError, TableConflictError, open_storage
from ebbtide.tables import TableSpec
from pyspark.sql import types as T

SCHEMA = T.StructType([
    T.StructField("k", T.StringType(), False),
    T.StructField("v", T.LongType(), False),
    T.StructField("ts", T.TimestampType(), False),
    T.StructField("tags", T.ArrayType(T.StringType(), False)),
    T.StructField("day", T.DateType(), False),
])
SPEC = TableSpec("kv", SCHEMA, ("day",), ("k",), sort_by=("k",),
                 properties={"delta.enableDeletionVectors": "false"})
D1, D2 = dt.date(2026, 1, 1), dt.date(2026, 1, 2)
TS = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)


def rows(spark, items):
    return spark.createDataFrame([(k, v, TS, [k], day) for k, v, day in items], SCHEMA).coalesce(1)


def contents(store, version=None):
    return sorted((r.k, r.v, r.day) for r in store.read(SPEC, version).collect())


@pytest.fixture
def store(spark, make_config):
    s = open_storage(spark, make_config(storage__engine="auto").storage)
    s.ensure(SPEC)
    return s


def test_auto_picks_rs_without_delta_jars(store):
    assert isinstance(store, RsStorage)


def test_protocol_and_log_contents(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    assert store.protocol(SPEC) == (1, 2)
    log_dir = os.path.join(store.location(SPEC), "_delta_log")
    actions = [json.loads(line) for name in sorted(os.listdir(log_dir)) if name.endswith(".json")
               for line in open(os.path.join(log_dir, name))]
    protocol = next(a["protocol"] for a in actions if "protocol" in a)
    assert protocol == {"minReaderVersion": 1, "minWriterVersion": 2}  # no table features
    meta = next(a["metaData"] for a in actions if "metaData" in a)
    schema = json.loads(meta["schemaString"])
    assert {f["name"]: f["type"] for f in schema["fields"]}["ts"] == "timestamp"  # never timestamp_ntz
    assert meta["partitionColumns"] == ["day"]
    add = next(a["add"] for a in actions if "add" in a)
    stats = json.loads(add["stats"])
    assert stats["numRecords"] == 1 and stats["minValues"]["k"] == "a"
    assert stats["minValues"]["ts"] == "2026-01-01T12:00:00.000Z"
    assert add["partitionValues"] == {"day": "2026-01-01"}


def test_append_read_and_older_version(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D2)]))
    v1 = store.version(SPEC)
    store.append(SPEC, rows(spark, [("c", 3, D2)]))
    assert contents(store) == [("a", 1, D1), ("b", 2, D2), ("c", 3, D2)]
    assert contents(store, v1) == [("a", 1, D1), ("b", 2, D2)]
    # the array column and the UTC instant survive the round trip
    row = store.read(SPEC).where("k = 'a'").collect()[0]
    assert row.tags == ["a"] and row.ts.replace(tzinfo=dt.timezone.utc) == TS


def test_replace_where_is_atomic_and_checked(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D2)]))
    store.replace_where(SPEC, rows(spark, [("b2", 20, D2), ("b3", 30, D2)]), {"day": [D2]})
    assert contents(store) == [("a", 1, D1), ("b2", 20, D2), ("b3", 30, D2)]
    before = store.version(SPEC)
    with pytest.raises(StorageError, match="outside"):
        store.replace_where(SPEC, rows(spark, [("x", 1, D1)]), {"day": [D2]})
    assert store.version(SPEC) == before
    with pytest.raises(StorageError, match="partition columns"):
        store.replace_where(SPEC, rows(spark, [("x", 1, D1)]), {"k": ["x"]})


def test_merge_upserts_deletes_and_rewrites_only_touched_files(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D1)]))
    store.append(SPEC, rows(spark, [("z", 9, D1)]))
    store.append(SPEC, rows(spark, [("c", 3, D2)]))
    untouched = {f.rel_path for f in store.active_files(SPEC)} - {
        f.rel_path for f in store.active_files(SPEC, 1)}
    src = spark.createDataFrame([("a", 10, TS, ["a"], D1, False), ("b", 0, TS, [], D1, True),
                                 ("n", 5, TS, ["n"], D1, False)],
                                T.StructType(SCHEMA.fields + [T.StructField("_delete", T.BooleanType())]))
    result = store.merge(SPEC, src, delete_flag="_delete", txn=AppTxn("test-merge", 3))
    assert contents(store) == [("a", 10, D1), ("c", 3, D2), ("n", 5, D1), ("z", 9, D1)]
    assert result.files_removed == 1  # only the file that held a and b; z's file (same partition) stays
    assert untouched <= {f.rel_path for f in store.active_files(SPEC)}
    assert store.txn_version(SPEC, "test-merge") == 3
    assert store.history(SPEC, 1)[0]["operation"] in ("WRITE", "write")


def test_snapshot_read_ignores_removed_files(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    store.replace_where(SPEC, rows(spark, [("a", 2, D1)]), {"day": [D1]})
    parquet_on_disk = [f for _, _, fs in os.walk(store.location(SPEC)) for f in fs if f.endswith(".parquet")]
    assert len(parquet_on_disk) == 2  # the removed file is still there until VACUUM
    assert contents(store) == [("a", 2, D1)]
    assert len(store.active_files(SPEC)) == 1
    store.vacuum(SPEC, retention_hours=0, enforce_retention=False)
    parquet_on_disk = [f for _, _, fs in os.walk(store.location(SPEC)) for f in fs if f.endswith(".parquet")]
    assert len(parquet_on_disk) == 1 and contents(store) == [("a", 2, D1)]


def test_concurrent_conflicting_commit_fails_cleanly(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D1)]))
    stale = store._table(SPEC)                        # writer 1 read this snapshot
    store.delete_where(SPEC, "k = 'a'")               # writer 2 commits first, removing the same file
    from deltalake.transaction import RemoveAction
    f = store._files_of(SPEC, stale)[0]
    remove = RemoveAction(path=f.rel_path, data_change=True, deletion_timestamp=0, size=f.size,
                          partition_values={"day": "2026-01-01"})
    with pytest.raises(TableConflictError, match="intact"):
        store._commit(SPEC, stale, [remove])
    assert contents(store) == [("b", 2, D1)]


def test_delete_optimize_history(store, spark):
    for k in "abcd":
        store.append(SPEC, rows(spark, [(k, 1, D1)]))
    assert len(store.active_files(SPEC)) == 4
    store.optimize(SPEC)
    assert len(store.active_files(SPEC)) == 1
    store.delete_where(SPEC, "k = 'b'")
    assert [r[0] for r in contents(store)] == ["a", "c", "d"]
    ops = [h["operation"] for h in store.history(SPEC)]
    assert "OPTIMIZE" in ops and "DELETE" in ops


def test_bucket_count_is_fixed_per_table(spark, make_config):
    spec = TableSpec("b", SCHEMA, ("day",), ("k",), properties={"ebbtide.user_buckets": "8"})
    store = open_storage(spark, make_config().storage)
    store.ensure(spec)
    changed = TableSpec("b", SCHEMA, ("day",), ("k",), properties={"ebbtide.user_buckets": "16"})
    with pytest.raises(StorageError, match="user_buckets"):
        store.ensure(changed)


def test_spark_engine_without_delta_jars_is_a_clear_error(spark, make_config):
    with pytest.raises(StorageError, match="delta-spark on the JVM classpath"):
        open_storage(spark, make_config(storage__engine="spark").storage)


def test_replace_predicates_render_as_sql():
    from ebbtide.storage import where_sql

    assert where_sql({"day": [D1, D2]}) == "`day` IN (DATE'2026-01-01', DATE'2026-01-02')"
    assert where_sql({"b": [1, 2], "k": ["o'k"]}) == "`b` IN (1, 2) AND `k` IN ('o\\'k')"
    with pytest.raises(ValueError):
        where_sql({"day": []})
