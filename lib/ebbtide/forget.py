"""`ebbtide forget-user USER_ID...`: remove users from every table that holds them.

Rows are deleted in new table versions (copy-on-write: the files holding a user are rewritten without them). The
old files stay reachable by time travel until VACUUM removes them: `ebbtide maintain --vacuum --retention-hours
0` completes the physical deletion (README, "Forgetting users"). Item aggregates (item_daily_counts, item_vocab
counts) are recomputed without the users' events. Idempotent and crash-safe: aggregates are rewritten first and
`events` last, so a re-run after a failure finds the same events and completes the work.
"""

from __future__ import annotations

import logging

from pyspark.sql import functions as F

from ebbtide.config import Config
from ebbtide.sessionize import update_item_counts
from ebbtide.storage import DeltaStorage
from ebbtide.tables import table_specs

log = logging.getLogger(__name__)

# Every table with a user_id column, events last (see above).
USER_TABLES = ("quarantine", "sessions", "user_sequences", "user_interest", "user_recommendations",
               "event_redeliveries", "events")


def forget_users(cfg: Config, storage: DeltaStorage, user_ids: list[str]) -> dict[str, int]:
    """Delete the users' rows everywhere; returns the rows deleted per table (tables that do not exist: absent)."""
    ids = sorted({u.strip() for u in user_ids if u and u.strip()})
    if not ids:
        raise ValueError("forget-user needs at least one non-empty user id")
    specs = table_specs(cfg)
    spark = storage.spark
    deleted: dict[str, int] = {}
    writes = [specs[n] for n in (*USER_TABLES, "item_daily_counts", "item_vocab") if storage.exists(specs[n])]
    with storage.job("forget-user", ",".join(ids)[:200], writes):
        events = specs["events"]
        if storage.exists(events):
            users = spark.createDataFrame([(u,) for u in ids], "user_id string")
            theirs = storage.read_matching(events, users).select("event_date", "item_id").distinct().collect()
            dates = sorted({r["event_date"] for r in theirs})
            if dates:
                remaining = storage.read(events, where={"event_date": dates}).where(~F.col("user_id").isin(ids))
                items = spark.createDataFrame([(r["item_id"],) for r in theirs], "item_id string").distinct()
                update_item_counts(storage, specs, remaining, dates, items)
        for name in USER_TABLES:
            spec = specs[name]
            if storage.exists(spec):
                deleted[name] = storage.delete_rows(spec, "user_id", ids)
                log.info("forget-user: %s: %d rows deleted", name, deleted[name])
    return deleted
