"""The reliability suite of issue 9: jobs SIGKILLed at their commit boundaries and re-run, backfills in any order,
re-runs at any time and with corrected input, concurrent runs of the same job. Every scenario ends by comparing
the tables with an uninterrupted in-order run (rows lost, rows duplicated) and checking the invariants.

`make test` runs a fast slice (one real SIGKILL on three days; test_reruns.py crashes sessionize in-process at
every commit boundary); `make reliability` runs all of it and prints the figures (tests/conftest.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from ebbtide.artifacts import latest_artifact
from ebbtide.config import load_config
from ebbtide.generate import generate
from ebbtide.nightly import OUTPUTS, Nightly
from ebbtide.runs import SESSIONIZE_DONE_TABLE, committed_dates
from ebbtide.sessionize import Sessionizer
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from ebbtide.train import train_models
from helpers import check_invariants, content_hash, state, table_rows

START = dt.date(2026, 11, 1)
DAYS = [START + dt.timedelta(days=i) for i in range(10)]
reliability = pytest.mark.reliability

SESSIONIZE_POINTS = ["read:events", "write:quarantine", "commit:quarantine", "commit:item_daily_counts",
                     "write:item_vocab", "commit:item_vocab", "write:sessions", "commit:sessions",
                     "write:user_sequences", "commit:user_sequences", "commit:event_redeliveries", "write:events",
                     "commit:events", "end:sessionize"]
# nightly commits item_embeddings -> user_interest -> user_recommendations (nightly.OUTPUTS), then its report
NIGHTLY_POINTS = ["read:user_interest", "write:item_embeddings", "commit:item_embeddings", "write:user_interest",
                  "commit:user_interest", "write:user_recommendations", "commit:user_recommendations", "end:nightly"]
NIGHTLY_TABLES = OUTPUTS


# --------------------------------------------------------------------------------------------------
# Data: ten generated days with bad records, duplicates, late events, and redeliveries with corrected times
# --------------------------------------------------------------------------------------------------
def _overrides(root: Path, tables: str = "tables", n_days: int = len(DAYS)) -> dict:
    return {"generate.out": str(root / "raw"), "generate.users": 40, "generate.items": 50, "generate.days": n_days,
            "generate.start_date": START.isoformat(), "generate.bad_record_rate": 0.03,
            "generate.duplicate_rate": 0.05, "generate.late_rate": 0.1, "generate.users_per_chunk": 40,
            "generate.sessions_per_user_day": 0.4, "generate.events_per_session": 3.0,
            "sessionize.input": str(root / "raw"), "storage.root": str(root / tables), "storage.engine": "rs",
            "storage.user_buckets": 2, "storage.max_rows_per_file": 100_000}


def _redeliver_with_corrected_times(raw: Path, days: list[dt.date], rng: random.Random) -> int:
    """Copy a few events of each day, with the same id and a shifted time, into a later day's input."""
    moved = 0
    for i, day in enumerate(days[:-1]):
        lines = [json.loads(x) for x in (raw / f"date={day}" / "part-00000.jsonl").read_text().splitlines()
                 if x.startswith('{"event_id":"')]
        picked = [x for x in lines if x.get("event_id")][:3]
        later = days[min(len(days) - 1, i + rng.choice([1, 2]))]
        with open(raw / f"date={later}" / "part-00000.jsonl", "a") as fh:
            for rec in picked:
                fh.write(json.dumps(dict(rec, ts=f"{later}T00:0{moved % 10}:00Z")) + "\n")
                moved += 1
    return moved


def _history(spark, root: Path, n_days: int):
    """n days of logs and the tables of an uninterrupted in-order run (the reference of every scenario), with a
    copy of the tables after each day."""
    cfg = load_config("local", _overrides(root, n_days=n_days))
    generate(cfg.generate, progress=False)
    _redeliver_with_corrected_times(root / "raw", DAYS[:n_days], random.Random(3))
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    snapshots = {}
    for day in DAYS[:n_days]:
        job.run(day)
        snapshots[day] = root / f"after-{day}"
        shutil.copytree(root / "tables", snapshots[day])
    return root, cfg, state(storage, cfg), snapshots


