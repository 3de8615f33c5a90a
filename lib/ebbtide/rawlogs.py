"""One run date of raw logs -> typed rows, each valid or carrying the reason it is not.

Every format becomes one shape (`read_raw`): the record as text, its length and SHA-256, where it came from, each
field as a string, a native timestamp where the format has one, and flags for what the text cannot show later
(invalid UTF-8, a wrong JSON type). `typed_events` then applies the rules in order; the first that fails names
the quarantine reason. Nothing is changed silently: a record is kept exactly, or quarantined with a reason, or the
whole input is refused with an `InputError` before anything is written.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from urllib.parse import unquote

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ebbtide.config import SessionizeConf
from ebbtide.generate import day_folder

ID_FIELDS = ("event_id", "user_id", "item_id", "event_type")
RAW_FIELDS = (*ID_FIELDS, "ts", "weight")
REASONS = ("invalid_utf8", "unparseable_record", "oversize_field", "wrong_type", "control_character",
           "missing_user_id", "missing_item_id", "unparseable_timestamp", "timestamp_too_old",
           "timestamp_in_future", "unknown_event_type", "invalid_weight")
MAX_MICROS = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_CONTROL = r"[\x00-\x1f\x7f]"


class InputError(ValueError):
    """The run's input cannot be read (missing folder, no records, an unreadable file); nothing was written."""


@dataclass(frozen=True, order=True)
class InputFile:
    path: str    # as Spark takes it (not percent-encoded)
    size: int


def input_folder(conf: SessionizeConf, run_date: dt.date) -> str:
    return day_folder(conf.input, run_date)


# ------------------------------------------------------------------------------------------------------
# Listing and reading
# ------------------------------------------------------------------------------------------------------
def list_input(spark: SparkSession, folder: str) -> list[InputFile]:
    """The data files of a day folder (hidden `_`/`.` files skipped, as Spark's readers do), 0-byte ones included:
    Spark's scans drop those silently, so only a listing can refuse them."""
    try:
        jvm, hadoop_conf = spark.sparkContext._jvm, spark.sparkContext._jsc.hadoopConfiguration()
    except Exception:  # Spark Connect: no JVM access; Spark's listing hides 0-byte files
        jvm = None
    if jvm is None:
        try:
            rows = spark.read.format("binaryFile").load(folder).select("path", "length").collect()
        except Exception as err:
            raise _input_error(folder, err) from None
        return sorted(InputFile(unquote(r["path"]), r["length"]) for r in rows)
    path = jvm.org.apache.hadoop.fs.Path(folder)
    fs = path.getFileSystem(hadoop_conf)
    if not fs.exists(path):
        raise InputError(f"no input: {folder} does not exist")  # the caller names the run date
    out = []
    for status in fs.listStatus(path):
        name = status.getPath().getName()
        if status.isFile() and not name.startswith(("_", ".")):
            out.append(InputFile(status.getPath().toString(), status.getLen()))
    return sorted(out)


def _input_error(where: str, err: Exception) -> InputError:
    text = str(err)
    if "PATH_NOT_FOUND" in text or "does not exist" in text:
        return InputError(f"no input: {where} does not exist")
    return InputError(f"cannot read {where}: {text.strip().splitlines()[0][:500]}")


def read_raw(spark: SparkSession, conf: SessionizeConf, run_date: dt.date) -> DataFrame:
    folder = input_folder(conf, run_date)
    try:
        files = list_input(spark, folder)
    except InputError as err:
        raise InputError(f"{err}".replace("no input:", f"no input for run date {run_date}:", 1)) from None
    if not files:
        raise InputError(f"no input files in {folder} for run date {run_date}; nothing was written")
    if conf.format == "json":
        return _read_json(spark, folder)
    if conf.format == "parquet":
        return _read_parquet(spark, folder, files)
    return _read_csv(spark, files)


def _looks_structured(col: Column) -> Column:
    return F.coalesce(F.trim(col).startswith("{") | F.trim(col).startswith("["), F.lit(False))


