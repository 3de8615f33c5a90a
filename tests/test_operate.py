"""Operating ebbtide: backfill (resumable), nightly as of a past date, guards, promotion, cold start and idle
users, retention, readers, and the Databricks notebook path without sparkContext.

One small data set: 5 generated days plus hand-written users (one cold-start user, a user idle for longer than
the retention who comes back, an item that appears after the model was trained). sessionize.max_len is small so
that the latest sequence window of an active user no longer holds what was known at an earlier date.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from ebbtide.backfill import backfill
from ebbtide.cli import main as cli_main
from ebbtide.config import load_config
from ebbtide.generate import generate
from ebbtide.nightly import Nightly, StaleDataError
from ebbtide.promotion import NoPromotedModelError, promote, promoted
from ebbtide.runs import committed_dates, nightly_app_id
from ebbtide.sessionize import Sessionizer
from ebbtide.storage import StorageError, open_storage
from ebbtide.tables import table_specs
from ebbtide.train import train_models
from pyspark.sql import functions as F

START = dt.date(2026, 11, 1)
D = [START + dt.timedelta(days=i) for i in range(7)]


def _event(user, item, when: dt.datetime, n: int) -> str:
    return json.dumps({"event_id": f"x-{user}-{n}", "user_id": user, "item_id": item, "event_type": "click",
                       "ts": when.isoformat()})


def _extra_events(raw) -> None:
    """Hand-written users on top of the generated ones (ts in UTC)."""
    at = lambda day, hour: dt.datetime.combine(D[day], dt.time(hour), tzinfo=dt.timezone.utc)  # noqa: E731
    lines = {0: [_event("u-idle", f"i00000{i}", at(0, 9 + i), i) for i in range(3)],
             3: [_event("u-cold", "i-fresh", at(3, 12), 0)]
             + [_event(f"u000000{i}", "i-fresh", at(3, 10), 10 + i) for i in range(1, 8)],
             4: [_event("u-idle", "i000004", at(4, 9), 3)]}
    for day, rows in lines.items():
        with open(os.path.join(raw, f"date={D[day].isoformat()}", "extra.jsonl"), "w") as fh:
            fh.write("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    """Sessionized D0..D2 ('sessionized' copy), a promoted model, then `backfill D0..D4` ('backfilled')."""
    root = tmp_path_factory.mktemp("operate")
    overrides = {
        "generate.out": str(root / "raw"), "generate.users": 120, "generate.items": 60, "generate.days": 5,
        "generate.categories": 6, "generate.start_date": START.isoformat(), "generate.users_per_chunk": 120,
        "sessionize.input": str(root / "raw"), "sessionize.max_len": 12, "storage.root": str(root / "tables"),
        "storage.engine": "rs", "storage.user_buckets": 2, "train.output": str(root / "models"),
        "train.models": ["decay_pool"], "train.max_len": 10, "train.dim": 16, "train.epochs": 1,
        "train.batch_size": 64, "train.split": "leave_one_out", "nightly.top_k": 8, "nightly.batch_size": 64,
        "nightly.retention_days": 2, "nightly.incremental": False}
    cfg = load_config("local", overrides)
    generate(cfg.generate, progress=False)
    _extra_events(str(root / "raw"))
    storage = open_storage(spark, cfg.storage)
    first = backfill(spark, cfg, storage, D[0], D[2], with_nightly=False)
    assert first.sessionized == D[:3] and not first.failed
    shutil.copytree(root / "tables", root / "sessionized")
    artifact = train_models(cfg, storage)["decay_pool"]
    promote(cfg.train.output, "decay_pool", artifact.name, note="test")
    summary = backfill(spark, cfg, storage, D[0], D[4])
    recs_d2 = _recs(storage, cfg, D[2])
    shutil.copytree(root / "tables", root / "backfilled")
    return {"root": root, "overrides": overrides, "artifact": artifact, "summary": summary, "recs_d2": recs_d2}


def _copy(world, spark, tmp_path, source="backfilled", **more):
    shutil.copytree(world["root"] / source, tmp_path / "tables")
    cfg = load_config("local", {**world["overrides"], "storage.root": str(tmp_path / "tables"), **more})
    return cfg, open_storage(spark, cfg.storage)


def _recs(storage, cfg, as_of) -> list[tuple]:
    spec = table_specs(cfg)["user_recommendations"]
    return sorted((r.user_id, r.rank, r.item_id, r.score, r.source, r.model_version)
                  for r in storage.read(spec, where={"as_of": [as_of]}).collect())


def _versions(storage, cfg) -> dict[str, int | None]:
    specs = table_specs(cfg)
    return {k: storage.version(s) if storage.exists(s) else None for k, s in specs.items()}


# -- backfill -------------------------------------------------------------------------------------------
def test_backfill_resumes_from_table_metadata(world, spark, tmp_path):
    s = world["summary"]
    assert (s.sessionize_skipped, s.sessionized) == (D[:3], D[3:5])
    assert s.nightly_written == D[:5] and not s.failed
    assert "sessionize: 2 run, 3 already committed" in "\n".join(s.lines())
    cfg, storage = _copy(world, spark, tmp_path)
    before = _versions(storage, cfg)
    again = backfill(spark, cfg, storage, D[0], D[4])
    assert again.sessionize_skipped == D[:5] and again.nightly_skipped == D[:5]
    assert _versions(storage, cfg) == before, "a finished range commits nothing when re-run"
    assert committed_dates(storage, table_specs(cfg)["user_recommendations"], D[:6], nightly_app_id) == set(D[:5])


def test_rerun_of_an_old_date_equals_the_timely_run(world, spark, tmp_path):
    """Nightly D2 re-run after D3 and D4 were loaded writes what the timely D2 run (inside the backfill) wrote."""
    cfg, storage = _copy(world, spark, tmp_path)
    spec = table_specs(cfg)["user_sequences"]
    t_query = dt.datetime.combine(D[3], dt.time(), tzinfo=dt.timezone.utc).timestamp()
    # The test means something: some user's latest window has lost events that were known at the end of D2.
    as_of_version = Nightly(spark, cfg, storage)._inputs(D[2]).sequences
    assert as_of_version < storage.version(spec)
    then = {r.user_id: sum(t < t_query for t in r.ts) for r in storage.read(spec, as_of_version).collect()}
    now = {r.user_id: sum(t < t_query for t in r.ts) for r in storage.read(spec).collect()}
    assert any(now[u] < n for u, n in then.items()), "no truncated window: the data set is too small to tell"
    report = Nightly(spark, cfg, storage).run(D[2])
    assert report.exact_as_of and report.sequences_version == as_of_version
    assert report.kept_newer > 0                 # users active later keep their newer user_interest state
    assert _recs(storage, cfg, D[2]) == world["recs_d2"]


# -- guards ---------------------------------------------------------------------------------------------
def test_nightly_refuses_a_date_without_data(world, spark, tmp_path, capsys):
    cfg, storage = _copy(world, spark, tmp_path)
    before = _versions(storage, cfg)
    with pytest.raises(StaleDataError, match=f"no sessionized data for {D[6]}"):
        Nightly(spark, cfg, storage).run(D[6])
    assert _versions(storage, cfg) == before
    args = ["--conf", "local", *[f"--set={k}={v}" for k, v in {**world["overrides"],
                                                               "storage.root": str(tmp_path / "tables")}.items()]]
    assert cli_main([*args, "nightly", "--as-of", D[6].isoformat()]) == 1
    assert "no sessionized data" in capsys.readouterr().err
    assert cli_main([*args, "nightly", "--as-of", D[6].isoformat(), "--allow-stale"]) == 0   # the override


def test_stale_and_out_of_order_data_are_refused(world, spark, tmp_path):
    cfg, storage = _copy(world, spark, tmp_path, source="sessionized", **{"nightly.model_version": str(world["artifact"])})
    Sessionizer(spark, cfg, storage).run(D[4])                   # D3 skipped
    with pytest.raises(StaleDataError, match=f"stale data: {D[3]} was never sessionized"):
        Nightly(spark, cfg, storage).run(D[4])
    Sessionizer(spark, cfg, storage).run(D[3])                   # loaded after D4: no version holds 'as of D3'
    with pytest.raises(StaleDataError, match="sessionized before"):
        Nightly(spark, cfg, storage).run(D[3])
    cfg.nightly.require_fresh = False
    assert not Nightly(spark, cfg, storage).run(D[3]).exact_as_of


def test_model_is_checked_before_tables_are_created(world, spark, tmp_path):
    cfg = load_config("local", {**world["overrides"], "storage.root": str(tmp_path / "empty"),
                                "train.output": str(tmp_path / "no-models")})
    storage = open_storage(spark, cfg.storage)
    with pytest.raises(NoPromotedModelError, match="ebbtide promote decay_pool"):
        Nightly(spark, cfg, storage).run(D[2])
    assert not os.path.exists(tmp_path / "empty"), "nothing is created before the model is found"


def test_promotion_is_what_nightly_serves(world, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(world["artifact"].parent.parent, out)
    assert promoted(out, "decay_pool").name == world["artifact"].name
    with pytest.raises(FileNotFoundError, match="versions of decay_pool"):
        promote(out, "decay_pool", "no-such-version")
    newer = out / "decay_pool" / "29990101T000000-deadbeef"
    shutil.copytree(world["artifact"], newer)
    cfg = load_config("local", {"train.output": str(out)})
    from ebbtide.promotion import resolve_model

    assert resolve_model(cfg).name == world["artifact"].name        # the pointer, not the newest folder
    cfg.nightly.follow = "latest"
    assert resolve_model(cfg) == newer
    pointer = promote(out, "decay_pool", newer.name, note="rollout")
    assert pointer["history"][0]["version"] == world["artifact"].name


# -- serving --------------------------------------------------------------------------------------------
def test_cold_start_users_and_new_items_get_the_popularity_fallback(world, spark, tmp_path):
    cfg, storage = _copy(world, spark, tmp_path)
    recs = _recs(storage, cfg, D[3])
    by_user: dict[str, list] = {}
    for user, rank, item, _score, source, _ in recs:
        by_user.setdefault(user, []).append((rank, item, source))
    assert {s for _, _, s in by_user["u-cold"]} == {"popular"} and len(by_user["u-cold"]) == 8
    assert all(item != "i-fresh" for _, item, _ in by_user["u-cold"]), "consumed items are never recommended"
    new_items = [(u, rank, item) for u, rows in by_user.items() for rank, item, s in rows if s == "new_item"]
    assert any(item == "i-fresh" for _, _, item in new_items)
    assert all(rank > 8 - cfg.nightly.new_item_slots for _, rank, _ in new_items), "new items take the last slots"
    vocab = {r.item_id: r.item_idx for r in storage.read(table_specs(cfg)["item_vocab"]).collect()}
    from ebbtide.artifacts import load_artifact

    n_items = load_artifact(world["artifact"])[1]["n_items"]
    assert vocab["i-fresh"] >= n_items, "i-fresh is newer than the model"
    model_rows = [item for rows in by_user.values() for _, item, s in rows if s == "model"]
    assert model_rows and all(vocab[i] < n_items for i in model_rows)


def test_an_idle_user_is_not_served_until_they_return(world, spark, tmp_path):
    cfg, storage = _copy(world, spark, tmp_path)
    served = lambda day: {r[0] for r in _recs(storage, cfg, day)}  # noqa: E731
    assert "u-idle" in served(D[0]) and "u-idle" not in served(D[3])   # idle longer than retention_days=2
    back = [r for r in _recs(storage, cfg, D[4]) if r[0] == "u-idle"]
    assert back and "model" in {r[4] for r in back} and "popular" not in {r[4] for r in back}
    row = storage.read(table_specs(cfg)["user_interest"]).where("user_id = 'u-idle'").collect()[0]
    assert (row.as_of, row.n_events) == (D[4], 4)   # re-encoded from the whole window, old events decayed


# -- retention and readers ------------------------------------------------------------------------------
def test_maintain_expires_old_outputs_and_reports_it(world, spark, tmp_path):
    from ebbtide.maintain import maintain

    cfg, storage = _copy(world, spark, tmp_path, **{"nightly.recommendations_retention_days": 2,
                                                     "nightly.interest_retention_days": 1})
    specs = table_specs(cfg)
    recs_before = storage.read(specs["user_recommendations"]).count()
    old_recs = storage.read(specs["user_recommendations"]).where(f"as_of < DATE'{D[2]}'").count()
    old_interest = storage.read(specs["user_interest"]).where(f"as_of < DATE'{D[3]}'").count()
    assert old_recs and old_interest
    rows = {r["table"]: r for r in maintain(cfg, storage, D[4], expire=True, vacuum=True)}
    assert rows["user_recommendations"]["expired_rows"] == old_recs
    assert rows["user_interest"]["expired_rows"] == old_interest
    assert storage.read(specs["user_recommendations"]).count() == recs_before - old_recs
    assert {r.as_of for r in storage.read(specs["user_recommendations"]).select("as_of").distinct().collect()} \
        == set(D[2:5])
    assert all(r["vacuumed_files"] == 0 for r in rows.values()), "files removed minutes ago are kept (7 days)"
    with pytest.raises(StorageError, match="retention"):
        maintain(cfg, storage, D[4], vacuum=True, retention_hours=0)       # the retention check is on


def test_spark_engine_vacuum_reports_the_files_it_removes():
    from ebbtide.config import StorageConf
    from ebbtide.storage import SparkDeltaStorage
    from ebbtide.tables import TableSpec

    calls = []

    class FakeSpark:
        class conf:  # noqa: N801
            set = unset = staticmethod(lambda *a: calls.append(("conf",) + a))

        def sql(self, text):
            calls.append(("sql", text))
            return type("R", (), {"collect": lambda self: [("s3://b/t/part-1.parquet",), ("s3://b/t/part-2.parquet",)]})()

    class Fake(SparkDeltaStorage):
        def _delta_table(self, spec):
            return type("T", (), {"vacuum": lambda self, hours: calls.append(("vacuum", hours))})()

    store = Fake(FakeSpark(), StorageConf(root="s3://b", engine="spark"))
    removed = store.vacuum(TableSpec("t", None), 200)
    assert removed == ["s3://b/t/part-1.parquet", "s3://b/t/part-2.parquet"]
    assert calls == [("sql", "VACUUM delta.`s3://b/t` RETAIN 200.0 HOURS DRY RUN"), ("vacuum", 200.0)]


def test_outputs_are_readable_with_deltalake_duckdb_and_spark(world, spark, tmp_path):
    import duckdb
    from ebbtide.readers import duckdb_view, latest_as_of, read_table

    cfg, storage = _copy(world, spark, tmp_path)
    con = duckdb.connect()
    for name, key in (("user_recommendations", ["user_id", "as_of", "rank"]), ("user_interest", ["user_id"]),
                      ("item_embeddings", ["item_id", "model_version"])):
        spec = table_specs(cfg)[name]
        path = storage.location(spec)
        with_spark = sorted(tuple(r[c] for c in key) for r in storage.read(spec).collect())
        frame = read_table(path)
        assert list(frame.columns) == spec.columns
        with_pandas = sorted(tuple(row) for row in frame[key].itertuples(index=False))
        duckdb_view(con, name, path)
        with_duckdb = sorted(con.execute(f"SELECT {', '.join(key)} FROM {name}").fetchall())
        assert with_spark == with_pandas == with_duckdb and with_spark, name
    none = read_table(storage.location(table_specs(cfg)["user_recommendations"]), filters={"as_of": ["1999-01-01"]})
    assert none.empty and list(none.columns) == table_specs(cfg)["user_recommendations"].columns
    newest = latest_as_of(storage.location(table_specs(cfg)["user_recommendations"]))
    assert newest == D[4]
    top = con.execute("SELECT user_id, item_id FROM user_recommendations WHERE as_of = ? AND rank = 1",
                      [D[4]]).fetchall()
    assert len(top) == len({r[0] for r in _recs(storage, cfg, D[4])})


# -- forgetting users -----------------------------------------------------------------------------------
def _rows_per_table(storage, cfg, user) -> dict[str, int]:
    from ebbtide.forget import USER_TABLES

    specs = table_specs(cfg)
    return {n: storage.read(specs[n]).where(F.col("user_id") == user).count() for n in USER_TABLES}


def _files_naming(storage, cfg, user) -> list[str]:
    """Data files of the user tables (any version, committed or not) that still hold the user's rows."""
    import pyarrow.parquet as pq
    from ebbtide.forget import USER_TABLES

    specs = table_specs(cfg)
    files = [p for n in USER_TABLES for p in Path(storage.location(specs[n])).rglob("*.parquet")
             if "_delta_log" not in p.parts]
    return [str(p) for p in files if user in pq.read_table(p, columns=["user_id"]).column("user_id").to_pylist()]