@pytest.fixture(scope="module")
def days(spark, tmp_path_factory):
    return _history(spark, tmp_path_factory.mktemp("reliability"), len(DAYS))


@pytest.fixture(scope="module")
def few_days(spark, tmp_path_factory):
    """Three days: enough for the real SIGKILL of the fast slice (`make test`)."""
    return _history(spark, tmp_path_factory.mktemp("reliability-fast"), 3)


def _state_at(spark, root: Path, snapshot: Path) -> dict:
    cfg = load_config("local", _overrides(root, snapshot.name))
    return state(open_storage(spark, cfg.storage), cfg)


def _tables_at(root: Path, snapshot: Path, name: str):
    shutil.copytree(snapshot, root / name)
    return load_config("local", _overrides(root, name))


def _converged(figures: Counter, ref: dict, got: dict) -> None:
    lost = sum(sum((Counter(ref[t]) - Counter(got[t])).values()) for t in ref)
    extra = sum(sum((Counter(got[t]) - Counter(ref[t])).values()) for t in ref)
    figures["rows lost"] += lost
    figures["rows duplicated"] += extra
    assert (lost, extra) == (0, 0), {t: (content_hash(ref[t]), content_hash(got[t])) for t in ref}
    assert got == ref


# --------------------------------------------------------------------------------------------------
# Backfill and re-run properties
# --------------------------------------------------------------------------------------------------
def _run_order(spark, cfg, order) -> dict:
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for day in order:
        job.run(day)
    check_invariants(storage, cfg)
    return state(storage, cfg)


@reliability
def test_a_shuffled_backfill_converges_to_the_in_order_result(days, spark, figures):
    root, cfg, ref, _ = days
    order = DAYS[:]
    random.Random(11).shuffle(order)
    got = _run_order(spark, load_config("local", _overrides(root, "shuffled")), order)
    figures["orders tried"] += 1
    _converged(figures, ref, got)


@reliability
@pytest.mark.parametrize("seed", [1, 2])
def test_more_orders_converge(days, spark, figures, seed):
    root, cfg, ref, _ = days
    order = DAYS[::-1] if seed == 1 else random.Random(seed).sample(DAYS, len(DAYS))
    got = _run_order(spark, load_config("local", _overrides(root, f"order-{seed}")), order)
    figures["orders tried"] += 1
    _converged(figures, ref, got)


def _finish_and_compare(job: Sessionizer, cfg, after: dt.date, figures: Counter, ref: dict) -> None:
    """Run the days after `after` in order, then compare every table with the reference."""
    for day in DAYS[DAYS.index(after) + 1:]:
        job.run(day)
    check_invariants(job.storage, cfg)
    _converged(figures, ref, state(job.storage, cfg))


@reliability
def test_any_date_rerun_at_any_time_converges(days, spark, figures):
    """Partial backfills re-run earlier dates in between; the end state is the in-order one."""
    root, cfg, ref, snapshots = days
    rng = random.Random(5)
    for k, after in enumerate((DAYS[3], DAYS[6], DAYS[9])):
        cfg_k = _tables_at(root, snapshots[after], f"rerun-{k}")
        storage = open_storage(spark, cfg_k.storage)
        job = Sessionizer(spark, cfg_k, storage)
        for day in rng.sample(DAYS[: DAYS.index(after) + 1], 2):
            job.run(day)
            figures["re-runs tried"] += 1
        _finish_and_compare(job, cfg_k, after, figures, ref)


