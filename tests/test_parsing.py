"""Timestamp formats and typed (Parquet) inputs, including timestamp_ntz."""

from __future__ import annotations

import datetime as dt

import pytest
from ebbtide.sessionize import Sessionizer, parse_timestamp
from ebbtide.storage import open_storage
from ebbtide.tables import table_specs
from pyspark.sql import functions as F
from pyspark.sql import types as T

UTC = dt.timezone.utc
NOON = dt.datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
E = int(NOON.timestamp())  # 1793534400


@pytest.mark.parametrize("text, unit, expected", [
    ("2026-11-01T12:00:00Z", "auto", NOON),
    ("2026-11-01T14:00:00+02:00", "auto", NOON),
    ("2026-11-01 12:00:00", "auto", NOON),                     # no zone: UTC
    ("2026-11-01T12:00:00.250Z", "auto", NOON + dt.timedelta(milliseconds=250)),
    (f"{E}", "auto", NOON),                                    # epoch seconds
    (f"{E}000", "auto", NOON),                                 # epoch ms
    (f"{E}000000", "auto", NOON),                              # epoch us
    (f"{E}.5", "auto", NOON + dt.timedelta(milliseconds=500)),
    (f"{E}000", "ms", NOON),
    (f"{E}", "us", dt.datetime(1970, 1, 1, 0, 29, 53, 534400, tzinfo=UTC)),  # configured unit wins
    ("last tuesday", "auto", None),
    ("99999999999999999999999", "auto", None),                 # overflow: null, not a crash
    (None, "auto", None),
])
def test_timestamp_formats(spark, text, unit, expected):
    df = spark.createDataFrame([(text,)], "ts_s string").withColumn("ts_native", F.lit(None).cast("timestamp"))
    got = df.select(parse_timestamp(F.col("ts_s"), F.col("ts_native"), unit).alias("ts")).collect()[0].ts
    assert (got.replace(tzinfo=UTC) if got else None) == expected


def test_parquet_input_with_timestamp_ntz_and_typed_columns(spark, make_config, tmp_path):
    raw = tmp_path / "raw" / "date=2026-11-01"
    schema = T.StructType([
        T.StructField("user_id", T.StringType()), T.StructField("item_id", T.StringType()),
        T.StructField("event_type", T.StringType()), T.StructField("ts", T.TimestampNTZType()),
        T.StructField("weight", T.DoubleType())])
    naive = dt.datetime(2026, 11, 1, 12, 0)
    rows = [("u1", "a", "view", naive, None), ("u1", "b", "purchase", naive + dt.timedelta(minutes=5), 9.0),
            ("", "c", "view", naive, None), ("u2", "d", "hover", naive, None), ("u2", None, "view", naive, None),
            ("u3", "e", "view", None, None)]
    spark.createDataFrame(rows, schema).coalesce(1).write.parquet(str(raw))
    cfg = make_config(sessionize__input=str(tmp_path / "raw"), sessionize__format="parquet")
    storage = open_storage(spark, cfg.storage)
    report = Sessionizer(spark, cfg, storage).run(dt.date(2026, 11, 1))
    assert (report.read, report.kept, report.quarantined) == (6, 2, 4)
    assert report.quarantine_by_reason == {"missing_user_id": 1, "unknown_event_type": 1,
                                           "missing_item_id": 1, "unparseable_timestamp": 1}
    specs = table_specs(cfg)
    events = {r.item_id: r for r in storage.read(specs["events"]).collect()}
    assert events["a"].ts.replace(tzinfo=UTC) == NOON  # ntz wall clock read as UTC
    assert events["a"].weight == 1.0 and events["b"].weight == 9.0  # default by type, or given
    quarantined = storage.read(specs["quarantine"]).where("reason = 'unknown_event_type'").first()
    assert '"hover"' in quarantined.raw  # the typed record is kept as JSON text


def test_csv_input(spark, make_config, tmp_path):
    folder = tmp_path / "raw" / "date=2026-11-01"
    folder.mkdir(parents=True)
    (folder / "part-0.csv").write_text(
        "event_id,user_id,item_id,event_type,ts,weight\n"
        "e1,u1,a,view,2026-11-01T12:00:00Z,\n"
        f"e2,u1,b,click,{E + 100},abc\n"
        "e1,u1,a,view,2026-11-01T12:00:00Z,\n")
    cfg = make_config(sessionize__input=str(tmp_path / "raw"), sessionize__format="csv")
    report = Sessionizer(spark, cfg, open_storage(spark, cfg.storage)).run(dt.date(2026, 11, 1))
    assert (report.read, report.kept, report.quarantined, report.duplicates) == (3, 1, 1, 1)
    assert report.quarantine_by_reason == {"wrong_type": 1}