def test_forget_user_removes_them_from_every_table_and_vacuum_from_disk(world, spark, tmp_path, capsys):
    from helpers import check_invariants

    cfg, storage = _copy(world, spark, tmp_path)
    specs = table_specs(cfg)
    named = {r.user_id for r in storage.read(specs["quarantine"]).where("user_id IS NOT NULL").collect()}
    served = {r.user_id for r in storage.read(specs["user_recommendations"], where={"as_of": [D[2]]}).collect()}
    user = sorted(named & served)[0]              # in every table: quarantine, events ... recommendations
    parked = storage.read(specs["events"]).where(F.col("user_id") == user).limit(1)   # and a redelivered copy
    storage.merge(specs["event_redeliveries"], parked.withColumn("ingest_date", F.date_add("ingest_date", 1)))
    before = _rows_per_table(storage, cfg, user)
    assert all(before.values()), before
    args = ["--conf", "local", *[f"--set={k}={v}" for k, v in {**world["overrides"],
                                                               "storage.root": str(tmp_path / "tables")}.items()]]
    assert cli_main([*args, "forget-user", user]) == 0
    printed = capsys.readouterr().out
    for table, rows in before.items():                              # counts per table, as deleted
        assert f"{table:<22} {rows:>10,} rows deleted" in printed
    assert not any(_rows_per_table(storage, cfg, user).values())
    check_invariants(storage, cfg)                                  # aggregates recomputed without them
    Nightly(spark, cfg, storage).run(D[2])        # reads a user_sequences version from before the deletion
    assert not any(_rows_per_table(storage, cfg, user).values()), "an as-of re-run brought the user back"
    assert _files_naming(storage, cfg, user), "logical deletion: older versions keep their files"
    assert cli_main([*args, "maintain", "--vacuum", "--retention-hours", "0"]) == 1       # the check is on
    assert cli_main([*args, "maintain", "--vacuum", "--retention-hours", "0", "--no-retention-check"]) == 0
    assert _files_naming(storage, cfg, user) == [], "VACUUM completes the physical deletion"


