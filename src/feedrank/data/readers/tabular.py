"""Generic CSV / TSV / Parquet reader driven by a column mapping.

``ColumnMap`` names, for each canonical column, the source column that holds it; a canonical column
left unmapped is taken from a source column of the same name when there is one. Build it from
YAML (``load_yaml(ColumnMap, path)``) or from ``canonical=source`` pairs (the CLI's repeated
``--map``)::

    ColumnMap.from_pairs(["user_id=uid", "item_id=article", "ts=event_time", "clicked=click"])

Value formats (string columns, as CSV always gives):

- timestamps (``ts``, ``created_ts``): unix seconds (digits, optionally with a fraction) or ISO
  8601 (``2024-05-01``, ``2024-05-01T10:00:00``, ``2024-05-01 10:00:00.5+02:00``); a time without
  a zone is UTC. Numeric Parquet columns are unix seconds; Parquet timestamp columns are used as
  they are (zone-less ones as UTC).
- booleans (``clicked``, ``shared``, ``hidden``): ``true/false``, ``1/0``, ``yes/no`` (any case).
- numbers (``position``, ``dwell_s``, ``rating``, ``scroll_pct``): decimal notation.
- text: ``abstract`` (optional) must be a text column (a numeric Parquet column is refused), at
  most ``feedrank.data.schema.MAX_ABSTRACT_CHARS`` characters a row; a blank one is null.
- empty cells: an error in key columns, ``position`` and ``clicked``; ``dwell_s`` 0 and
  ``shared``/``hidden`` false (as when the column is absent); null elsewhere.

Required: ``user_id``, ``item_id``, ``ts``. Without ``request_id`` each (user, ts) pair is one
request (``"<user>@<ts in unix microseconds>"``); without ``clicked`` rows are unclicked
impressions (the schema default). Items are the distinct ``item_id`` values with the item columns
of their first row; users likewise when ``age_bucket`` or ``country`` is present.

CSV line numbers in errors assume one record per line (no newline inside a quoted field).
"""

from __future__ import annotations

import csv as pycsv
from dataclasses import dataclass, fields
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feedrank.config import ConfigError, from_dict
from feedrank.data.readers.common import (
    NoRowsError,
    ReadResult,
    RowErrors,
    abstract_column,
    parse_float,
    parse_int,
    require_file,
    unix_seconds_to_ts,
)
from feedrank.data.schema import ITEM_SCHEMA, TS_TYPE, USER_SCHEMA

REQUIRED = ("user_id", "item_id", "ts")
_TRUE = ["true", "1", "yes", "t", "y"]
_FALSE = ["false", "0", "no", "f", "n"]
_UNIX_RE = r"^[+-]?[0-9]+(\.[0-9]*)?$"


@dataclass
class ColumnMap:
    """Source column for each canonical column (None: a same-named source column, if any)."""

    user_id: str | None = None
    item_id: str | None = None
    ts: str | None = None
    request_id: str | None = None
    position: str | None = None
    clicked: str | None = None
    dwell_s: str | None = None
    shared: str | None = None
    hidden: str | None = None
    publisher: str | None = None
    item_type: str | None = None
    created_ts: str | None = None
    title: str | None = None
    abstract: str | None = None
    category: str | None = None
    age_bucket: str | None = None
    country: str | None = None
    rating: str | None = None
    scroll_pct: str | None = None

    @classmethod
    def from_pairs(cls, pairs: list[str]) -> ColumnMap:
        """From ``["canonical=source", ...]``; an unknown canonical name fails naming it."""
        data = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ConfigError(f"--map {pair!r}: expected canonical=source, e.g. user_id=uid")
            data[key.strip()] = value.strip()
        return from_dict(cls, data, "map")

    def resolve(self, available: list[str], where: str) -> dict[str, str]:
        """Canonical name -> source column present in the file; fails on a mapped column it lacks."""
        out = {}
        for f in fields(self):
            source = getattr(self, f.name)
            if source is not None and source not in available:
                raise ValueError(f"{where}: column {source!r} (mapped to {f.name}) not found; columns: {available}")
            if source is None and f.name in available:
                source = f.name
            if source is not None:
                out[f.name] = source
        missing = [c for c in REQUIRED if c not in out]
        if missing:
            raise ValueError(
                f"{where}: no column for required {missing}; map them, e.g. --map {missing[0]}=<column>; "
                f"columns: {available}"
            )
        return out