def _read_json(spark: SparkSession, folder: str) -> DataFrame:
    # Lines are read as text, which keeps their bytes: invalid UTF-8 is detected, and a broken line survives into
    # quarantine (made valid there: invalid bytes become U+FFFD, the hash is of the original bytes).
    lines = spark.read.text(folder).select(F.col("value").alias("_bytes"),
                                           F.col("_metadata.file_path").alias("source_file"))
    valid = F.coalesce(F.is_valid_utf8("_bytes"), F.lit(True))
    lines = lines.select("*", valid.alias("utf8"),
                         F.when(valid, F.col("_bytes")).otherwise(F.make_valid_utf8("_bytes")).alias("raw"))
    # A map keeps nested values as JSON text (so wrong types stay visible) and takes the last of duplicate keys.
    parsed = lines.withColumn("_m", F.when(F.col("utf8"), F.from_json("raw", "MAP<STRING,STRING>")))
    cols = [F.col("raw"), F.length("raw").alias("record_chars"), F.sha2(F.col("_bytes").cast("binary"), 256)
            .alias("raw_sha256"), "source_file", "utf8", F.col("_m").isNotNull().alias("parsed")]
    cols += [F.col("_m")[f].alias(f"{f}_s") for f in RAW_FIELDS]
    cols += [F.lit(None).cast("timestamp").alias("ts_native")]
    wrong = F.lit(False)
    for f in (*ID_FIELDS, "ts"):
        wrong = wrong | _json_structured(f)
    weight = F.col("_m")["weight"]
    wrong = wrong | (weight.isNotNull() & weight.try_cast("double").isNull())
    return parsed.select(*cols, wrong.alias("wrong_type"))


def _json_structured(field: str) -> Column:
    """True when the field's value is a JSON object or array. The map shows both the string "[promo]" and the
    array ["promo"] as text [..], so only values that look structured (rare) are parsed again, from the line."""
    text = F.col("_m")[field]
    kind = F.expr(f"schema_of_variant(variant_get(try_parse_json(raw), '$.{field}'))")
    # try_parse_json rejects duplicate keys and NaN: then the type is unknown and the value counts as structured.
    real = F.coalesce(kind.startswith("ARRAY") | kind.startswith("OBJECT"), F.lit(True))
    return F.when(_looks_structured(text), real).otherwise(F.lit(False))


def _read_parquet(spark: SparkSession, folder: str, files: list[InputFile]) -> DataFrame:
    empty = [f.path for f in files if f.size == 0]
    if empty:
        raise InputError(f"{len(empty)} input file(s) are 0 bytes, not Parquet (an interrupted upload?): "
                         f"{empty[:3]}; deliver them again or remove them. Nothing was written")
    try:
        return _from_typed(spark.read.option("mergeSchema", "true").parquet(folder))
    except Exception:   # files whose schemas do not merge (one column typed differently): read each kind apart
        pass
    groups: dict[str, list[str]] = {}
    for f in files:
        try:
            schema = spark.read.parquet(f.path).schema
        except Exception as err:
            raise _input_error(f"Parquet file {f.path}", err) from None
        groups.setdefault(schema.json(), []).append(f.path)
    return functools.reduce(DataFrame.unionByName, [_from_typed(spark.read.parquet(*paths))
                                                   for paths in groups.values()])


