"""`ebbtide maintain`: expire old outputs, compact, vacuum; reports what it removed on both engines.

Retention (relative to --as-of, default today UTC):
* `user_recommendations`: partitions with as_of older than `nightly.recommendations_retention_days`;
* `user_interest`: rows whose state is older than `nightly.interest_retention_days` (users idle that long are
  not served anyway; if they return they are re-encoded from their window, see nightly.py).
VACUUM then deletes files removed more than `storage.vacuum_retention_hours` ago, with Delta's retention check
on: a retention shorter than the table's `delta.deletedFileRetentionDuration` (7 days by default) is refused,
because readers of older versions (time travel, nightly as of a past date) still need those files.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ebbtide.config import Config
from ebbtide.storage import DeltaStorage, sql_literal
from ebbtide.tables import table_specs


def expiry_predicates(cfg: Config, as_of: dt.date) -> dict[str, str]:
    n = cfg.nightly
    return {
        "user_recommendations": f"as_of < {sql_literal(as_of - dt.timedelta(days=n.recommendations_retention_days))}",
        "user_interest": f"as_of < {sql_literal(as_of - dt.timedelta(days=n.interest_retention_days))}",
    }


def maintain(cfg: Config, storage: DeltaStorage, as_of: dt.date, expire: bool = False, optimize: bool = False,
             vacuum: bool = False, retention_hours: int | None = None,
             enforce_retention: bool = True) -> list[dict[str, Any]]:
    """One report row per table: rows expired, optimize metrics, files vacuumed."""
    report = []
    predicates = expiry_predicates(cfg, as_of) if expire else {}
    for key, spec in table_specs(cfg).items():
        if not storage.exists(spec):
            continue
        row: dict[str, Any] = {"table": key}
        if key in predicates:
            expired = storage.read(spec).where(predicates[key]).count()
            if expired:
                storage.delete_where(spec, predicates[key])
            row["expired_rows"] = expired
            row["expired_where"] = predicates[key]
        if optimize:
            row["optimize"] = storage.optimize(spec)
        if vacuum:
            row["vacuumed_files"] = len(storage.vacuum(spec, retention_hours, enforce_retention))
        report.append(row)
    return report


def report_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        parts = []
        if "expired_rows" in row:
            parts.append(f"expired {row['expired_rows']:,} rows ({row['expired_where']})")
        if "optimize" in row:
            o = row["optimize"] or {}
            parts.append(f"optimize +{o.get('numFilesAdded', o.get('num_files_added', 0))}"
                         f"/-{o.get('numFilesRemoved', o.get('num_files_removed', 0))} files")
        if "vacuumed_files" in row:
            parts.append(f"vacuum removed {row['vacuumed_files']} files")
        out.append(f"{row['table']:<22} " + ("; ".join(parts) or "nothing to do"))
    return out
