"""Re-runs, backfills, corrected inputs, crashes and concurrent runs of sessionize on hand-written logs.

Each test reproduces a bug that an earlier version of the code had: issue 9, and reviews of the re-run narrowing of
issue 11 (only rows entering or leaving `events` touch users, unless the date's last run did not land)."""

from __future__ import annotations

import datetime as dt
import os
import time
from contextlib import contextmanager

import pytest
from ebbtide import faults
from ebbtide.sessionize import InputError, Sessionizer
from ebbtide.storage import TableConflictError, open_storage
from ebbtide.tables import table_specs
from helpers import check_invariants, ev, state, table_rows, write_day

D = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(6)]


@pytest.fixture
def env(spark, make_config, tmp_path):
    faults.reset()
    cfg = make_config(sessionize__input=str(tmp_path / "raw"), storage__user_buckets=2)
    storage = open_storage(spark, cfg.storage)
    yield tmp_path / "raw", cfg, storage, Sessionizer(spark, cfg, storage)
    faults.reset()


def fresh(spark, make_config, tmp_path, name):
    cfg = make_config(sessionize__input=str(tmp_path / "raw"), storage__user_buckets=2,
                      storage__root=str(tmp_path / name))
    storage = open_storage(spark, cfg.storage)
    return cfg, storage, Sessionizer(spark, cfg, storage)


def sequence(storage, cfg, user):
    row = storage.read(table_specs(cfg)["user_sequences"]).where(f"user_id = '{user}'").collect()
    return row[0] if row else None


def n_sessions(storage, cfg, user):
    return storage.read(table_specs(cfg)["sessions"]).where(f"user_id = '{user}'").count()


def test_rerunning_an_old_date_keeps_newer_data(env):
    """Bug 1: D1..D4 then D1 again lost D4 (the recompute window stopped at run date + 2)."""
    raw, cfg, storage, job = env
    for i, day in enumerate(D[:4]):
        write_day(raw, day, [ev("u1", f"i{i}", f"{day}T12:00:00Z")])
    for day in D[:4]:
        job.run(day)
    job.run(D[0])
    seq = sequence(storage, cfg, "u1")
    assert n_sessions(storage, cfg, "u1") == 4
    assert len(seq.item_idx) == 4 and seq.n_events == 4 and seq.session_idx == [0, 1, 2, 3]
    check_invariants(storage, cfg)


