"""The sessionize job end to end on generated logs with ground truth, plus hand-written edge cases."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from ebbtide.generate import generate
from ebbtide.sessionize import InputError, Sessionizer
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from helpers import sequences_by_item_id, table_rows

START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(3)]
ORDER_FREE_TABLES = ("events", "quarantine", "sessions", "item_daily_counts")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return root


def _cfg(make_config, raw, tables, **extra):
    return make_config(sessionize__input=str(raw), storage__root=str(tables), **extra)


@pytest.fixture(scope="module")
def in_order(spark, tmp_path_factory):
    """Three generated days (every bad-record kind, duplicates, late events) sessionized in order."""
    from ebbtide.config import load_config

    root = tmp_path_factory.mktemp("inorder")
    overrides = {"generate.out": str(root / "raw"), "generate.users": 300, "generate.items": 200,
                 "generate.days": 3, "generate.start_date": START.isoformat(), "generate.bad_record_rate": 0.02,
                 "generate.duplicate_rate": 0.02, "generate.late_rate": 0.05, "generate.users_per_chunk": 100,
                 "sessionize.input": str(root / "raw"), "storage.root": str(root / "tables"),
                 "storage.engine": "rs", "storage.user_buckets": 4}
    cfg = load_config("local", overrides)
    truth = generate(cfg.generate, progress=False)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    reports = [job.run(d) for d in DAYS]
    vocab_after_day1 = None
    return {"cfg": cfg, "truth": truth, "storage": storage, "job": job, "reports": reports,
            "overrides": overrides, "root": root, "vocab_after_day1": vocab_after_day1}


def test_reconciliation_matches_ground_truth_for_every_bad_kind(in_order):
    truth = in_order["truth"]["per_day"]
    for report in in_order["reports"]:
        day = truth[report.run_date.isoformat()]
        assert report.read == day["lines"]
        assert report.kept == day["events"]
        assert report.duplicates == day["duplicates"]
        assert report.quarantine_by_reason == day["bad"]
        assert report.read == report.kept + report.quarantined + report.duplicates
    reasons = set().union(*(r.quarantine_by_reason for r in in_order["reports"]))
    assert reasons == {"unparseable_record", "wrong_type", "missing_user_id", "missing_item_id",
                       "unparseable_timestamp", "timestamp_too_old", "timestamp_in_future",
                       "unknown_event_type", "oversize_field"}
    # late events arrived (day 2 and 3 carry events of the day before) and duplicates crossed days
    assert truth[DAYS[1].isoformat()]["late"] > 0
    assert any(r.duplicates_of_earlier > 0 for r in in_order["reports"])


def test_tables_are_consistent(in_order):
    cfg, storage = in_order["cfg"], in_order["storage"]
    specs = table_specs(cfg)
    events = storage.read(specs["events"])
    total = sum(d["events"] for d in in_order["truth"]["per_day"].values())
    assert events.count() == total == events.select("event_id").distinct().count()
    seqs = storage.read(specs["user_sequences"]).collect()
    by_user = {r.user_id: r.n for r in events.groupBy("user_id").count().withColumnRenamed("count", "n").collect()}
    assert {r.user_id: r.n_events for r in seqs} == by_user
    for r in seqs:
        assert r.ts == sorted(r.ts) and len(r.ts) == min(r.n_events, cfg.sessionize.max_len)
        assert r.session_idx == sorted(r.session_idx) and r.session_idx[0] == 0
    sessions = storage.read(specs["sessions"])
    assert sessions.agg({"n_events": "sum"}).collect()[0][0] == total
    vocab = storage.read(specs["item_vocab"]).collect()
    assert sorted(v.item_idx for v in vocab) == list(range(len(vocab)))
    assert sum(v.n_events for v in vocab) == total


def test_each_run_reports_its_spark_jobs_from_the_listener(in_order, spark, monkeypatch):
    from ebbtide.spark import count_spark_jobs
    from pyspark.sql import SparkSession

    with count_spark_jobs(spark) as idle:
        spark.range(10)                       # no action: no job
    with count_spark_jobs(spark) as one:
        spark.range(10).collect()
    assert (idle.jobs, idle.stages, one.jobs, one.stages) == (0, 0, 1, 1)
    assert all(r.spark_jobs > 0 and r.spark_stages > 0 for r in in_order["reports"])
    assert f"Spark jobs {in_order['reports'][0].spark_jobs} " in in_order["reports"][0].line()

    def refused(self):                        # as on a shared cluster's allow-list: not countable, block runs
        raise RuntimeError("sparkContext is not allowed here")
    monkeypatch.setattr(SparkSession, "sparkContext", property(refused))
    with count_spark_jobs(spark) as hidden:
        ran = True
    assert ran and (hidden.jobs, hidden.stages) == (None, None)


def test_a_semi_join_over_a_partitioned_read_stays_one_join_during_a_run(in_order, spark):
    """Reads are unions of per-partition scans; Spark would push a semi/anti join into each branch (one shuffle and
    one job per partition). A run excludes that rule, on top of the session's own exclusions, and restores them."""
    import functools

    from ebbtide.spark import UNION_PUSHDOWN_RULES, optimizer_rules_excluded
    from pyspark.sql import functions as F

    def joins_in_plan() -> int:
        parts = [spark.range(100).withColumn("p", F.lit(i)) for i in range(4)]
        semi = functools.reduce(lambda a, b: a.unionByName(b), parts).join(spark.range(10), "id", "left_semi")
        return semi._jdf.queryExecution().optimizedPlan().toString().count("Join LeftSemi")

    key, own = "spark.sql.optimizer.excludedRules", "org.apache.spark.sql.catalyst.optimizer.CollapseProject"
    assert spark.conf.get(key, None) is None          # the runs of the fixture left the session as it was
    assert joins_in_plan() == 4
    with optimizer_rules_excluded(spark, UNION_PUSHDOWN_RULES):
        assert joins_in_plan() == 1
    assert spark.conf.get(key, None) is None and joins_in_plan() == 4
    spark.conf.set(key, own)
    try:
        with optimizer_rules_excluded(spark, UNION_PUSHDOWN_RULES):
            assert spark.conf.get(key).split(",") == [own, *UNION_PUSHDOWN_RULES]
        assert spark.conf.get(key) == own
    finally:
        spark.conf.unset(key)