def read_tabular(path: str | Path, columns: ColumnMap | None = None, skip_bad_rows: bool = False) -> ReadResult:
    """Read a ``.csv``, ``.tsv`` or ``.parquet`` event table through ``columns``."""
    path = require_file(Path(path), "a .csv, .tsv or .parquet event table")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table, errors = _read_parquet(path, skip_bad_rows)
    elif suffix in (".csv", ".tsv"):
        table, errors = _read_csv(path, "\t" if suffix == ".tsv" else ",", skip_bad_rows)
    else:
        raise ValueError(f"{path}: unknown table format {suffix!r}; expected .csv, .tsv or .parquet")
    mapping = (columns or ColumnMap()).resolve(table.column_names, str(path))
    lines = table["_line"]

    out: dict[str, pa.Array] = {}
    for name in ("user_id", "item_id", "request_id", "publisher", "item_type", "title", "category", "age_bucket", "country"):
        if name in mapping:
            out[name] = pc.cast(table[mapping[name]], pa.string())
    if "abstract" in mapping:
        out["abstract"] = abstract_column(table[mapping["abstract"]], lines, errors, mapping["abstract"])
    for name in ("ts", "created_ts"):
        if name in mapping:
            out[name] = _timestamps(table[mapping[name]], lines, errors, mapping[name])
    for name in ("clicked", "shared", "hidden"):
        if name in mapping:
            out[name] = _booleans(table[mapping[name]], lines, errors, mapping[name])
    for name in ("dwell_s", "rating", "scroll_pct"):
        if name in mapping:
            out[name] = _numbers(table[mapping[name]], lines, errors, mapping[name], parse_float)
    if "position" in mapping:
        out["position"] = _numbers(table[mapping["position"]], lines, errors, mapping["position"], parse_int)
    for name, neutral in (("dwell_s", 0.0), ("shared", False), ("hidden", False)):
        if name in out:  # an empty cell here means "none", as an absent column does
            out[name] = pc.fill_null(out[name], neutral)
    for name in ("user_id", "item_id", "ts", "request_id", "position", "clicked"):
        if name in out:
            null = pc.is_null(out[name]).to_numpy(zero_copy_only=False)
            if null.any():
                errors.flag(np.asarray(lines)[null], f"empty {mapping[name]} (-> {name})")

    rows = pa.table(out).filter(errors.keep(lines))
    if "request_id" not in rows.column_names:
        micros = pc.cast(pc.cast(rows["ts"], pa.int64()), pa.string())
        rows = rows.append_column("request_id", pc.binary_join_element_wise(rows["user_id"], micros, "@"))
    item_cols = [c for c in ITEM_SCHEMA.names if c in rows.column_names]
    user_cols = [c for c in USER_SCHEMA.names if c in rows.column_names]
    return ReadResult(
        events=rows,
        items=rows.select(item_cols),
        users=rows.select(user_cols) if len(user_cols) > 1 else None,
        source=f"tabular:{path}",
        skipped_rows=errors.count,
        skip_examples=errors.examples,
    )


def _read_csv(path: Path, delimiter: str, skip: bool) -> tuple[pa.Table, RowErrors]:
    errors = RowErrors(path, skip)
    with path.open(newline="", encoding="utf-8") as f:
        header = next(pycsv.reader(f, delimiter=delimiter), None)
    if not header:
        raise NoRowsError(f"{path}: no rows (the file is empty)")
    bad: list[tuple[int, int]] = []

    def on_invalid(row) -> str:
        # Called by Arrow only for rows with the wrong field count; line numbers need one thread.
        bad.append((row.number, row.actual_columns))
        return "skip"

    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={h: pa.string() for h in header}, strings_can_be_null=True),
    )
    bad_lines = np.array([number for number, _ in bad], dtype=np.int64)
    errors.flag(bad_lines, f"expected {len(header)} fields, found", np.array([found for _, found in bad]))
    if table.num_rows == 0 and not bad:
        raise NoRowsError(f"{path}: no rows (only a header)")
    lines = np.setdiff1d(np.arange(2, 2 + table.num_rows + len(bad), dtype=np.int64), bad_lines)
    return table.append_column("_line", pa.array(lines)), errors


def _read_parquet(path: Path, skip: bool) -> tuple[pa.Table, RowErrors]:
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise NoRowsError(f"{path}: no rows")
    rows = pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64))
    return table.append_column("_line", rows), RowErrors(path, skip, unit="row")


def _is_string(col) -> bool:
    return pa.types.is_string(col.type) or pa.types.is_large_string(col.type)


def _timestamps(col, lines, errors: RowErrors, name: str) -> pa.Array:
    """Unix seconds or ISO 8601 to UTC timestamps; unparsable non-empty values are flagged."""
    if pa.types.is_timestamp(col.type):
        return pc.assume_timezone(col, "UTC") if col.type.tz is None else pc.cast(col, TS_TYPE)
    if not _is_string(col):
        return unix_seconds_to_ts(col)
    text = pc.utf8_trim_whitespace(col)
    unix = pc.fill_null(pc.match_substring_regex(text, _UNIX_RE), False)
    seconds = pc.cast(pc.if_else(unix, text, None), pa.float64())
    # DuckDB's TRY_CAST parses every ISO 8601 variant (offsets, fractions) and yields NULL, not an
    # error, for a bad value, so a bad row is found without a Python loop.
    iso = pa.table({"s": pc.if_else(unix, None, text)})
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("iso", iso)
        parsed = con.sql("SELECT TRY_CAST(s AS TIMESTAMPTZ) AS t FROM iso").to_arrow_table()["t"]
    finally:
        con.close()
    ts = pc.if_else(unix, unix_seconds_to_ts(seconds), pc.cast(parsed, TS_TYPE))
    bad = pc.and_(pc.is_valid(text), pc.is_null(ts)).to_numpy(zero_copy_only=False)
    if bad.any():
        errors.flag(np.asarray(lines)[bad], f"{name}: not unix seconds or an ISO 8601 time", col.filter(pa.array(bad)))
    return ts


def _booleans(col, lines, errors: RowErrors, name: str) -> pa.Array:
    if pa.types.is_boolean(col.type):
        return col
    if not _is_string(col):
        return pc.not_equal(col, 0)
    text = pc.utf8_lower(pc.utf8_trim_whitespace(col))
    true, false = pc.is_in(text, pa.array(_TRUE)), pc.is_in(text, pa.array(_FALSE))
    bad = pc.and_(pc.is_valid(text), pc.invert(pc.or_(true, false))).to_numpy(zero_copy_only=False)
    if bad.any():
        errors.flag(np.asarray(lines)[bad], f"{name}: not a boolean (true/false, 1/0, yes/no)", col.filter(pa.array(bad)))
    return pc.if_else(true, True, pc.if_else(false, False, None))


def _numbers(col, lines, errors: RowErrors, name: str, parse) -> pa.Array:
    return parse(col, lines, errors, name) if _is_string(col) else col