def test_a_crash_before_the_sequences_commit_is_completed_by_a_rerun(env, monkeypatch):
    """Bug 2: a crash after the events MERGE left n_events=1 for 3 events after the re-run."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z")])
    write_day(raw, D[1], [ev("u1", "b", f"{D[1]}T10:00:00Z"), ev("u1", "c", f"{D[1]}T11:00:00Z")])
    job.run(D[0])

    def crash(*args, **kwargs):
        raise RuntimeError("killed")
    with monkeypatch.context() as m:
        m.setattr(Sessionizer, "_update_sequences", crash)
        with pytest.raises(RuntimeError, match="killed"):
            job.run(D[1])
    job.run(D[1])
    seq = sequence(storage, cfg, "u1")
    assert len(seq.item_idx) == 3 and seq.n_events == 3
    check_invariants(storage, cfg)


def slow(*points):
    """Fault points run only by `make reliability` (each costs about a minute; `make test` keeps the others)."""
    return [pytest.param(p, marks=pytest.mark.reliability) for p in points]


@pytest.mark.parametrize("point", ["commit:item_vocab", "commit:user_sequences", *slow(
    "write:quarantine", "write:sessions", "commit:sessions", "commit:event_redeliveries", "commit:events")])
def test_a_run_killed_at_any_commit_boundary_converges(env, spark, make_config, tmp_path, monkeypatch, point):
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1"),
                          ev("u2", "b", f"{D[0]}T10:00:00Z", event_id="e2")])
    write_day(raw, D[1], [ev("u1", "c", f"{D[1]}T10:00:00Z", event_id="e3"),
                          ev("u2", "b", f"{D[0]}T10:05:00Z", event_id="e2"),    # a redelivery, corrected ts
                          ev("u3", "d", f"{D[0]}T23:50:00Z", event_id="e4")])
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    for day in (D[1], D[0]):
        ref_job.run(day)
    job.run(D[1])
    monkeypatch.setenv(faults.ENV, f"{point}=raise")   # D1 supersedes D2's copy of e2: every table changes
    with pytest.raises(faults.InjectedFault):
        job.run(D[0])
    monkeypatch.delenv(faults.ENV)
    job.run(D[0])
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)


@pytest.mark.parametrize("point", ["write:events", *slow("commit:event_redeliveries", "commit:events")])
def test_a_promotion_killed_between_the_two_commits_keeps_the_later_copy(env, spark, make_config, tmp_path,
                                                                         monkeypatch, point):
    """A corrected re-run withdraws e2, so D3's parked copy takes over; a kill after the event_redeliveries commit
    and before the events one used to drop that copy with the withdrawn one (e2 lost until D3 was re-run)."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1"),
                          ev("u1", "b", f"{D[0]}T10:10:00Z", event_id="e2")])
    write_day(raw, D[2], [ev("u1", "b", f"{D[0]}T10:15:00Z", event_id="e2"),   # redelivered, corrected ts
                          ev("u2", "z", f"{D[2]}T10:00:00Z", event_id="e9")])
    job.run(D[0])
    job.run(D[2])
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1")])   # corrected: e2 withdrawn
    monkeypatch.setenv(faults.ENV, f"{point}=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(D[0])
    monkeypatch.delenv(faults.ENV)
    report = job.run(D[0])
    assert (report.read, report.kept, report.duplicates_of_earlier) == (1, 1, 0)
    kept = {r.event_id: (r.ts.minute, r.ingest_date) for r in storage.read(table_specs(cfg)["events"]).collect()}
    assert kept == {"e1": (0, D[0]), "e2": (15, D[2]), "e9": (0, D[2])}
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    for day in (D[2], D[0]):
        ref_job.run(day)
    assert state(storage, cfg) == state(ref, ref_cfg)
    assert check_invariants(storage, cfg)["duplicated"] == 0
    assert job.run(D[2]).duplicates_of_earlier == 0          # a re-run of D3 finds its copy kept, nothing parked
    assert table_rows(storage, cfg, "event_redeliveries") == []   # and removes the copy left parked
    assert state(storage, cfg) == state(ref, ref_cfg)


def test_a_killed_run_is_healed_by_its_rerun_after_an_earlier_date_took_over_its_event(env, spark, make_config,
                                                                                       tmp_path, monkeypatch):
    """D2 is killed after its item_vocab commit (the vocabulary counts e1 on D2, `events` does not), then D1 takes
    e1 over (the earliest ingest date wins). The re-run of D2 changes no row of e1, yet must bring item a's totals
    back in line: a re-run re-derives every winner, not only the rows it moves."""
    raw, cfg, storage, job = env
    write_day(raw, D[1], [ev("u1", "a", f"{D[1]}T10:00:00Z", event_id="e1"),
                          ev("u2", "b", f"{D[1]}T11:00:00Z", event_id="e2")])
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T23:00:00Z", event_id="e1")])    # e1 again, an earlier time
    monkeypatch.setenv(faults.ENV, "commit:item_vocab=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(D[1])
    monkeypatch.delenv(faults.ENV)
    job.run(D[0])
    job.run(D[1])
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    for day in (D[0], D[1]):
        ref_job.run(day)
    assert state(storage, cfg) == state(ref, ref_cfg)
    vocab = {r.item_id: r.n_events for r in storage.read(table_specs(cfg)["item_vocab"]).collect()}
    assert vocab == {"a": 1, "b": 1}
    check_invariants(storage, cfg)


def test_a_killed_corrected_rerun_is_undone_by_a_rerun_of_the_original_input(env, spark, make_config, tmp_path,
                                                                             monkeypatch):
    """A corrected input moves e2 to another session and its run is killed after the sequences commit; the
    correction is then withdrawn. The re-run of the original input moves no row of `events`, yet must put u1's
    sessions and sequence back: one session of two events."""
    raw, cfg, storage, job = env
    original = [ev("u1", "a", f"{D[0]}T05:00:00Z", event_id="e1"), ev("u1", "b", f"{D[0]}T05:10:00Z", event_id="e2")]
    write_day(raw, D[0], original)
    job.run(D[0])
    write_day(raw, D[0], [original[0], ev("u1", "b", f"{D[0]}T15:10:00Z", event_id="e2")])
    monkeypatch.setenv(faults.ENV, "commit:user_sequences=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(D[0])
    monkeypatch.delenv(faults.ENV)
    assert n_sessions(storage, cfg, "u1") == 2                   # the killed run left sessions ahead of events
    write_day(raw, D[0], original)
    job.run(D[0])
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    ref_job.run(D[0])
    assert state(storage, cfg) == state(ref, ref_cfg)
    assert n_sessions(storage, cfg, "u1") == 1 and sequence(storage, cfg, "u1").session_idx == [0, 0]
    check_invariants(storage, cfg)


def test_an_event_id_redelivered_with_a_corrected_timestamp_is_kept_once(env, spark, make_config, tmp_path):
    """Bug 4: the copy in another event_date partition was not found; both copies were kept."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T23:59:00Z", event_id="e1")])
    write_day(raw, D[1], [ev("u1", "a", f"{D[1]}T00:01:00Z", event_id="e1"), ev("u1", "b", f"{D[1]}T09:00:00Z")])
    job.run(D[0])
    report = job.run(D[1])
    events = storage.read(table_specs(cfg)["events"]).collect()
    assert sorted((r.event_id == "e1", r.event_date) for r in events) == [(False, D[1]), (True, D[0])]
    assert report.duplicates_of_earlier == 1 and report.kept == 1
    other_cfg, other, other_job = fresh(spark, make_config, tmp_path, "reversed")
    other_job.run(D[1])
    assert other_job.run(D[0]).superseded_later == 1       # the earlier ingest date takes over
    assert state(other, other_cfg) == state(storage, cfg)
    assert sequence(storage, cfg, "u1").n_events == 2


def test_the_dedup_lookback_bounds_where_earlier_copies_are_looked_for(spark, make_config, tmp_path):
    """A copy with the same timestamp lies in its own event_date; a copy whose timestamp was corrected by more days
    than sessionize.dedup_lookback_days is not looked for (documented), by fewer it is; null searches everything."""
    raw = tmp_path / "raw"
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T12:00:00Z", event_id="e1")])
    write_day(raw, D[3], [ev("u1", "a", f"{D[2]}T12:00:00Z", event_id="e1"), ev("u2", "b", f"{D[3]}T09:00:00Z")])
    kept = {}
    for lookback in (1, 2, None):
        cfg = make_config(sessionize__input=str(raw), storage__user_buckets=2, storage__root=str(tmp_path / f"{lookback}"),
                          sessionize__dedup_lookback_days=lookback)
        storage = open_storage(spark, cfg.storage)
        job = Sessionizer(spark, cfg, storage)
        job.run(D[0])
        job.run(D[3])
        kept[lookback] = sorted(r.event_date for r in storage.read(table_specs(cfg)["events"]).collect()
                                if r.event_id == "e1")
    assert kept == {1: [D[0], D[2]], 2: [D[0]], None: [D[0]]}


def test_rerun_with_corrected_input_replaces_that_dates_events(env):
    """Bug 7: a corrected input could never be re-run (read 1 != kept 2); old events were never removed."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1"),
                          ev("u1", "b", f"{D[0]}T10:10:00Z", event_id="e2")])
    write_day(raw, D[1], [ev("u2", "z", f"{D[1]}T10:00:00Z", event_id="e9"),
                          ev("u1", "b", f"{D[0]}T10:10:00Z", event_id="e2")])   # also redelivered on D2
    job.run(D[0])
    job.run(D[1])
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T11:00:00Z", event_id="e1")])   # corrected: e2 withdrawn, e1 moved
    report = job.run(D[0])
    assert (report.read, report.kept, report.withdrawn) == (1, 1, 1)
    kept = {r.event_id: (r.ts.hour, r.ingest_date) for r in storage.read(table_specs(cfg)["events"]).collect()}
    assert kept == {"e1": (11, D[0]), "e2": (10, D[1]), "e9": (10, D[1])}        # D2's copy of e2 took over
    seq = sequence(storage, cfg, "u1")
    assert seq.n_events == 2 and seq.ts == sorted(seq.ts)
    check_invariants(storage, cfg)