def test_rerun_is_idempotent(in_order):
    cfg, storage, job = in_order["cfg"], in_order["storage"], in_order["job"]
    names = (*ORDER_FREE_TABLES, "item_vocab", "user_sequences")
    before = {n: table_rows(storage, cfg, n) for n in names}
    again = job.run(DAYS[1])
    assert again.kept == in_order["reports"][1].kept and again.read == in_order["reports"][1].read
    assert {n: table_rows(storage, cfg, n) for n in names} == before


def test_out_of_order_dates_converge_to_in_order_result(in_order, spark):
    from ebbtide.config import load_config

    overrides = dict(in_order["overrides"], **{"storage.root": str(in_order["root"] / "tables_shuffled")})
    cfg = load_config("local", overrides)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for day in (DAYS[2], DAYS[0], DAYS[1]):
        job.run(day).check()
    ref_cfg, ref = in_order["cfg"], in_order["storage"]
    for name in ORDER_FREE_TABLES:
        assert table_rows(storage, cfg, name) == table_rows(ref, ref_cfg, name), name
    # indices record first-processed order; everything else about the vocabulary converges
    assert table_rows(storage, cfg, "item_vocab", drop=("item_idx",)) == \
        table_rows(ref, ref_cfg, "item_vocab", drop=("item_idx",))
    assert sequences_by_item_id(storage, cfg) == sequences_by_item_id(ref, ref_cfg)


def test_vocab_indices_are_stable_across_runs(in_order, spark):
    from ebbtide.config import load_config

    overrides = dict(in_order["overrides"], **{"storage.root": str(in_order["root"] / "tables_vocab")})
    cfg = load_config("local", overrides)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    job.run(DAYS[0])
    spec = table_specs(cfg)["item_vocab"]
    first = {r.item_id: r.item_idx for r in storage.read(spec).collect()}
    job.run(DAYS[1])
    job.run(DAYS[0])  # a re-run of an earlier day must not renumber anything
    second = {r.item_id: r.item_idx for r in storage.read(spec).collect()}
    assert {k: second[k] for k in first} == first
    assert sorted(second.values()) == list(range(len(second)))
    assert min(second[k] for k in set(second) - set(first)) == len(first)  # new items appended after


