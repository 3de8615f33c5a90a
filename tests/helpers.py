"""Table snapshots as plain Python values, for comparing runs."""

from __future__ import annotations

from ebbtide.storage import DeltaStorage
from ebbtide.tables import table_specs


def table_rows(storage: DeltaStorage, cfg, name: str, drop: tuple[str, ...] = ()) -> list[tuple]:
    spec = table_specs(cfg)[name]
    cols = [c for c in spec.columns if c not in drop]
    return sorted(tuple(_freeze(r[c]) for c in cols) for r in storage.read(spec).select(*cols).collect())


def sequences_by_item_id(storage: DeltaStorage, cfg) -> list[tuple]:
    """user_sequences with item indices mapped back to item ids (indices depend on processing order)."""
    specs = table_specs(cfg)
    vocab = {r.item_idx: r.item_id for r in storage.read(specs["item_vocab"]).collect()}
    out = []
    for r in storage.read(specs["user_sequences"]).collect():
        out.append((r.user_id, tuple(vocab[i] for i in r.item_idx), tuple(r.ts), tuple(r.event_type),
                    tuple(r.session_idx), tuple(round(w, 4) for w in r.weight), r.n_events, r.first_ts,
                    r.last_ts, r.user_bucket))
    return sorted(out)


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------------
# Hand-written raw logs and whole-state checks (re-run, backfill, fault and hostile-input tests)
# --------------------------------------------------------------------------------------------------
def write_day(raw, day, records, name: str = "part-0.jsonl") -> None:
    """One day folder of JSON lines: dicts are dumped, str lines written as given, bytes written raw."""
    import json
    import os

    folder = os.path.join(str(raw), f"date={day.isoformat()}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as fh:
        for rec in records:
            line = rec if isinstance(rec, bytes) else (rec if isinstance(rec, str) else json.dumps(rec)).encode()
            fh.write(line + b"\n")


def ev(user, item, when, **extra) -> dict:
    return {"user_id": user, "item_id": item, "event_type": "view", "ts": when, **extra}


ORDER_FREE = ("events", "event_redeliveries", "quarantine", "sessions", "item_daily_counts")


def state(storage, cfg, tables=ORDER_FREE) -> dict[str, list[tuple]]:
    """Every order-free table's rows, plus sequences and vocabulary in order-free form (item ids, not indices;
    items whose events all went away keep their index by design and are left out)."""
    out = {name: table_rows(storage, cfg, name) for name in tables}
    if "event_redeliveries" in out:   # a copy parked and kept (left by a takeover, see sessionize._plan) is inert
        kept = set(out["events"] if "events" in out else table_rows(storage, cfg, "events"))
        out["event_redeliveries"] = [r for r in out["event_redeliveries"] if r not in kept]
    out["user_sequences"] = sequences_by_item_id(storage, cfg)
    out["item_vocab"] = [r for r in table_rows(storage, cfg, "item_vocab", drop=("item_idx",)) if r[-1] > 0]
    return out


def content_hash(rows: list[tuple]) -> str:
    import hashlib

    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def check_invariants(storage, cfg) -> dict[str, int]:
    """What must hold after every completed run, whatever came before; returns rows lost / duplicated (both 0)."""
    from pyspark.sql import functions as F

    specs = table_specs(cfg)
    events = storage.read(specs["events"])
    per_user = {r["user_id"]: r["n"] for r in events.groupBy("user_id").agg(F.count("*").alias("n")).collect()}
    seqs = {r.user_id: r.n_events for r in storage.read(specs["user_sequences"]).collect()}
    sessions = {r["user_id"]: r["n"] for r in storage.read(specs["sessions"]).groupBy("user_id")
                .agg(F.sum("n_events").alias("n")).collect()}
    daily = {r["item_id"]: r["n"] for r in storage.read(specs["item_daily_counts"]).groupBy("item_id")
             .agg(F.sum("n_events").alias("n")).collect()}
    per_item = {r["item_id"]: r["n"] for r in events.groupBy("item_id").agg(F.count("*").alias("n")).collect()}
    vocab = {r.item_id: r.n_events for r in storage.read(specs["item_vocab"]).collect() if r.n_events}
    total, distinct = events.count(), events.select("event_id").distinct().count()
    parked = storage.read(specs["event_redeliveries"])
    dup_keys = parked.count() - parked.select("event_id", "ingest_date").distinct().count()
    # A parked copy must have an earlier kept copy, or be the kept copy itself (left parked by a takeover).
    inert = parked.intersectAll(events.select(*parked.columns))
    both = parked.exceptAll(inert).join(events.select("event_id", F.col("ingest_date").alias("kept_ingest")),
                                        "event_id", "left")
    misplaced = both.where(F.col("kept_ingest").isNull() | (F.col("kept_ingest") >= F.col("ingest_date"))).count()
    assert seqs == per_user, "user_sequences.n_events != events per user"
    assert sessions == per_user, "sessions hold other events than `events`"
    assert daily == per_item == vocab, "item_daily_counts / item_vocab disagree with events"
    assert misplaced == 0, "a parked copy without an earlier kept copy"
    return {"duplicated": (total - distinct) + dup_keys, "events": total}
