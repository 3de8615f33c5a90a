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