def test_missing_input_is_a_clear_error(in_order):
    with pytest.raises(InputError, match="no input for run date 2030-01-01"):
        in_order["job"].run(dt.date(2030, 1, 1))


# --------------------------------------------------------------------------------------------------
# Hand-written logs: cross-midnight sessions, late events that merge sessions, max session length
# --------------------------------------------------------------------------------------------------
def _write_day(raw, day: dt.date, records: list[dict | str]) -> None:
    folder = raw / f"date={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "part-0.jsonl", "w") as fh:
        for rec in records:
            fh.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")


def _ev(user, item, when: str, **extra):
    return {"user_id": user, "item_id": item, "event_type": "view", "ts": when, **extra}


def _sessions(storage, cfg, user):
    spec = table_specs(cfg)["sessions"]
    rows = storage.read(spec).where(f"user_id = '{user}'").orderBy("start_ts").collect()
    return [(r.start_ts.strftime("%d %H:%M"), r.end_ts.strftime("%d %H:%M"), r.n_events, r.item_ids) for r in rows]


@pytest.fixture
def handmade(spark, make_config, tmp_path):
    raw = tmp_path / "raw"
    d1, d2, d3 = DAYS
    _write_day(raw, d1, [_ev("u1", "a", "2026-11-01T23:40:00Z"), _ev("u1", "b", "2026-11-01T23:55:00Z")]
               + [_ev("u2", f"x{i}", f"2026-11-01T{8 + i // 6:02d}:{(i % 6) * 10:02d}:00Z") for i in range(30)])
    _write_day(raw, d2, [_ev("u1", "c", "2026-11-02T00:10:00Z"),        # continues the session across midnight
                         _ev("u1", "e", "2026-11-02T01:00:00Z")])       # 50 min later: a new session
    _write_day(raw, d3, [_ev("u1", "d", "2026-11-02T00:35:00Z"),        # late: bridges the two sessions
                         _ev("u1", "f", 1793665200)])                   # 2026-11-03T00:20:00Z, epoch seconds
    cfg = make_config(sessionize__input=str(raw), sessionize__max_session_minutes=120, storage__user_buckets=2)
    storage = open_storage(spark, cfg.storage)
    return cfg, storage, Sessionizer(spark, cfg, storage)


def test_cross_midnight_and_late_events_land_in_the_right_sessions(handmade):
    cfg, storage, job = handmade
    job.run(DAYS[0])
    job.run(DAYS[1])
    assert _sessions(storage, cfg, "u1") == [("01 23:40", "02 00:10", 3, ["a", "b", "c"]),
                                             ("02 01:00", "02 01:00", 1, ["e"])]
    job.run(DAYS[2])
    assert _sessions(storage, cfg, "u1") == [("01 23:40", "02 01:00", 5, ["a", "b", "c", "d", "e"]),
                                             ("03 00:20", "03 00:20", 1, ["f"])]
    seq = storage.read(table_specs(cfg)["user_sequences"]).where("user_id = 'u1'").collect()[0]
    assert seq.session_idx == [0, 0, 0, 0, 0, 1] and seq.n_events == 6
    assert seq.ts == sorted(seq.ts)


def test_max_session_length_cuts_long_chains(handmade):
    cfg, storage, job = handmade
    job.run(DAYS[0])
    # 30 events 10 minutes apart from 08:00: one inactivity chain, cut every 120 minutes
    assert [(s[0], s[2]) for s in _sessions(storage, cfg, "u2")] == [("01 08:00", 12), ("01 10:00", 12),
                                                                    ("01 12:00", 6)]


def test_late_events_give_the_same_sessions_in_any_order(handmade, spark, make_config, tmp_path):
    cfg, storage, job = handmade
    for day in DAYS:
        job.run(day)
    other = make_config(sessionize__input=cfg.sessionize.input, sessionize__max_session_minutes=120,
                        storage__user_buckets=2, storage__root=str(tmp_path / "other"))
    other_storage = open_storage(spark, other.storage)
    other_job = Sessionizer(spark, other, other_storage)
    for day in (DAYS[2], DAYS[1], DAYS[0]):
        other_job.run(day)
    assert table_rows(other_storage, other, "sessions") == table_rows(storage, cfg, "sessions")
    assert sequences_by_item_id(other_storage, other) == sequences_by_item_id(storage, cfg)