# -- the notebook path ----------------------------------------------------------------------------------
def test_nightly_notebook_runs_without_spark_context(world, spark, tmp_path, monkeypatch):
    """notebooks/nightly.py end to end with a stand-in dbutils, while sparkContext raises as on Spark Connect."""
    from pyspark.sql import SparkSession

    cfg_path = tmp_path / "site.yaml"
    import yaml

    tree: dict = {}
    for key, value in {**world["overrides"], "storage.root": str(tmp_path / "tables")}.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg_path.write_text(yaml.safe_dump(tree))
    shutil.copytree(world["root"] / "backfilled", tmp_path / "tables")
    values = {}

    class Widgets:
        given = {"conf": str(cfg_path), "as_of": "", "allow_stale": "false", "overrides": "", "wheel": "unused"}

        def text(self, name, default, *a):
            pass

        dropdown = text

        def get(self, name):
            return self.given[name]

    class TaskValues:
        def get(self, taskKey, key, default="", debugValue=""):  # noqa: N803
            return D[3].isoformat() if (taskKey, key) == ("sessionize", "run_date") else default

        def set(self, key, value):
            values[key] = value

    dbutils = type("DBUtils", (), {"widgets": Widgets(), "jobs": type("J", (), {"taskValues": TaskValues()})(),
                                    "library": type("L", (), {"restartPython": staticmethod(lambda: None)})()})()

    def no_context(self):
        # PySpark's classic internals may use their own context; ebbtide's code and the notebook may not.
        caller = sys._getframe(1).f_code.co_filename
        if "ebbtide" in caller or "notebooks" in caller:
            raise AssertionError(f"spark.sparkContext used by {caller}: not available on Spark Connect")
        return self._sc

    monkeypatch.setattr(SparkSession, "sparkContext", property(no_context))
    source = open(os.path.join(os.path.dirname(__file__), "..", "notebooks", "nightly.py")).read()
    exec(compile(source, "notebooks/nightly.py", "exec"), {"dbutils": dbutils, "__name__": "__notebook__"})
    assert values["as_of"] == D[3].isoformat() and values["recommendations"] > 0