def test_a_corrected_input_that_shrinks_a_full_window_refills_it_from_history(spark, make_config, tmp_path):
    """A sequence keeps the last max_len events; when recent events are withdrawn, older ones must come back."""
    raw = tmp_path / "raw"
    cfg = make_config(sessionize__input=str(raw), sessionize__max_len=3, train__max_len=3, storage__user_buckets=2)
    storage = open_storage(spark, cfg.storage)
    job = Sessionizer(spark, cfg, storage)
    for i, day in enumerate(D[:5]):
        write_day(raw, day, [ev("u1", f"i{i}", f"{day}T12:00:00Z", event_id=f"e{i}")])
    for day in D[:5]:
        job.run(day)
    assert sequence(storage, cfg, "u1").n_events == 5
    write_day(raw, D[4], [ev("u2", "x", f"{D[4]}T12:00:00Z")])        # D5's only event of u1 withdrawn
    job.run(D[4])
    write_day(raw, D[3], [ev("u2", "y", f"{D[3]}T12:00:00Z")])        # and D4's
    job.run(D[3])
    seq = sequence(storage, cfg, "u1")
    vocab = {r.item_idx: r.item_id for r in storage.read(table_specs(cfg)["item_vocab"]).collect()}
    assert [vocab[i] for i in seq.item_idx] == ["i0", "i1", "i2"] and seq.n_events == 3
    check_invariants(storage, cfg)


