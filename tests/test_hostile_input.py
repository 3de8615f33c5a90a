"""Hostile input: every kind is kept exactly, quarantined with a reason, or refused with a clear message, and the
reconciliation read = kept + quarantined + duplicates holds. Bugs 5, 6, 8 and 10 of issue 9 among them."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ebbtide.sessionize import InputError, Sessionizer
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from helpers import check_invariants, write_day

DAY = dt.date(2026, 11, 1)
T = "2026-11-01T12:00:00Z"
E = 1793534400   # 2026-11-01T12:00:00Z in epoch seconds
HUGE = "x" * 1_000_000


def rec(i, **fields):
    base = {"event_id": f"h{i:02d}", "user_id": "u1", "item_id": f"it{i}", "event_type": "view", "ts": T}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()

# (kind, JSON line as bytes or a record, expected: "kept" or the quarantine reason)
JSON_CASES = [
    ("plain record", rec(1), "kept"),
    ("truncated JSON", json.dumps(rec(2))[:30], "unparseable_record"),
    ("JSON array line", '[{"event_id": "h03", "user_id": "u1"}]', "unparseable_record"),
    ("bare string line", '"h04 just a string"', "unparseable_record"),
    ("empty object", '{"event_id": "h05"}', "missing_user_id"),
    ("user_id is an object", rec(6, user_id={"id": "u1"}), "wrong_type"),
    ("item_id is an array", rec(7, item_id=["a"]), "wrong_type"),
    ("ts is an array", rec(8, ts=[T]), "wrong_type"),
    ("weight is text", rec(9, weight="heavy"), "wrong_type"),
    ("item id that looks like an array", rec(10, item_id="[promo]"), "kept"),
    ("item id that looks like an object", rec(11, item_id="{sale}"), "kept"),
    ("numeric ids", rec(12, user_id=12345, item_id=7), "kept"),
    ("null user_id", rec(13, user_id=None), "missing_user_id"),
    ("null item_id", rec(14, item_id=None), "missing_item_id"),
    ("null ts", rec(15, ts=None), "unparseable_timestamp"),
    ("null weight (type default)", rec(16, weight=None), "kept"),
    ("null event_id (stable id)", rec(17, event_id=None), "kept"),
    ("empty user_id", rec(18, user_id=""), "missing_user_id"),
    ("blank item_id", rec(19, item_id="   "), "missing_item_id"),
    ("empty event_type", rec(20, event_type=""), "unknown_event_type"),
    ("empty ts", rec(21, ts=""), "unparseable_timestamp"),
    ("empty weight", rec(22, weight=""), "wrong_type"),
    ("escaped control character in an id", rec(23, user_id="u\u0001x"), "control_character"),
    ("raw control character in a string", b'{"event_id": "h24", "user_id": "u\x01", "item_id": "a", '
                                          b'"event_type": "view", "ts": "' + T.encode() + b'"}', "unparseable_record"),
    ("invalid UTF-8 at the start of a line", b"\xff" + json.dumps(rec(25)).encode(), "invalid_utf8"),
    ("invalid UTF-8 inside a value", json.dumps(rec(26, item_id="ITEM")).encode().replace(b"ITEM", b"I\xc3\x28M"),
     "invalid_utf8"),
    ("valid U+FFFD in a value", rec(27, item_id="\ufffd"), "kept"),
    ("1 MB line", rec(28, item_id=HUGE), "oversize_field"),
    ("negative weight", rec(29, weight=-1.0), "invalid_weight"),
    ("zero weight", rec(30, weight=0), "invalid_weight"),
    ("NaN weight (bare token)", json.dumps(rec(31)).replace("}", ', "weight": NaN}'), "wrong_type"),
    ("NaN weight (string)", rec(32, weight="NaN"), "invalid_weight"),
    ("infinite weight", rec(33, weight="Infinity"), "invalid_weight"),
    ("overflowing weight", json.dumps(rec(34)).replace("}", ', "weight": 1e400}'), "wrong_type"),
    ("numeric string weight", rec(35, weight="2.5"), "kept"),
    ("negative epoch", rec(36, ts=-5), "timestamp_too_old"),
    ("zero epoch", rec(37, ts=0), "timestamp_too_old"),
    ("far-future timestamp", rec(38, ts="2999-01-01T00:00:00Z"), "timestamp_in_future"),
    ("year 10000 timestamp", rec(39, ts="10000-01-01T00:00:00Z"), "timestamp_in_future"),
    ("epoch ms in a file of ISO stamps", rec(40, ts=(E + 60) * 1000), "kept"),
    ("offset ISO stamp", rec(41, ts="2026-11-01T14:00:00+02:00"), "kept"),
    ("zone-less ISO stamp", rec(42, ts="2026-11-01 12:00:00"), "kept"),
    ("unknown event type", rec(43, event_type="hover"), "unknown_event_type"),
    ("same event_id, other content, same day", rec(1, item_id="other"), "duplicate"),
    ("extra columns", rec(45, country="NL", extra={"a": 1}), "kept"),
    ("missing optional columns", rec(46, event_id=_DROP), "kept"),
    ("upper-case event type", rec(47, event_type=" VIEW "), "kept"),
]


def _marker(case) -> str:
    return re.search(r"h\d\d", _line(case).decode("utf-8", "replace")).group()


def _line(case) -> bytes:
    value = case[1]
    if isinstance(value, bytes):
        return value
    return (value if isinstance(value, str) else json.dumps(value)).encode()


@pytest.fixture
def job(spark, make_config, tmp_path):
    cfg = make_config(sessionize__input=str(tmp_path / "raw"))
    storage = open_storage(spark, cfg.storage)
    return tmp_path / "raw", cfg, storage, Sessionizer(spark, cfg, storage)


def _quarantine(storage, cfg):
    return storage.read(table_specs(cfg)["quarantine"]).collect()


def test_every_hostile_json_kind(job, figures):
    raw, cfg, storage, sessionizer = job
    write_day(raw, DAY, [_line(c) for c in JSON_CASES])
    write_day(raw, DAY, [], name="part-1-empty.jsonl")                       # an empty file beside them
    report = sessionizer.run(DAY)
    expected_kept = [c for c in JSON_CASES if c[2] == "kept"]
    expected_bad = sorted(c[2] for c in JSON_CASES if c[2] not in ("kept", "duplicate"))
    assert report.read == len(JSON_CASES) and report.duplicates_in_batch == 1
    got = {re.search(r"h\d\d", r.raw).group(): r.reason for r in _quarantine(storage, cfg)}
    want = {_marker(c): c[2] for c in JSON_CASES if c[2] not in ("kept", "duplicate")}
    assert got == want
    assert report.kept == len(expected_kept) and sorted(got.values()) == expected_bad
    report.check()
    # kept rows are exactly what was sent
    events = {r.event_id: r for r in storage.read(table_specs(cfg)["events"]).collect()}
    assert events["h10"].item_id == "[promo]" and events["h11"].item_id == "{sale}"
    assert events["h12"].user_id == "12345" and events["h35"].weight == 2.5 and events["h16"].weight == 1.0
    assert events["h27"].item_id == "\ufffd" and events["h47"].event_type == "view"
    assert events["h41"].ts == events["h01"].ts == events["h42"].ts
    # a huge line: a bounded prefix, its length and its hash
    huge = next(r for r in _quarantine(storage, cfg) if r.reason == "oversize_field")
    line = _line(next(c for c in JSON_CASES if c[0] == "1 MB line"))
    assert len(huge.raw) == cfg.sessionize.max_record_chars and huge.raw_chars == len(line)
    assert huge.raw_sha256 == hashlib.sha256(line).hexdigest()
    bad_bytes = next(r for r in _quarantine(storage, cfg) if r.raw and r.raw.startswith("\ufffd"))
    assert bad_bytes.reason == "invalid_utf8" and bad_bytes.user_id == "u1"   # found for forget-user
    # the Delta log holds standard JSON only (no Infinity / NaN in statistics)
    log_dir = os.path.join(storage.location(table_specs(cfg)["events"]), "_delta_log")
    def strict(token):
        raise ValueError(f"non-standard JSON {token} in the Delta log")
    for name in os.listdir(log_dir):
        if name.endswith(".json"):
            for entry in open(os.path.join(log_dir, name)):
                json.loads(entry, parse_constant=strict)
    check_invariants(storage, cfg)
    figures["bad-input kinds tried"] += len(JSON_CASES)


def test_the_same_event_id_across_days_with_other_content(job, figures):
    raw, cfg, storage, sessionizer = job
    write_day(raw, DAY, [rec(1)])
    write_day(raw, DAY + dt.timedelta(days=1), [rec(1, item_id="changed", ts="2026-11-02T08:00:00Z")])
    sessionizer.run(DAY)
    report = sessionizer.run(DAY + dt.timedelta(days=1))
    assert report.duplicates_of_earlier == 1 and report.kept == 0
    assert [r.item_id for r in storage.read(table_specs(cfg)["events"]).collect()] == ["it1"]
    figures["bad-input kinds tried"] += 1


CSV_A = ("user_id,event_id,item_id,event_type,ts,weight\n"
         'u1,c1,"a ""quoted"" item",view,2026-11-01T12:00:00Z,\n'
         'u1,c2,"multi\nline, with comma",click,2026-11-01T12:01:00Z,2\n'
         "u1,c3,x,view,2026-11-01T12:02:00Z,1,EXTRA\n"
         "u1,c4,x,view\n")
CSV_B = ("\ufeffevent_id,ts,item_id,user_id,event_type\n"        # another column order, a byte-order mark
         "c5,2026-11-01T12:03:00Z,b,u2,view\n")


def test_csv_is_read_by_header_with_rfc4180_quoting(job, spark, make_config, tmp_path, figures):
    raw, _, _, _ = job
    folder = raw / f"date={DAY}"
    folder.mkdir(parents=True)
    (folder / "a.csv").write_text(CSV_A)
    (folder / "b.csv").write_text(CSV_B)
    (folder / "c.csv").write_bytes(b"user_id,item_id,event_type,ts\nu3,b\xffx,view,2026-11-01T12:00:00Z\n")
    (folder / "d.csv").write_text("")
    cfg = make_config(sessionize__input=str(raw), sessionize__format="csv")
    storage = open_storage(spark, cfg.storage)
    report = Sessionizer(spark, cfg, storage).run(DAY)
    events = {r.event_id: r for r in storage.read(table_specs(cfg)["events"]).collect()}
    assert events["c1"].item_id == 'a "quoted" item' and events["c1"].weight == 1.0
    assert (events["c5"].user_id, events["c5"].item_id) == ("u2", "b")        # by name, not by position
    reasons = {json.loads(r.raw).get("event_id", "u3") if r.raw.startswith("{") else r.raw[:5]: r.reason
               for r in _quarantine(storage, cfg)}
    # a quoted newline stays inside its record (which an id cannot hold); more or fewer fields than the header
    # quarantine the record whole
    assert reasons == {"c2": "control_character", "u1,c3": "unparseable_record", "u1,c4": "unparseable_record",
                       "u3": "invalid_utf8"}
    assert (report.read, report.kept, report.quarantined) == (6, 2, 4)
    figures["bad-input kinds tried"] += 6


def test_parquet_files_of_different_schemas_and_a_zero_byte_file(job, spark, make_config, tmp_path, figures):
    raw, _, _, _ = job
    folder = raw / f"date={DAY}"
    folder.mkdir(parents=True)
    ts = pa.array([dt.datetime(2026, 11, 1, 12, tzinfo=dt.timezone.utc)], pa.timestamp("us", tz="UTC"))
    pq.write_table(pa.table({"user_id": ["u1"], "item_id": ["a"], "event_type": ["view"], "ts": ts,
                             "weight": [2.0]}), folder / "a.parquet")
    pq.write_table(pa.table({"user_id": [7], "item_id": ["b"], "event_type": ["view"], "ts": ts,
                             "weight": ["3.5"]}), folder / "b.parquet")             # other column types
    pq.write_table(pa.table({"user_id": ["u2"], "item_id": ["c"], "event_type": ["view"], "ts": ts,
                             "weight": [float("inf")]}), folder / "c.parquet")
    cfg = make_config(sessionize__input=str(raw), sessionize__format="parquet")
    storage = open_storage(spark, cfg.storage)
    job_ = Sessionizer(spark, cfg, storage)
    report = job_.run(DAY)
    assert (report.read, report.kept, report.quarantine_by_reason) == (3, 2, {"invalid_weight": 1})
    assert sorted((r.user_id, r.weight) for r in storage.read(table_specs(cfg)["events"]).collect()) == \
        [("7", 3.5), ("u1", 2.0)]
    (folder / "d.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="0 bytes, not Parquet.*d.parquet"):
        job_.run(DAY)
    (folder / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="d.parquet"):
        job_.run(DAY)
    figures["bad-input kinds tried"] += 4


def test_missing_day_folder_and_an_empty_one(job, figures):
    raw, cfg, storage, sessionizer = job
    with pytest.raises(InputError, match="no input for run date 2026-11-01: .* does not exist"):
        sessionizer.run(DAY)
    (raw / f"date={DAY}").mkdir(parents=True)
    with pytest.raises(InputError, match="no input files in"):
        sessionizer.run(DAY)
    assert storage.read(table_specs(cfg)["events"]).count() == 0
    figures["bad-input kinds tried"] += 2


def test_storage_root_with_spaces_and_percent(spark, make_config, tmp_path, figures):
    raw = tmp_path / "raw"
    write_day(raw, DAY, [rec(1), rec(2, user_id="u2")])
    cfg = make_config(sessionize__input=str(raw), storage__root=str(tmp_path / "my tables 100%"))
    storage = open_storage(spark, cfg.storage)
    job_ = Sessionizer(spark, cfg, storage)
    job_.run(DAY)
    job_.run(DAY)
    assert storage.read(table_specs(cfg)["events"]).count() == 2
    inside = {os.path.relpath(d, tmp_path).split(os.sep)[0] for d, _, fs in os.walk(tmp_path) if fs}
    assert inside == {"raw", "my tables 100%"}
    check_invariants(storage, cfg)
    figures["bad-input kinds tried"] += 1