def _record(line: str) -> dict | None:
    """The JSON object of a raw line; None for the generator's broken ones (truncated JSON among them)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _corrected(text: str, rng: random.Random) -> tuple[str, int, int]:
    """A day's input as a corrected redelivery: ~1 line in 5 withdrawn, ~1 event in 7 moved ten hours later."""
    kept, withdrawn, moved = [], 0, 0
    for line in text.splitlines():
        rec = _record(line)
        if rng.random() < 0.2:
            withdrawn += 1
            continue
        if rec and rec.get("event_id") and isinstance(rec.get("ts"), str) and "T0" in rec["ts"] \
                and rng.random() < 0.15:
            line = json.dumps(dict(rec, ts=rec["ts"].replace("T0", "T1", 1)))
            moved += 1
        kept.append(line)
    return "\n".join(kept) + "\n", withdrawn, moved


@reliability
def test_a_rerun_with_corrected_input_converges_to_the_in_order_result_of_the_corrected_input(days, spark, figures):
    root, cfg, _, snapshots = days
    day = DAYS[4]
    path = root / "raw" / f"date={day}" / "part-00000.jsonl"
    original = path.read_text()
    text, withdrawn, moved = _corrected(original, random.Random(9))
    assert withdrawn and moved, "the correction changes nothing: pick another seed"
    path.write_text(text)     # delivered where the original was, as a producer would (source_file stays the same)
    try:
        ref = _run_order(spark, load_config("local", _overrides(root, "corrected-ref")), DAYS)
        for name, at in (("corrected-after-all", DAYS[9]), ("corrected-midway", DAYS[6])):
            cfg_k = _tables_at(root, snapshots[at], name)
            job = Sessionizer(spark, cfg_k, open_storage(spark, cfg_k.storage))
            job.run(day)
            figures["corrected re-runs tried"] += 1
            _finish_and_compare(job, cfg_k, at, figures, ref)
    finally:
        path.write_text(original)   # the other scenarios share this input