def test_empty_day_folder_is_refused_and_keeps_that_days_data(env, tmp_path):
    """Bug 10: an empty JSON day folder succeeded and wiped that date's quarantine."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z"), "{broken"])
    job.run(D[0])
    before = state(storage, cfg)
    (raw / f"date={D[0]}" / "part-0.jsonl").write_text("")
    with pytest.raises(InputError, match="no records in .*refusing to replace"):
        job.run(D[0])
    assert state(storage, cfg) == before


def test_two_runs_at_once_one_commits_each_table_the_other_fails_naming_it(env, spark, make_config, tmp_path):
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1")])
    write_day(raw, D[1], [ev("u1", "b", f"{D[1]}T10:00:00Z", event_id="e2")])
    rival = Sessionizer(spark, cfg, open_storage(spark, cfg.storage))   # another process on the same tables
    faults.on("write:quarantine", lambda: rival.run(D[1]))             # it runs while this one is mid-write
    with pytest.raises(TableConflictError, match="table quarantine: concurrent writer conflict"):
        job.run(D[0])
    assert [r.event_id for r in storage.read(table_specs(cfg)["events"]).collect()] == ["e2"]
    job.run(D[0])                                                      # the failed run, re-run, completes
    assert sequence(storage, cfg, "u1").n_events == 2
    check_invariants(storage, cfg)


def test_a_killed_run_with_a_user_its_rerun_drops_leaves_nothing_of_that_user(env, spark, make_config, tmp_path,
                                                                              monkeypatch):
    """A corrected input adds u9 (item z) and its run is killed after the sequences commit; the re-run of the
    original input has no row of u9. `events` never held u9, yet the killed run left u9's sessions, sequence and
    item z in the derived tables: the re-run must remove them."""
    raw, cfg, storage, job = env
    original = [ev("u1", "a", f"{D[0]}T05:00:00Z", event_id="e1")]
    write_day(raw, D[0], original)
    job.run(D[0])
    write_day(raw, D[0], original + [ev("u9", "z", f"{D[0]}T06:00:00Z", event_id="e9")])
    monkeypatch.setenv(faults.ENV, "commit:user_sequences=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(D[0])
    monkeypatch.delenv(faults.ENV)
    assert n_sessions(storage, cfg, "u9") == 1                   # the killed run left u9 ahead of events
    write_day(raw, D[0], original)
    job.run(D[0])
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    ref_job.run(D[0])
    assert n_sessions(storage, cfg, "u9") == 0 and sequence(storage, cfg, "u9") is None
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)


def _kill(job, day, monkeypatch, point):
    monkeypatch.setenv(faults.ENV, f"{point}=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(day)
    monkeypatch.delenv(faults.ENV)


@pytest.mark.reliability
def test_a_rerun_with_no_valid_event_after_a_killed_first_run_completes(env, spark, make_config, tmp_path,
                                                                        monkeypatch):
    """The first run of D0 is killed after its item commits; the corrected day holds no valid event (same with an
    empty day and sessionize.allow_empty_input=true). The residue holds item rows only (no user), so plan.dates is
    non-empty while no user is affected: _update_users took users["first"] (None).date() -> AttributeError, on
    every re-run."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T10:00:00Z", event_id="e1")])
    _kill(job, D[0], monkeypatch, "commit:item_vocab")
    write_day(raw, D[0], ["{broken"])
    report = job.run(D[0])
    assert (report.read, report.kept, report.quarantined) == (1, 0, 1)
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    ref_job.run(D[0])
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)


