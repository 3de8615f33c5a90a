"""Read ebbtide's Delta tables outside Spark: pandas / pyarrow and DuckDB, in the project's own environment.

`deltalake.DeltaTable(path).to_pandas()` needs a current pyarrow (deltalake 1.6 hands Arrow data over through the
PyCapsule interface; with the pyarrow 14 that petastorm pins it raises TypeError). These readers ask delta-rs only
for the snapshot's *active files* and their partition values (the Delta log: never a folder listing, removed
files stay on disk until VACUUM) and read the Parquet files with pyarrow or DuckDB's own reader. With a current
pyarrow, `DeltaTable(path).to_pandas()` works as well and gives the same rows.

    from ebbtide.readers import read_table, duckdb_view
    recs = read_table("data/tables/user_recommendations", filters={"as_of": ["2026-11-07"]})
    con = duckdb.connect(); duckdb_view(con, "recs", "data/tables/user_recommendations")
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

_ARROW_TYPES = {"string": pa.string(), "integer": pa.int32(), "long": pa.int64(), "short": pa.int16(),
                "byte": pa.int8(), "double": pa.float64(), "float": pa.float32(), "boolean": pa.bool_(),
                "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC")}
_DUCKDB_TYPES = {"string": "VARCHAR", "integer": "INTEGER", "long": "BIGINT", "short": "SMALLINT",
                 "byte": "TINYINT", "double": "DOUBLE", "float": "FLOAT", "boolean": "BOOLEAN", "date": "DATE",
                 "timestamp": "TIMESTAMPTZ"}


def active_files(path: str, version: int | None = None) -> tuple[list[tuple[str, dict[str, Any]]], dict]:
    """([(file path, {partition column: typed value}), ...], {column: Delta type name}) of a snapshot."""
    from deltalake import DeltaTable

    table = DeltaTable(path, version=version) if version is not None else DeltaTable(path)
    partition_cols = table.metadata().partition_columns
    actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
    root = table.table_uri.rstrip("/").removeprefix("file://")
    files = [(f"{root}/{unquote(a['path'])}", {c: a.get(f"partition.{c}") for c in partition_cols})
             for a in actions]
    schema = json.loads(table.schema().to_json())
    types = {f["name"]: f["type"] for f in schema["fields"]}
    return files, types


def _arrow_type(delta_type) -> pa.DataType:
    """A Delta schema type (JSON form) as an Arrow type."""
    if isinstance(delta_type, str):
        return _ARROW_TYPES[delta_type]
    kind = delta_type["type"]
    if kind == "array":
        return pa.list_(_arrow_type(delta_type["elementType"]))
    if kind == "map":
        return pa.map_(_arrow_type(delta_type["keyType"]), _arrow_type(delta_type["valueType"]))
    return pa.struct([pa.field(f["name"], _arrow_type(f["type"])) for f in delta_type["fields"]])


def read_arrow(path: str, version: int | None = None, columns: list[str] | None = None,
               filters: dict[str, list[Any]] | None = None) -> pa.Table:
    """The snapshot as one Arrow table; `filters` keep only partitions whose value (as text) is listed."""
    files, types = active_files(path, version)
    if filters:
        wanted = {c: {str(v) for v in values} for c, values in filters.items()}
        files = [(f, parts) for f, parts in files
                 if all(str(parts.get(c)) in vals for c, vals in wanted.items())]
    pieces = []
    for file, parts in files:
        data_cols = None if columns is None else [c for c in columns if c not in parts]
        piece = pq.read_table(file, columns=data_cols)
        for col, value in parts.items():
            if columns is None or col in columns:
                piece = piece.append_column(col, pa.array([value] * piece.num_rows, _arrow_type(types[col])))
        pieces.append(piece)
    order = columns or list(types)
    if not pieces:          # an empty snapshot still has the table's columns
        return pa.schema([pa.field(c, _arrow_type(types[c])) for c in order]).empty_table()
    return pa.concat_tables(pieces, promote_options="default").select(order)


def read_table(path: str, version: int | None = None, columns: list[str] | None = None,
               filters: dict[str, list[Any]] | None = None):
    """The snapshot as a pandas DataFrame (UTC timestamps)."""
    return read_arrow(path, version, columns, filters).to_pandas()


def duckdb_view(con, name: str, path: str, version: int | None = None) -> None:
    """CREATE VIEW name over the snapshot's active Parquet files, read by DuckDB itself (no copy through Python).

    Partition columns come from the files' hive-style folders (how Spark, delta-spark and delta-rs lay out
    partitioned tables), typed from the Delta schema."""
    files, types = active_files(path, version)
    partition_cols = sorted({c for _, parts in files for c in parts})
    if not files:
        raise ValueError(f"{path} has no active files")
    listing = ", ".join("'" + f.replace("'", "''") + "'" for f, _ in files)
    options = ""
    if partition_cols:
        hive_types = ", ".join(f"'{c}': '{_DUCKDB_TYPES[types[c]]}'" for c in partition_cols)
        options = f", hive_partitioning = true, hive_types = {{{hive_types}}}"
    con.execute(f'CREATE OR REPLACE VIEW "{name}" AS SELECT * FROM read_parquet([{listing}]{options})')


def latest_as_of(path: str) -> Any:
    """The newest complete night (a date) of user_recommendations: its as_of partitions are committed last."""
    files, _ = active_files(path)
    dates = [parts.get("as_of") for _, parts in files if parts.get("as_of")]
    return max(dates) if dates else None


__all__ = ["active_files", "read_arrow", "read_table", "duckdb_view", "latest_as_of"]
