"""The Delta tables ebbtide owns: schema, partitioning, merge keys and file layout, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import types as T

from ebbtide.config import Config


@dataclass(frozen=True)
class TableSpec:
    """What the storage layer needs to know about one table."""

    name: str                      # logical name (config key), also the folder / catalog table name
    schema: T.StructType           # full schema, partition columns included
    partition_by: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()     # MERGE key; unique per row
    # Rows are clustered by these inside each written file, which keeps file min/max stats tight
    # for data skipping and makes a MERGE touch fewer files.
    sort_by: tuple[str, ...] = ()
    # Shuffle by the partition columns before writing (one file per partition per task otherwise).
    shuffle_by_partition: bool = False
    # Hashed into that shuffle too, so the rows of one partition value spread over tasks instead of all going to
    # one; adaptive execution coalesces what is small back into one file. Only for tables with no sort order to
    # keep: spreading by hash would widen every file's key range.
    spread_by: tuple[str, ...] = ()
    # Cap on files per write for small unpartitioned tables (None: one file per task).
    max_files: int | None = None
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def data_schema(self) -> T.StructType:
        """Columns stored inside the Parquet files (Delta keeps partition values in the log)."""
        return T.StructType([f for f in self.schema.fields if f.name not in self.partition_by])

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]


def _s(name: str, dtype: T.DataType, nullable: bool = True) -> T.StructField:
    return T.StructField(name, dtype, nullable)


EVENTS_SCHEMA = T.StructType([
    _s("event_id", T.StringType(), False),
    _s("user_id", T.StringType(), False),
    _s("item_id", T.StringType(), False),
    _s("event_type", T.StringType(), False),
    _s("ts", T.TimestampType(), False),           # UTC instant; never timestamp_ntz (see README, protocol)
    _s("weight", T.DoubleType(), False),
    _s("event_date", T.DateType(), False),
    _s("ingest_date", T.DateType(), False),       # run date whose logs delivered the kept copy
    _s("source_file", T.StringType()),
])

QUARANTINE_SCHEMA = T.StructType([
    _s("raw", T.StringType()),                    # the record, cut at sessionize.max_record_chars
    _s("reason", T.StringType(), False),
    _s("message", T.StringType()),
    _s("source_file", T.StringType()),
    _s("run_date", T.DateType(), False),
    # Added with issue 9 (tables created before get them as null columns): the whole record's length in chars
    # and the SHA-256 of its bytes as read, and the user it names (for forget-user).
    _s("raw_chars", T.LongType()),
    _s("raw_sha256", T.StringType()),
    _s("user_id", T.StringType()),
])

SESSIONS_SCHEMA = T.StructType([
    _s("user_id", T.StringType(), False),
    _s("session_id", T.StringType(), False),
    _s("start_ts", T.TimestampType(), False),
    _s("end_ts", T.TimestampType(), False),
    # Start of the inactivity-gap chain this session was cut from (by max session length); incremental
    # recomputation restarts from it so that cuts do not depend on processing order.
    _s("chain_start_ts", T.TimestampType(), False),
    _s("n_events", T.IntegerType(), False),
    _s("item_ids", T.ArrayType(T.StringType(), False)),
    _s("user_bucket", T.IntegerType(), False),
])

USER_SEQUENCES_SCHEMA = T.StructType([
    _s("user_id", T.StringType(), False),
    _s("item_idx", T.ArrayType(T.IntegerType(), False)),
    _s("ts", T.ArrayType(T.LongType(), False)),          # epoch seconds
    _s("event_type", T.ArrayType(T.IntegerType(), False)),  # position in sessionize.event_types
    _s("session_idx", T.ArrayType(T.IntegerType(), False)),  # 0 = oldest session inside the window
    _s("weight", T.ArrayType(T.FloatType(), False)),
    _s("n_events", T.LongType(), False),   # the user's events in `events` (summed from sessions), not only the window
    _s("first_ts", T.TimestampType(), False),
    _s("last_ts", T.TimestampType(), False),
    _s("user_bucket", T.IntegerType(), False),
])

ITEM_VOCAB_SCHEMA = T.StructType([
    _s("item_id", T.StringType(), False),
    _s("item_idx", T.IntegerType(), False),
    _s("first_seen_date", T.DateType(), False),
    _s("n_events", T.LongType(), False),
])

ITEM_DAILY_COUNTS_SCHEMA = T.StructType([
    _s("item_id", T.StringType(), False),
    _s("n_events", T.LongType(), False),
    _s("weight_sum", T.DoubleType(), False),
    _s("event_date", T.DateType(), False),
])

USER_INTEREST_SCHEMA = T.StructType([
    _s("user_id", T.StringType(), False),
    _s("as_of", T.DateType(), False),
    _s("model_version", T.StringType(), False),
    _s("embedding", T.ArrayType(T.FloatType(), False)),
    _s("norm", T.FloatType(), False),
    _s("n_events", T.LongType(), False),                 # events before the end of as_of
    _s("last_event_ts", T.TimestampType(), False),
    # Per-timescale decay state (K x d, row-major) and mass (K) at updated_at; empty for models without one.
    _s("decay_state", T.ArrayType(T.FloatType(), False)),
    _s("decay_mass", T.ArrayType(T.FloatType(), False)),
    _s("updated_at", T.TimestampType(), False),          # the instant the state refers to: end of as_of (UTC)
    _s("user_bucket", T.IntegerType(), False),
])

ITEM_EMBEDDINGS_SCHEMA = T.StructType([
    _s("item_id", T.StringType(), False),
    _s("item_idx", T.IntegerType(), False),
    _s("embedding", T.ArrayType(T.FloatType(), False)),
    _s("model_version", T.StringType(), False),
])

USER_RECOMMENDATIONS_SCHEMA = T.StructType([
    _s("user_id", T.StringType(), False),
    _s("rank", T.IntegerType(), False),
    _s("item_id", T.StringType(), False),
    _s("score", T.FloatType(), False),              # model: dot product; popular/new_item: decayed popularity
    _s("source", T.StringType(), False),            # model | popular (cold-start user) | new_item (newer than model)
    _s("model_version", T.StringType(), False),
    _s("as_of", T.DateType(), False),
])

# Protocol (1, 2) with no table features: readable by delta-spark 4.0, delta-rs, Databricks and DuckDB.
# Deletion vectors stay off so both engines rewrite files the same way (see README, "Layout").
COMMON_PROPERTIES = {"delta.enableDeletionVectors": "false"}


def table_specs(cfg: Config) -> dict[str, TableSpec]:
    t = cfg.tables
    bucket_props = {**COMMON_PROPERTIES, "ebbtide.user_buckets": str(cfg.storage.user_buckets)}
    return {
        "events": TableSpec(t.events, EVENTS_SCHEMA, ("event_date",), ("event_id",),
                            sort_by=("user_id", "ts"), properties=dict(COMMON_PROPERTIES)),
        # Valid copies of an event id that lost to the copy of an earlier run date: kept so that the next
        # earliest copy takes over when a corrected input withdraws the kept one.
        "event_redeliveries": TableSpec(t.event_redeliveries, EVENTS_SCHEMA, ("ingest_date",),
                                        ("event_id", "ingest_date"), sort_by=("event_id",),
                                        properties=dict(COMMON_PROPERTIES)),
        # A run writes one run_date: without spreading, one task wrote a day whose input was all bad.
        "quarantine": TableSpec(t.quarantine, QUARANTINE_SCHEMA, ("run_date",), shuffle_by_partition=True,
                                spread_by=("raw_sha256",), properties=dict(COMMON_PROPERTIES)),
        "sessions": TableSpec(t.sessions, SESSIONS_SCHEMA, ("user_bucket",), ("user_id", "session_id"),
                              sort_by=("user_id", "start_ts"), shuffle_by_partition=True,
                              properties=bucket_props),
        "user_sequences": TableSpec(t.user_sequences, USER_SEQUENCES_SCHEMA, ("user_bucket",), ("user_id",),
                                    sort_by=("user_id",), shuffle_by_partition=True,
                                    properties=bucket_props),
        "item_vocab": TableSpec(t.item_vocab, ITEM_VOCAB_SCHEMA, (), ("item_id",), sort_by=("item_idx",),
                                max_files=1, properties=dict(COMMON_PROPERTIES)),
        "item_daily_counts": TableSpec(t.item_daily_counts, ITEM_DAILY_COUNTS_SCHEMA, ("event_date",),
                                       ("item_id", "event_date"), sort_by=("item_id",), shuffle_by_partition=True,
                                       properties=dict(COMMON_PROPERTIES)),
        "user_interest": TableSpec(t.user_interest, USER_INTEREST_SCHEMA, ("user_bucket",), ("user_id",),
                                   sort_by=("user_id",), shuffle_by_partition=True, properties=bucket_props),
        "item_embeddings": TableSpec(t.item_embeddings, ITEM_EMBEDDINGS_SCHEMA, ("model_version",),
                                     ("item_id", "model_version"), sort_by=("item_idx",), shuffle_by_partition=True,
                                     properties=dict(COMMON_PROPERTIES)),
        "user_recommendations": TableSpec(t.user_recommendations, USER_RECOMMENDATIONS_SCHEMA, ("as_of",),
                                          ("user_id", "as_of", "rank"), sort_by=("user_id", "rank"),
                                          properties=dict(COMMON_PROPERTIES)),
    }