def test_a_session_a_killed_run_only_deleted_is_restored_by_the_rerun(env, spark, make_config, tmp_path,
                                                                       monkeypatch):
    """e1 is kept from D2 (u1 at 10:40). D1's run has e1 corrected to 11:20 (D1's copy wins), and is killed after
    the sequences commit: it deleted u1's 10:40 session and wrote one at 11:20. The re-run of D1 no longer holds
    e1, so nothing names e1 (its kept copy is D2's); the residue only names u1 from 11:20 (the rows written), and
    the recompute from 11:20 deletes u1's session and sequence while `events` still holds e1 at 10:40."""
    raw, cfg, storage, job = env
    write_day(raw, D[2], [ev("u1", "z", f"{D[0]}T10:40:00Z", event_id="e1")])
    job.run(D[2])
    other = ev("u2", "b", f"{D[1]}T09:00:00Z", event_id="e2")
    write_day(raw, D[1], [ev("u1", "z", f"{D[0]}T11:20:00Z", event_id="e1"), other])
    _kill(job, D[1], monkeypatch, "commit:user_sequences")
    write_day(raw, D[1], [other])
    job.run(D[1])
    kept = {r.event_id: (r.ts.hour, r.ts.minute, r.ingest_date)
            for r in storage.read(table_specs(cfg)["events"]).collect()}
    assert kept == {"e1": (10, 40, D[2]), "e2": (9, 0, D[1])}
    assert n_sessions(storage, cfg, "u1") == 1 and sequence(storage, cfg, "u1").n_events == 1
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    for day in (D[2], D[1]):
        ref_job.run(day)
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)


@pytest.mark.reliability
def test_an_item_count_a_killed_run_only_deleted_is_restored_by_the_rerun(env, spark, make_config, tmp_path,
                                                                          monkeypatch):
    """e1 (item z, event date D1) is kept from D3. D2's run moves e1 to D2 00:10 (D2's copy wins) and is killed after
    the sequences commit: its recount of D1 only deleted (z, D1), and it wrote (z, D2). The re-run of D2 no longer
    holds e1; no residue row names D1 (u1's session starts on D0), so D1 is never recounted: item_daily_counts
    lacks (z, D1) and item_vocab says z has 0 events, while `events` holds e1 on D1. (Sessions heal here.)"""
    raw, cfg, storage, job = env
    write_day(raw, D[3], [ev("u1", "a", f"{D[0]}T23:55:00Z", event_id="e0"),
                          ev("u1", "z", f"{D[1]}T00:10:00Z", event_id="e1")])
    job.run(D[3])
    other = ev("u2", "b", f"{D[2]}T09:00:00Z", event_id="e2")
    write_day(raw, D[2], [ev("u1", "z", f"{D[2]}T00:10:00Z", event_id="e1"), other])
    _kill(job, D[2], monkeypatch, "commit:user_sequences")
    write_day(raw, D[2], [other])
    job.run(D[2])
    counts = {(r.item_id, r.event_date): r.n_events
              for r in storage.read(table_specs(cfg)["item_daily_counts"]).collect()}
    assert counts == {("a", D[0]): 1, ("z", D[1]): 1, ("b", D[2]): 1}
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    for day in (D[3], D[2]):
        ref_job.run(day)
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)


