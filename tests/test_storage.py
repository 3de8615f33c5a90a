"""Every storage operation on the rs engine, against real Delta tables on disk."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

import pytest
from ebbtide import faults
from ebbtide.storage import AppTxn, RsStorage, StorageError, TableConflictError, open_storage
from ebbtide.tables import TableSpec, table_specs
from pyspark.sql import functions as F
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


def keys_by_file(store, spark):
    paths = [f.path for f in store.active_files(SPEC)]
    df = spark.read.parquet(*paths).select("k", F.col("_metadata.file_path").alias("file"))
    return sorted(sorted(r["keys"]) for r in df.groupBy("file").agg(F.collect_list("k").alias("keys")).collect())


def test_a_merge_writes_the_rows_it_keeps_apart_from_the_rows_it_inserts(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D1)]))
    store.merge(SPEC, rows(spark, [("a", 10, D1), ("n", 5, D1)]))
    assert contents(store) == [("a", 10, D1), ("b", 2, D1), ("n", 5, D1)]
    # b stays in a file of its own: a table's older rows do not pile up with every day's new ones
    assert keys_by_file(store, spark) == [["a", "n"], ["b"]]


def test_a_merge_promised_a_lower_bound_searches_only_files_that_reach_it(store, spark, monkeypatch):
    old = TS - dt.timedelta(days=1)
    frame = lambda items: spark.createDataFrame(  # noqa: E731
        [(k, v, ts, [k], D1) for k, v, ts in items], SCHEMA).coalesce(1)
    store.append(SPEC, frame([("a", 1, old)]))
    store.append(SPEC, frame([("b", 2, TS)]))
    searched = []
    hits = store._key_hits
    monkeypatch.setattr(store, "_key_hits", lambda spec, files, keys: searched.extend(files) or
                        hits(spec, files, keys))
    result = store.merge(SPEC, frame([("b", 20, TS), ("c", 3, TS)]), since=("ts", TS))
    assert contents(store) == [("a", 1, D1), ("b", 20, D1), ("c", 3, D1)]
    assert len(searched) == 1 and searched[0].max_values["ts"] >= TS   # a's file (max = old) was not searched
    assert result.files_removed == 1


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


# --------------------------------------------------------------------------------------------------
# Concurrent writers: a second writer commits at the exact moment the first has written its files
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def other(store, spark, make_config):
    """A second, independent writer on the same table (its own storage object, as another process would be)."""
    faults.reset()
    yield open_storage(spark, make_config(storage__engine="rs").storage)
    faults.reset()


def keyed(spark, k, v, day=D1, delete=False):
    return spark.createDataFrame([(k, v, TS, [k], day, delete)], T.StructType(
        SCHEMA.fields + [T.StructField("_delete", T.BooleanType())]))


def write_folders(store):
    return sorted(n for n in os.listdir(store.location(SPEC)) if n.startswith("write-"))


def test_two_merges_inserting_the_same_new_key_cannot_both_commit(store, other, spark):
    faults.on("write:kv", lambda: other.merge(SPEC, keyed(spark, "n", 2), delete_flag="_delete"))
    with pytest.raises(TableConflictError, match="table kv: concurrent writer conflict"):
        store.merge(SPEC, keyed(spark, "n", 1), delete_flag="_delete")
    assert contents(store) == [("n", 2, D1)]          # the other writer's row, once
    assert len(write_folders(store)) == 1             # the loser's uncommitted files are gone


def test_two_replaces_of_the_same_empty_partition_cannot_both_commit(store, other, spark):
    faults.on("write:kv", lambda: other.replace_where(SPEC, rows(spark, [("b", 2, D2)]), {"day": [D2]}))
    with pytest.raises(TableConflictError, match="kv"):
        store.replace_where(SPEC, rows(spark, [("a", 1, D2)]), {"day": [D2]})
    assert contents(store) == [("b", 2, D2)]


@pytest.mark.parametrize("first", ["merge", "append"])
def test_merge_and_append_of_the_same_key_cannot_both_commit(store, other, spark, first):
    do_merge = lambda s: s.merge(SPEC, keyed(spark, "k", 1), delete_flag="_delete")  # noqa: E731
    do_append = lambda s: s.append(SPEC, rows(spark, [("k", 2, D1)]))                # noqa: E731
    mine, theirs = (do_merge, do_append) if first == "merge" else (do_append, do_merge)
    faults.on("write:kv", lambda: theirs(other))
    with pytest.raises(TableConflictError):
        mine(store)
    assert [r[0] for r in contents(store)] == ["k"]


def test_a_concurrent_commit_elsewhere_is_built_upon(store, other, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    faults.on("write:kv", lambda: other.merge(SPEC, keyed(spark, "z", 9, day=D2), delete_flag="_delete"))
    store.merge(SPEC, keyed(spark, "a", 10), delete_flag="_delete")     # day D1 only: no conflict with D2
    assert contents(store) == [("a", 10, D1), ("z", 9, D2)]
    assert [h["version"] for h in store.history(SPEC)][:2] == [3, 2]


def test_a_concurrent_delete_of_a_file_being_rewritten_conflicts(store, other, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D1)]))
    faults.on("write:kv", lambda: other.delete_where(SPEC, "k = 'a'"))
    with pytest.raises(TableConflictError):
        store.merge(SPEC, keyed(spark, "b", 20), delete_flag="_delete")
    assert contents(store) == [("b", 2, D1)]


def test_a_job_conflicts_on_what_it_read_earlier_not_only_on_what_it_writes(store, other, spark):
    """nightly reads user_interest, computes for a while, then merges: a commit in between must fail the merge,
    even though the merge itself would find a consistent snapshot."""
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    with store.job("test", "run"):
        seen = store.read(SPEC, where={"day": [D1]}).collect()
        other.merge(SPEC, keyed(spark, "a", 5), delete_flag="_delete")              # another run commits
        with pytest.raises(TableConflictError, match="test run read at version 1"):
            store.merge(SPEC, keyed(spark, "a", seen[0].v + 1), delete_flag="_delete")
    assert contents(store) == [("a", 5, D1)]
    with store.job("test", "rerun"):                                                 # a re-run sees the new state
        store.merge(SPEC, keyed(spark, "a", store.read(SPEC).collect()[0].v + 1), delete_flag="_delete")
    assert contents(store) == [("a", 6, D1)]


def test_a_job_builds_on_its_own_commits(store, spark):
    with store.job("test", "own"):
        store.read(SPEC).count()
        store.append(SPEC, rows(spark, [("a", 1, D1)]))
        store.merge(SPEC, keyed(spark, "a", 2), delete_flag="_delete")
        store.replace_where(SPEC, rows(spark, [("b", 3, D2)]), {"day": [D2]})
    assert contents(store) == [("a", 2, D1), ("b", 3, D2)]


def test_a_table_created_during_a_job_is_pinned_before_its_creation(store, other, spark):
    """nightly creates its outputs inside its job: a concurrent run's first commit to them is a conflict, a
    concurrent (empty) creation is not."""
    spec = TableSpec("fresh", SCHEMA, ("day",), ("k",), properties=SPEC.properties)
    with store.job("test", "first", [spec]):
        other.ensure(spec)                                        # the other run created it first
        store.ensure(spec)
        store.append(spec, rows(spark, [("a", 1, D1)]))
    spec = TableSpec("fresh2", SCHEMA, ("day",), ("k",), properties=SPEC.properties)
    with store.job("test", "second", [spec]):
        other.ensure(spec)
        other.append(spec, rows(spark, [("b", 2, D2)]))           # and committed to it
        store.ensure(spec)
        with pytest.raises(TableConflictError, match="table fresh2: concurrent writer conflict"):
            store.append(spec, rows(spark, [("a", 1, D1)]))


def test_a_marker_commit_records_the_run_and_changes_no_file(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    files = store.active_files(SPEC)
    result = store.mark(SPEC, AppTxn("ebbtide.test.2026-01-01", 7))
    assert result.version == store.version(SPEC) == 2 and (result.files_added, result.files_removed) == (0, 0)
    assert store.active_files(SPEC) == files and contents(store) == [("a", 1, D1)]
    assert store.txn_versions(SPEC, ["ebbtide.test.2026-01-01"]) == {"ebbtide.test.2026-01-01": 7}


def test_a_job_keeps_semi_joins_out_of_the_per_partition_branches_of_reads(store, spark):
    from ebbtide.spark import UNION_PUSHDOWN_RULES

    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D2)]))
    keys = spark.createDataFrame([("a",)], "k string")

    def semi_joins() -> int:
        semi = store.read(SPEC).join(keys, "k", "left_semi")   # a union of one scan per day
        return semi._jdf.queryExecution().optimizedPlan().toString().count("Join LeftSemi")

    assert semi_joins() == 2
    with store.job("test"):
        assert semi_joins() == 1 and spark.conf.get("spark.sql.optimizer.excludedRules") == UNION_PUSHDOWN_RULES[0]
    assert spark.conf.get("spark.sql.optimizer.excludedRules", None) is None and semi_joins() == 2


def test_rows_changed_since_a_runs_marker_are_what_its_later_commits_wrote_and_took_away(store, spark):
    app = "ebbtide.test.2026-01-01"
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D1), ("d", 5, D2)]), txn=AppTxn(app, 1))
    landed = store.version(SPEC)
    src = rows(spark, [("b", 3, D1), ("c", 4, D1), ("d", 5, D2)]).withColumn("_delete", F.col("k") == "d")
    store.merge(SPEC, src, delete_flag="_delete", txn=AppTxn(app, 2))     # rewrites D1's file: a unchanged
    assert store.version_with_marker(SPEC, app, 1) == landed
    assert store.version_with_marker(SPEC, app, 2) == store.version(SPEC)
    assert store.version_with_marker(SPEC, app, None) == 0 and store.version_with_marker(SPEC, app, 5) == -1

    def changed(since):
        written, gone = store.rows_changed_since(SPEC, since)
        return (sorted((r.k, r.v) for r in written.collect()),
                None if gone is None else sorted((r.k, r.v) for r in gone.collect()))

    assert changed(landed) == ([("b", 3), ("c", 4)], [("b", 2), ("d", 5)])
    assert changed(store.version(SPEC)) == ([], [])
    assert changed(-1) == ([("a", 1), ("b", 3), ("c", 4)], None)
    for f in store.active_files(SPEC, landed):   # vacuumed: the rewritten file counts as written whole
        if os.path.exists(f.path):
            os.remove(f.path)
    assert changed(landed) == ([("a", 1), ("b", 3), ("c", 4)], None)


# --------------------------------------------------------------------------------------------------
# Paths, failed writes, statistics
# --------------------------------------------------------------------------------------------------
def test_root_with_space_percent_and_plus(spark, make_config, tmp_path):
    with pytest.raises(StorageError, match="'%41'.*rename the folder"):
        open_storage(spark, make_config(storage__root=str(tmp_path / "a%41b"), storage__engine="rs").storage)
    root = tmp_path / "my tables%x+é"
    store = open_storage(spark, make_config(storage__root=str(root), storage__engine="rs").storage)
    store.ensure(SPEC)
    store.append(SPEC, rows(spark, [("a", 1, D1), ("b", 2, D2)]))
    store.merge(SPEC, keyed(spark, "a", 10), delete_flag="_delete")
    store.merge(SPEC, keyed(spark, "b", 0, day=D2, delete=True), delete_flag="_delete")
    assert contents(store) == [("a", 10, D1)]
    on_disk = {os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs}
    assert all(p.startswith("my tables%x+é/kv/") for p in on_disk), on_disk   # nothing written outside the table


def test_failed_write_leaves_no_folder_and_vacuum_removes_those_of_killed_writers(store, spark):
    store.append(SPEC, rows(spark, [("a", 1, D1)]))
    with pytest.raises(StorageError, match="outside"):
        store.replace_where(SPEC, rows(spark, [("x", 1, D1)]), {"day": [D2]})
    assert len(write_folders(store)) == 1
    committed = set(write_folders(store))
    faults.on("write:kv", lambda: (_ for _ in ()).throw(faults.InjectedFault("killed")))   # dies like SIGKILL
    with pytest.raises(faults.InjectedFault):
        store.append(SPEC, rows(spark, [("b", 2, D1)]))
    # the new folder, not the name-last one: names made in the same second differ only in a random suffix
    (orphan,) = set(write_folders(store)) - committed
    assert len(write_folders(store)) == 2 and contents(store) == [("a", 1, D1)]
    store.vacuum(SPEC, retention_hours=0, enforce_retention=False)
    assert len(write_folders(store)) == 2             # young: could be a concurrent writer's commit in flight
    day_old = __import__("time").time() - 25 * 3600
    for d, _, fs in os.walk(os.path.join(store.location(SPEC), orphan)):
        for f in fs:
            os.utime(os.path.join(d, f), (day_old, day_old))
    store.vacuum(SPEC, retention_hours=0, enforce_retention=False)
    assert orphan not in write_folders(store) and contents(store) == [("a", 1, D1)]


class _Stats:
    def __init__(self, lo, hi, nulls=0):
        self.min, self.max, self.null_count = lo, hi, nulls
        self.has_min_max, self.has_null_count = lo is not None, True


class _Meta:
    """A footer with one column and the given row groups: (statistics, num_values)."""

    def __init__(self, groups):
        self.groups, self.num_rows, self.num_row_groups = groups, sum(n for _, n in groups), len(groups)
        self.schema = type("S", (), {"__len__": lambda s: 1, "column": lambda s, i: type("C", (), {"path": "c"})})()

    def row_group(self, rg):
        st, n = self.groups[rg]
        return type("RG", (), {"column": lambda s, i: type("CC", (), {"statistics": st, "num_values": n})()})()


def test_file_statistics_are_never_narrower_than_the_data():
    from ebbtide.storage import _parquet_stats

    full = _parquet_stats(_Meta([(_Stats("a", "m"), 3), (_Stats("b", "z"), 2)]))
    assert (full["minValues"], full["maxValues"], full["nullCount"]) == ({"c": "a"}, {"c": "z"}, {"c": 0})
    # a row group with values but no min/max (a long value): no min/max at all, not the other group's
    partial = _parquet_stats(_Meta([(_Stats("a", "m"), 3), (_Stats(None, None), 2)]))
    assert partial["maxValues"] == {} and partial["nullCount"] == {"c": 0}
    all_null = _parquet_stats(_Meta([(_Stats("a", "m"), 3), (_Stats(None, None, nulls=2), 2)]))
    assert all_null["maxValues"] == {"c": "m"} and all_null["nullCount"] == {"c": 2}
    inf = _parquet_stats(_Meta([(_Stats(1.0, float("inf")), 2)]))
    assert inf["maxValues"] == {} and json.dumps(inf, allow_nan=False)

    class Undecodable(_Stats):
        @property
        def max(self):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        @max.setter
        def max(self, _):
            pass
    assert _parquet_stats(_Meta([(Undecodable("a", "b"), 1)]))["maxValues"] == {}
    t = dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
    ts = _parquet_stats(_Meta([(_Stats(t, t), 1)]))
    assert ts["minValues"]["c"] == "2026-01-01T12:00:00.123Z" and ts["maxValues"]["c"] == "2026-01-01T12:00:00.124Z"


def test_a_partition_value_with_many_rows_is_written_by_many_tasks_and_a_small_one_by_one(spark, make_config):
    """quarantine: a run writes one run_date, so the shuffle by partition alone sent a day whose input was all bad
    to one task. Its rows are spread by hash; adaptive execution still coalesces a small day into one file."""
    cfg = make_config()
    spec = table_specs(cfg)["quarantine"]
    store = open_storage(spark, cfg.storage)
    store.ensure(spec)
    bad = spark.range(2000).select(
        F.concat(F.lit("junk "), F.col("id").cast("string")).alias("raw"), F.lit("unparseable_record").alias("reason"),
        F.lit("no JSON").alias("message"), F.lit("f.json").alias("source_file"), F.lit(D1).alias("run_date"),
        F.lit(6).cast("long").alias("raw_chars"), F.sha2(F.col("id").cast("string"), 256).alias("raw_sha256"),
        F.lit(None).cast("string").alias("user_id"))

    def files_written(table_spec, coalesce):
        spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", str(coalesce).lower())
        try:
            store.replace_where(table_spec, bad, {"run_date": [D1]})
        finally:
            spark.conf.unset("spark.sql.adaptive.coalescePartitions.enabled")
        assert store.read(table_spec).count() == 2000
        return len(store.active_files(table_spec))

    assert files_written(spec, coalesce=False) == 4            # one per shuffle partition (4 in these tests)
    assert files_written(dataclasses.replace(spec, spread_by=()), coalesce=False) == 1
    assert files_written(spec, coalesce=True) == 1             # small: no heap of tiny files