def test_a_failed_night_never_leaves_recommendations_without_their_inputs(world, spark, tmp_path, monkeypatch):
    """Commit order: a crash before the user_recommendations commit leaves the previous night as the newest
    complete one; re-running the date completes it."""
    from ebbtide.readers import latest_as_of

    cfg, storage = _copy(world, spark, tmp_path, **{"nightly.require_fresh": False})
    specs = table_specs(cfg)
    recs_path = storage.location(specs["user_recommendations"])
    real = storage.replace_where

    def crash_before_recommendations(spec, *args, **kwargs):
        if spec.name == specs["user_recommendations"].name:
            raise RuntimeError("killed before the last commit")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(storage, "replace_where", crash_before_recommendations)
    with pytest.raises(RuntimeError, match="killed"):
        Nightly(spark, cfg, storage).run(D[5])
    assert latest_as_of(recs_path) == D[4], "readers still see the last complete night"
    monkeypatch.setattr(storage, "replace_where", real)
    report = Nightly(spark, cfg, storage).run(D[5])
    assert latest_as_of(recs_path) == D[5]
    interest = storage.read(specs["user_interest"]).where(f"as_of = DATE'{D[5]}'").count()
    assert interest == report.active_users == len({r[0] for r in _recs(storage, cfg, D[5])})