@contextmanager
def _driver_time_zone(tz: str):
    """The Python driver's local zone (Spark's session zone stays UTC)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_a_driver_east_of_utc_keeps_the_sessions_of_a_late_utc_evening(env):
    """_update_users takes first_day = users["first"].date(): PySpark turns a collected timestamp into a naive
    datetime in the driver's *local* zone. On a driver at UTC+9, 20:00Z on D0 is 05:00 on D0+1, so the window of
    events partitions starts a day late: no event of D0 is read, u1's session is never written (a later run would
    delete it as stale) and the sequence gets n_events 0 (deleted)."""
    raw, cfg, storage, job = env
    write_day(raw, D[0], [ev("u1", "a", f"{D[0]}T20:00:00Z", event_id="e1"),
                          ev("u1", "b", f"{D[0]}T20:10:00Z", event_id="e2")])
    with _driver_time_zone("JST-9"):
        job.run(D[0])
    assert n_sessions(storage, cfg, "u1") == 1
    seq = sequence(storage, cfg, "u1")
    assert seq is not None and seq.n_events == 2
    check_invariants(storage, cfg)


@pytest.mark.reliability
def test_a_rerun_completes_after_the_killed_runs_old_log_entries_were_cleaned_up(
        env, spark, make_config, tmp_path, monkeypatch):
    """delta-rs removes commit files older than delta.logRetentionDuration (30 days) once a checkpoint follows them.
    A killed run re-run after that: version_with_marker walks back to the version before the killed commit, which
    can no longer be loaded (TableNotFoundError 'No files in log segment'), so the re-run fails, and every later
    re-run the same way. Where that version cannot be loaded the re-run should treat it as unknown (-1: every row
    is touched) and complete."""
    from deltalake import DeltaTable

    raw, cfg, storage, job = env
    original = [ev("u1", "a", f"{D[0]}T05:00:00Z", event_id="e1"), ev("u1", "b", f"{D[0]}T05:10:00Z", event_id="e2")]
    write_day(raw, D[0], original)
    job.run(D[0])
    write_day(raw, D[0], [original[0], ev("u1", "b", f"{D[0]}T15:10:00Z", event_id="e2")])
    monkeypatch.setenv(faults.ENV, "commit:sessions=raise")
    with pytest.raises(faults.InjectedFault):
        job.run(D[0])
    monkeypatch.delenv(faults.ENV)
    assert n_sessions(storage, cfg, "u1") == 2                   # the killed run left sessions ahead of events
    # What delta-rs's expired-log cleanup does in time (here with a zero retention): checkpoint, drop older commits.
    table = DeltaTable(storage.location(table_specs(cfg)["sessions"]))
    table.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"},
                                     raise_if_not_exists=False)
    table = DeltaTable(storage.location(table_specs(cfg)["sessions"]))
    table.create_checkpoint()
    time.sleep(1.1)
    table.cleanup_metadata()
    write_day(raw, D[0], original)
    job.run(D[0])
    ref_cfg, ref, ref_job = fresh(spark, make_config, tmp_path, "ref")
    ref_job.run(D[0])
    assert n_sessions(storage, cfg, "u1") == 1
    assert state(storage, cfg) == state(ref, ref_cfg)
    check_invariants(storage, cfg)