# --------------------------------------------------------------------------------------------------
# SIGKILL at every commit boundary, then re-run
# --------------------------------------------------------------------------------------------------
def cli(cfg_overrides: dict, *args: str, faults: str = "", wait: bool = True):
    env = dict(os.environ, EBBTIDE_FAULTS=faults, PYSPARK_PYTHON=sys.executable)
    spark = {"spark.master": "local[1]", "spark.ui_enabled": "false", "spark.log_level": "ERROR",
             "spark.shuffle_partitions": 2, "spark.driver_memory": "1g"}
    cmd = [sys.executable, "-m", "ebbtide.cli", "--conf", "local"]
    cmd += [f"--set={k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in {**cfg_overrides, **spark}.items()]
    cmd += list(args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def _readable(spark, cfg, names) -> None:
    storage = open_storage(spark, cfg.storage)
    specs = table_specs(cfg)
    for name in names:
        if storage.exists(specs[name]):
            storage.read(specs[name]).count()


def _orphans_removed_by_vacuum(spark, cfg, names) -> None:
    """Write folders of the killed run are removed by vacuum once old enough; the tables stay as they are."""
    storage = open_storage(spark, cfg.storage)
    specs = table_specs(cfg)
    before = {n: table_rows(storage, cfg, n) for n in names}
    old = time.time() - 25 * 3600
    for name in names:
        for folder, _, files in os.walk(storage.location(specs[name])):
            for f in files if "_delta_log" not in folder else ():
                os.utime(os.path.join(folder, f), (old, old))
        storage.vacuum(specs[name], retention_hours=0, enforce_retention=False)
    for name in names:
        location = storage.location(specs[name])
        live = {f.path.split("/")[len(location.split("/"))] for f in storage.active_files(specs[name])}
        assert {n for n in os.listdir(location) if n.startswith("write-")} == live, name
        assert table_rows(storage, cfg, name) == before[name]


def _sessionized(storage, cfg, day) -> bool:
    return day in committed_dates(storage, table_specs(cfg)[SESSIONIZE_DONE_TABLE], [day])


def _kill_and_rerun_sessionize(history, spark, figures, point: str, name: str, day: dt.date) -> None:
    """`day` is killed at `point` (a real SIGKILL of `ebbtide sessionize`) after the days before it, then re-run."""
    root, cfg, _, snapshots = history
    cfg_k = _tables_at(root, snapshots[day - dt.timedelta(days=1)], name)
    rc, out, err = cli(_overrides(root, name), "sessionize", "--date", day.isoformat(), faults=point)
    assert rc == -signal.SIGKILL, (rc, err[-2000:])
    figures["faults injected"] += 1
    _readable(spark, cfg_k, table_specs(cfg_k))
    storage = open_storage(spark, cfg_k.storage)
    # the run counts as done (backfill skips it, nightly's guard accepts it) exactly once `events` is committed
    landed = point in ("commit:events", "end:sessionize")
    assert _sessionized(storage, cfg_k, day) == landed, point
    Sessionizer(spark, cfg_k, storage).run(day)
    assert _sessionized(storage, cfg_k, day)
    check_invariants(storage, cfg_k)
    _converged(figures, _state_at(spark, root, snapshots[day]), state(storage, cfg_k))
    _orphans_removed_by_vacuum(spark, cfg_k, ("quarantine", "sessions", "events"))
    figures["faults survived"] += 1


def test_sessionize_sigkilled_between_commits_is_completed_by_a_rerun(few_days, spark, figures):
    _kill_and_rerun_sessionize(few_days, spark, figures, "commit:sessions", "killed-fast", DAYS[2])


@reliability
@pytest.mark.parametrize("point", SESSIONIZE_POINTS)
def test_sessionize_sigkilled_anywhere_is_completed_by_a_rerun(days, spark, figures, point):
    _kill_and_rerun_sessionize(days, spark, figures, point, "killed-" + point.replace(":", "-"), DAYS[6])


@pytest.fixture(scope="module")
def nightly_base(days, spark, tmp_path_factory):
    """Tables after day 7 with a small trained model and nightly done for day 7."""
    root, _, _, snapshots = days
    cfg = _tables_at(root, snapshots[DAYS[6]], "nightly-base")
    overrides = {**_overrides(root, "nightly-base"), "train.output": str(root / "models"),
                 "train.models": ["decay_pool"], "train.max_len": 20, "train.dim": 8, "train.epochs": 1,
                 "train.batch_size": 16, "train.split": "leave_one_out", "train.reader_workers": 1,
                 "nightly.top_k": 5, "nightly.batch_size": 16}
    cfg = load_config("local", overrides)
    storage = open_storage(spark, cfg.storage)
    artifact = train_models(cfg, storage)["decay_pool"]
    overrides["nightly.model_version"] = str(artifact)
    cfg = load_config("local", overrides)
    Nightly(spark, cfg, open_storage(spark, cfg.storage)).run(DAYS[6])
    Sessionizer(spark, cfg, open_storage(spark, cfg.storage)).run(DAYS[7])
    ref_cfg = _copy_nightly(root, overrides, "nightly-ref")
    ref_storage = open_storage(spark, ref_cfg.storage)
    Nightly(spark, ref_cfg, ref_storage).run(DAYS[7])
    ref = {n: table_rows(ref_storage, ref_cfg, n) for n in NIGHTLY_TABLES}
    return root, overrides, ref


def _copy_nightly(root: Path, overrides: dict, name: str):
    shutil.copytree(root / "nightly-base", root / name)
    return load_config("local", {**overrides, "storage.root": str(root / name)})


@reliability
@pytest.mark.parametrize("point", NIGHTLY_POINTS)
def test_nightly_sigkilled_anywhere_is_completed_by_a_rerun(nightly_base, spark, figures, point):
    root, overrides, ref = nightly_base
    name = "nightly-killed-" + point.replace(":", "-")
    cfg = _copy_nightly(root, overrides, name)
    rc, out, err = cli({**overrides, "storage.root": str(root / name)}, "nightly", "--as-of", DAYS[7].isoformat(),
                       faults=point)
    assert rc == -signal.SIGKILL, (rc, err[-2000:])
    figures["faults injected"] += 1
    _readable(spark, cfg, NIGHTLY_TABLES)
    storage = open_storage(spark, cfg.storage)
    Nightly(spark, cfg, storage).run(DAYS[7])
    _converged(figures, ref, {n: table_rows(storage, cfg, n) for n in NIGHTLY_TABLES})
    figures["faults survived"] += 1


@reliability
def test_train_sigkilled_after_a_checkpoint_resumes_to_the_same_weights(days, spark, figures, tmp_path):
    root, _, _, snapshots = days
    _tables_at(root, snapshots[DAYS[9]], "train-tables")
    base = {**_overrides(root, "train-tables"), "train.models": ["gru"], "train.max_len": 20, "train.dim": 8,
            "train.epochs": 30, "train.patience": 100, "train.batch_size": 8, "train.split": "leave_one_out",
            "train.reader_workers": 1, "train.checkpoint_every": 2, "train.log_every": 1}
    whole_cfg = load_config("local", {**base, "train.output": str(tmp_path / "whole")})
    whole = train_models(whole_cfg, open_storage(spark, whole_cfg.storage))["gru"]
    killed_out = tmp_path / "killed"
    proc = cli({**base, "train.output": str(killed_out)}, "train", wait=False)
    deadline = time.time() + 600
    while not list(killed_out.glob("_runs/*/last.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before its first checkpoint: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    figures["faults injected"] += 1
    assert not (killed_out / "gru").exists()                             # no artifact from the killed run
    rc, out, err = cli({**base, "train.output": str(killed_out)}, "train")
    assert rc == 0, err[-3000:]
    assert "resumed gru" in err
    resumed = latest_artifact(killed_out, "gru")
    a = torch.load(Path(whole) / "weights.pt", weights_only=True)
    b = torch.load(resumed / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    figures["faults survived"] += 1


# --------------------------------------------------------------------------------------------------
# Two runs of the same job at once
# --------------------------------------------------------------------------------------------------
def _race(overrides: dict, first: list[str], second: list[str], hold_at: str, flag: Path):
    """`first` starts and stops at `hold_at` (files written, not committed) until `second` has finished."""
    held = cli(overrides, *first, faults=f"{hold_at}=wait:{flag}", wait=False)
    rc2, out2, err2 = cli(overrides, *second)
    flag.touch()
    out1, err1 = held.communicate(timeout=900)
    return (held.returncode, err1), (rc2, err2)


@reliability
def test_two_sessionize_runs_at_once(days, spark, figures):
    root, cfg, _, snapshots = days
    name = "race-sessionize"
    cfg_k = _tables_at(root, snapshots[DAYS[7]], name)
    (rc1, err1), (rc2, err2) = _race(_overrides(root, name), ["sessionize", "--date", DAYS[8].isoformat()],
                                     ["sessionize", "--date", DAYS[8].isoformat()], "write:quarantine",
                                     root / f"{name}.go")
    figures["concurrent runs tried"] += 1
    assert rc2 == 0, err2[-2000:]
    assert rc1 == 1 and "table quarantine: concurrent writer conflict" in err1, err1[-2000:]
    storage = open_storage(spark, cfg_k.storage)
    check_invariants(storage, cfg_k)
    _converged(figures, _state_at(spark, root, snapshots[DAYS[8]]), state(storage, cfg_k))


@reliability
def test_two_nightly_runs_at_once(nightly_base, spark, figures):
    root, overrides, ref = nightly_base
    name = "race-nightly"
    cfg = _copy_nightly(root, overrides, name)
    args = ["nightly", "--as-of", DAYS[7].isoformat()]
    (rc1, err1), (rc2, err2) = _race({**overrides, "storage.root": str(root / name)}, args, args,
                                     "write:item_embeddings", root / f"{name}.go")
    figures["concurrent runs tried"] += 1
    assert rc2 == 0, err2[-2000:]
    assert rc1 == 1 and "table item_embeddings: concurrent writer conflict" in err1, err1[-2000:]
    storage = open_storage(spark, cfg.storage)
    _converged(figures, ref, {n: table_rows(storage, cfg, n) for n in NIGHTLY_TABLES})