def _from_typed(df: DataFrame, decoded: bool = False) -> DataFrame:
    """Parquet / CSV columns -> the common shape; column types decide what is a wrong type."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    corrupt = F.col("_corrupt_record") if "_corrupt_record" in fields else F.lit(None).cast("string")
    # The record as JSON text; only built for rows that end up in quarantine (see typed_events).
    record = F.coalesce(corrupt, F.to_json(F.struct(*[F.col(c) for c in df.columns if c != "_corrupt_record"])))
    # Parquet strings are raw bytes, checked as such; Spark decodes CSV itself and turns invalid bytes into U+FFFD,
    # so there a U+FFFD is all that is left to see of them.
    utf8 = F.lit(True)
    for c, dtype in fields.items():
        if isinstance(dtype, T.StringType):
            ok = F.is_valid_utf8(F.col(f"`{c}`")) & (~F.col(f"`{c}`").contains("\ufffd") if decoded else F.lit(True))
            utf8 = utf8 & F.coalesce(ok, F.lit(True))
    cols = [F.make_valid_utf8("_record").alias("raw"), F.lit(0).alias("record_chars"),
            F.sha2(F.col("_record").cast("binary"), 256).alias("raw_sha256"),
            F.col("_metadata.file_path").alias("source_file"), utf8.alias("utf8"), corrupt.isNull().alias("parsed")]
    wrong = F.lit(False)
    for f in RAW_FIELDS:
        dtype = fields.get(f)
        if dtype is None:
            cols.append(F.lit(None).cast("string").alias(f"{f}_s"))
        elif isinstance(dtype, (T.StructType, T.ArrayType, T.MapType, T.BinaryType, T.BooleanType)):
            cols.append(F.lit(None).cast("string").alias(f"{f}_s"))
            wrong = wrong | F.col(f).isNotNull()
        elif f == "ts" and isinstance(dtype, (T.TimestampType, T.TimestampNTZType, T.DateType)):
            cols.append(F.lit(None).cast("string").alias("ts_s"))
        else:
            cols.append(F.col(f).cast("string").alias(f"{f}_s"))
    ts_type = fields.get("ts")
    # timestamp_ntz is read as a UTC wall clock (the session time zone is UTC).
    ts_native = (F.col("ts").cast("timestamp")
                 if isinstance(ts_type, (T.TimestampType, T.TimestampNTZType, T.DateType)) else F.lit(None))
    cols.append(ts_native.cast("timestamp").alias("ts_native"))
    if "weight" in fields and isinstance(fields["weight"], T.StringType):
        wrong = wrong | (F.col("weight").isNotNull() & F.col("weight").try_cast("double").isNull())
    return df.withColumn("_record", record).select(*cols, wrong.alias("wrong_type"))


def _read_csv(spark: SparkSession, files: list[InputFile]) -> DataFrame:
    """RFC 4180 CSV read by header name: files are grouped by their header, each group read with its own. Quoted
    fields may hold commas, doubled quotes and newlines; a record with more or fewer fields than its header is
    quarantined whole (Spark's malformed-record column), never cut or padded silently."""
    options = {"header": "true", "multiLine": "true", "escape": '"', "mode": "PERMISSIVE",
               "columnNameOfCorruptRecord": "_corrupt_record"}
    groups: dict[tuple[str, ...], list[str]] = {}
    for f in files:
        try:
            first = spark.read.options(multiLine="true", escape='"').csv(f.path).first() if f.size else None
        except Exception as err:
            raise _input_error(f"CSV file {f.path}", err) from None
        if first is None:
            continue                                             # an empty file holds no records
        header = tuple((v or "").strip().lstrip("\ufeff") for v in first)
        dup = sorted({h for h in header if header.count(h) > 1 or not h})
        if dup:
            raise InputError(f"CSV file {f.path}: header {list(header)} has empty or repeated column names {dup}")
        groups.setdefault(header, []).append(f.path)
    if not groups:  # only empty files: no records (typed columns come from a read of those files)
        return _from_typed(spark.read.schema("user_id string, _corrupt_record string").options(**options)
                           .csv([f.path for f in files]), decoded=True)
    frames = []
    for header, paths in groups.items():
        schema = T.StructType([T.StructField(h, T.StringType()) for h in header]
                              + [T.StructField("_corrupt_record", T.StringType())])
        frames.append(_from_typed(spark.read.schema(schema).options(**options).csv(paths), decoded=True))
    return functools.reduce(lambda a, b: a.unionByName(b), frames)


# ------------------------------------------------------------------------------------------------------
# Typing and validation
# ------------------------------------------------------------------------------------------------------
def parse_timestamp(ts_s: Column, ts_native: Column, epoch_unit: str) -> Column:
    """ISO-8601 with or without zone (no zone = UTC), epoch s/ms/us (fixed or inferred by magnitude)."""
    numeric = ts_s.rlike(r"^\s*-?[0-9]+(\.[0-9]+)?\s*$")
    value = F.trim(ts_s).try_cast("double")
    if epoch_unit == "auto":
        # Seconds until year ~5138, milliseconds until ~5138, else microseconds.
        factor = (F.when(F.abs(value) < 1e11, F.lit(1e6)).when(F.abs(value) < 1e14, F.lit(1e3))
                  .otherwise(F.lit(1.0)))
    else:
        factor = F.lit({"s": 1e6, "ms": 1e3, "us": 1.0}[epoch_unit])
    micros = (value * factor).try_cast("bigint")
    from_number = F.when(F.abs(micros) <= MAX_MICROS, F.timestamp_micros(micros))
    from_text = F.try_to_timestamp(F.trim(ts_s))
    return F.coalesce(ts_native, F.when(numeric, from_number).otherwise(from_text))


def typed_events(raw: DataFrame, conf: SessionizeConf, run_date: dt.date) -> DataFrame:
    """Adds typed columns plus `reason`/`message` (null when the row is valid). First failing rule wins.
    Quarantine columns (`raw` as a bounded prefix, `raw_chars`, `raw_sha256`, `quarantine_user_id`) are set
    for invalid rows only."""
    user = F.trim(F.col("user_id_s"))
    item = F.trim(F.col("item_id_s"))
    etype = F.lower(F.trim(F.col("event_type_s")))
    ts = parse_timestamp(F.col("ts_s"), F.col("ts_native"), conf.epoch_unit)
    floor = dt.datetime.combine(conf.ts_floor, dt.time(), tzinfo=dt.timezone.utc)
    ceiling = dt.datetime.combine(run_date + dt.timedelta(days=1 + conf.max_future_days), dt.time(),
                                  tzinfo=dt.timezone.utc)
    known = list(conf.event_types)
    longest = F.greatest(*[F.coalesce(F.length(F.col(f"{f}_s")), F.lit(0)) for f in RAW_FIELDS])
    weight_given = F.col("weight_s").try_cast("double")
    weights = F.create_map(*[x for k, w in conf.event_types.items() for x in (F.lit(k), F.lit(float(w)))])
    df = raw.select("*", user.alias("user_id"), item.alias("item_id"), etype.alias("event_type"),
                    ts.alias("ts"), F.coalesce(weight_given, weights[etype]).alias("weight"))
    control = functools.reduce(lambda a, b: a | b, [F.coalesce(F.col(f"{f}_s").rlike(_CONTROL), F.lit(False))
                                                    for f in ID_FIELDS])
    checks = [
        ("invalid_utf8", ~F.col("utf8"), F.lit("the record holds bytes that are not UTF-8 (raw shows them as U+FFFD)")),
        ("unparseable_record", ~F.col("parsed"), F.lit("not a JSON object / not a record of the header's fields")),
        ("oversize_field", (F.col("record_chars") > conf.max_record_chars) | (longest > conf.max_field_chars),
         F.format_string(f"a field is longer than {conf.max_field_chars} chars (longest %d) or the record "
                         f"longer than {conf.max_record_chars}", longest)),
        ("wrong_type", F.col("wrong_type"), F.lit("an id/timestamp is an object or array, or weight is not numeric")),
        ("control_character", control, F.lit("an id or event type contains a control character")),
        ("missing_user_id", F.coalesce(F.col("user_id") == "", F.lit(True)), F.lit("user_id missing or empty")),
        ("missing_item_id", F.coalesce(F.col("item_id") == "", F.lit(True)), F.lit("item_id missing or empty")),
        ("unparseable_timestamp", F.col("ts").isNull(),
         F.concat(F.lit("cannot parse ts: "), F.coalesce(F.col("ts_s"), F.lit("<missing>")))),
        ("timestamp_too_old", F.col("ts") < F.lit(floor),
         F.concat(F.lit(f"ts before floor {conf.ts_floor}: "), F.col("ts").cast("string"))),
        ("timestamp_in_future", F.col("ts") >= F.lit(ceiling),
         F.concat(F.lit(f"ts at/after {ceiling:%Y-%m-%d %H:%M} (run date + {conf.max_future_days} day(s)): "),
                  F.col("ts").cast("string"))),
        ("unknown_event_type", ~F.coalesce(F.col("event_type").isin(known), F.lit(False)),
         F.concat(F.lit(f"event_type not in {known}: "), F.coalesce(F.col("event_type_s"), F.lit("<missing>")))),
        ("invalid_weight", ~F.coalesce(F.col("weight").between(F.lit(0.0), F.lit(1e300)) & (F.col("weight") > 0),
                                       F.lit(False)),
         F.concat(F.lit("weight must be a finite number > 0: "), F.coalesce(F.col("weight_s"), F.lit("<missing>")))),
    ]
    reason: Column = F.lit(None).cast("string")
    message: Column = F.lit(None).cast("string")
    for code, failed, text in reversed(checks):
        reason = F.when(failed, F.lit(code)).otherwise(reason)
        message = F.when(failed, text).otherwise(message)
    bad = reason.isNotNull()
    given_id = F.trim(F.col("event_id_s"))
    stable_id = F.substring(F.sha2(F.concat_ws("\u0001", "user_id", "item_id", "event_type",
                                               F.unix_micros("ts").cast("string")), 256), 1, 32)
    # The user a quarantined record names, for forget-user: its field, or found in the text of a broken line.
    named_user = F.coalesce(F.nullif(F.make_valid_utf8(F.trim("user_id_s")), F.lit("")), F.nullif(
        F.regexp_extract("raw", r'"user_id"\s*:\s*"((?:[^"\\]|\\.)*)"', 1), F.lit("")))
    return df.select(
        F.when(bad, F.substring("raw", 1, conf.max_record_chars)).alias("raw"),
        F.when(bad, F.coalesce(F.nullif(F.col("record_chars"), F.lit(0)), F.length("raw")).cast("long"))
        .alias("raw_chars"),
        F.when(bad, F.col("raw_sha256")).alias("raw_sha256"),
        F.when(bad, named_user).alias("quarantine_user_id"),
        "source_file", "user_id", "item_id", "event_type", "ts", reason.alias("reason"), message.alias("message"),
        F.when(given_id != "", given_id).otherwise(stable_id).alias("event_id"),
        "weight", F.to_date("ts").alias("event_date"),
    )
