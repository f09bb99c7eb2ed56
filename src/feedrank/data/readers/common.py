"""What every dataset reader shares: the result type, bad-row bookkeeping and vectorised parsing.

A reader turns one dataset layout into a ``ReadResult``: the events (engagement columns only), the
item catalogue and, where the source has them, users. Item and user metadata are joined onto the
events later, one day at a time, by ``denormalise`` (called from ``feedrank.data.ingest``): a
MIND-small log has ~6M impression rows, and repeating every title on every row for the whole log
at once would cost gigabytes for no benefit.

Text formats (MIND, MovieLens) are parsed line-wise, not with ``pyarrow.csv``: they have no
quoting (a MIND title may contain a lone ``"``), MovieLens-1M separates fields with the two
characters ``::``, and every error must name the 1-based line it came from. The whole file becomes
one Arrow array of lines, each line is split into fields by Arrow, and each field is checked with
a vectorised regex, so the line number of every value stays known and no Python loop runs per row.

Bad rows either raise ``BadInputError`` naming ``file:line`` and the problem (the default) or,
with ``skip_bad_rows=True``, are dropped whole and counted in ``ReadResult.skipped_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, MAX_ABSTRACT_CHARS, USER_SCHEMA, conform

_ITEM_META = [f.name for f in ITEM_SCHEMA if f.name != "item_id"]
_USER_META = [f.name for f in USER_SCHEMA if f.name != "user_id"]

#: The event columns a reader fills in; the rest of EVENT_SCHEMA is item/user metadata.
EVENT_OWN_SCHEMA = pa.schema([f for f in EVENT_SCHEMA if f.name not in _ITEM_META + _USER_META])

_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_MAX_EXAMPLES = 5


class BadInputError(ValueError):
    """A row of an input file cannot be read; names the file, the line (or row) and the problem."""

    def __init__(self, path: str | Path, line: int, reason: str, unit: str = "line"):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if unit == "line" else f"{path} {unit} {line}"
        super().__init__(f"{where}: {reason}")


class NoRowsError(ValueError):
    """An input file (or what is left of it after skipping bad rows) holds no data rows."""


def require_file(path: Path, expected: str) -> Path:
    """``path`` if it is a file, else a ``FileNotFoundError`` saying which format was expected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected {expected})")
    return path


class RowErrors:
    """Bad rows of one file: raise on the first (default), or remember and count them.

    Rows are identified by their 1-based line number in the file (``unit="line"``) or, for
    Parquet, their 1-based row number (``unit="row"``). Whole rows are dropped: a MIND impression
    line with one bad token loses all its tokens, so no half-impression reaches the log.
    """

    def __init__(self, path: str | Path, skip: bool, unit: str = "line"):
        self.path, self.skip, self.unit = str(path), skip, unit
        self._bad: list[np.ndarray] = []
        self.examples: list[str] = []

    def flag(self, lines: np.ndarray | pa.Array, reason: str, values: np.ndarray | pa.Array | None = None) -> None:
        """Report rows ``lines`` as bad for ``reason`` (``values``: the offending values, aligned)."""
        lines = np.asarray(lines, dtype=np.int64)
        if not len(lines):
            return
        first = int(np.argmin(lines))
        detail = reason if values is None else f"{reason}: {_py(values, first)!r}"
        if not self.skip:
            raise BadInputError(self.path, int(lines[first]), detail, self.unit)
        self._bad.append(lines)
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(str(BadInputError(self.path, int(lines[first]), detail, self.unit)))

    @property
    def bad_lines(self) -> np.ndarray:
        return np.unique(np.concatenate(self._bad)) if self._bad else np.empty(0, np.int64)

    @property
    def count(self) -> int:
        return len(self.bad_lines)

    def keep(self, lines: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Array:
        """Boolean mask: True for rows whose line was not flagged."""
        lines = np.asarray(lines, dtype=np.int64)
        return pa.array(~np.isin(lines, self.bad_lines))


def _py(values, i: int):
    """Element ``i`` as a plain Python value, so messages read ``'N12-x'`` or ``3``."""
    v = values[i]
    if isinstance(v, pa.Scalar):
        return v.as_py()
    return v.item() if isinstance(v, np.generic) else v


def read_lines(path: Path, encoding: str = "utf-8") -> tuple[pa.Array, np.ndarray]:
    """The lines of a text file as an Arrow string array, and their 1-based line numbers.

    The final newline does not make an extra empty line; ``\\r\\n`` endings are accepted. Raises
    ``NoRowsError`` for an empty file.
    """
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise BadInputError(path, line, f"not valid {encoding} text ({exc.reason})") from exc
    del data  # the decoded text and its Arrow copy are enough to hold at once
    lines = pc.split_pattern(pa.array([text], pa.large_string()), "\n").flatten()
    del text
    if len(lines) and lines[len(lines) - 1].as_py() == "":
        lines = lines.slice(0, len(lines) - 1)
    lines = pc.utf8_rtrim(lines, characters="\r")
    if not len(lines):
        raise NoRowsError(f"{path}: no rows (the file is empty)")
    return lines, np.arange(1, len(lines) + 1, dtype=np.int64)


def split_fields(
    lines: pa.Array, numbers: np.ndarray, sep: str, names: list[str], errors: RowErrors
) -> pa.Table:
    """Split each line on ``sep`` into exactly ``len(names)`` string columns, plus ``_line``.

    A line with another number of fields is flagged; with skipping it is dropped here, because
    its fields cannot be assigned to columns.
    """
    parts = pc.split_pattern(lines, sep)
    counts = pc.list_value_length(parts).to_numpy()
    bad = counts != len(names)
    if bad.any():
        got = counts[bad]
        errors.flag(numbers[bad], f"expected {len(names)} {sep!r}-separated fields, found", got)
        keep = pa.array(~bad)
        parts, numbers = parts.filter(keep), numbers[~bad]
    # One field of one file stays far below 2 GiB even for MIND-large, so plain strings suffice.
    columns = {name: pc.list_element(parts, i).cast(pa.string()) for i, name in enumerate(names)}
    columns["_line"] = pa.array(numbers)
    return pa.table(columns)


def abstract_column(col: pa.Array | pa.ChunkedArray, lines, errors: RowErrors, what: str = "abstract") -> pa.Array:
    """A source's abstracts as the canonical ``abstract`` column: an empty or blank one is null (the
    source has none for that item), a non-text column is refused whole, and an abstract longer than
    ``MAX_ABSTRACT_CHARS`` flags its row. The one rule of every reader that keeps abstracts."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
        raise ValueError(f"{errors.path}: column {what!r} must be text (the abstract), got {col.type}")
    col = pc.cast(col, pa.string())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    long = pc.fill_null(pc.greater(pc.utf8_length(col), MAX_ABSTRACT_CHARS), False).to_numpy(zero_copy_only=False)
    if long.any():
        errors.flag(np.asarray(lines)[long], f"{what} longer than {MAX_ABSTRACT_CHARS} characters, length",
                    pc.utf8_length(col.filter(pa.array(long))))  # fmt: skip
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), False)
    return pc.if_else(blank, pa.scalar(None, pa.string()), col)


def _checked(col: pa.Array | pa.ChunkedArray, lines, errors: RowErrors, pattern: str, what: str) -> pa.Array:
    """``col`` with entries not matching ``pattern`` flagged and replaced by null (nulls stay)."""
    stripped = pc.utf8_trim_whitespace(col)
    ok = pc.fill_null(pc.match_substring_regex(stripped, pattern), False)
    bad = np.asarray(pc.and_(pc.is_valid(stripped), pc.invert(ok)))
    if bad.any():
        errors.flag(np.asarray(lines)[bad], f"{what} is not a number", col.filter(pa.array(bad)))
    return pc.if_else(ok, stripped, pa.scalar(None, stripped.type))


def parse_int(col, lines, errors: RowErrors, what: str) -> pa.Array:
    """Parse a string column of integers; bad entries are flagged and become null."""
    return pc.cast(_checked(col, lines, errors, _INT_RE, what), pa.int64())


def parse_float(col, lines, errors: RowErrors, what: str) -> pa.Array:
    """Parse a string column of decimals; bad entries are flagged and become null."""
    return pc.cast(_checked(col, lines, errors, _FLOAT_RE, what), pa.float64())


def unix_seconds_to_ts(seconds: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Unix seconds (int or float) to UTC microsecond timestamps."""
    micros = pc.cast(pc.round(pc.multiply(pc.cast(seconds, pa.float64()), 1e6)), pa.int64())
    return pc.cast(micros, pa.timestamp("us", tz="UTC"))


def flag_unknown(ids, known: pa.Array | pa.ChunkedArray, lines, errors: RowErrors, what: str) -> None:
    """Flag rows whose id is not in ``known`` (an event for an item the catalogue lacks)."""
    unknown = np.asarray(pc.invert(pc.is_in(ids, value_set=pa.array(known)).fill_null(False)))
    if unknown.any():
        errors.flag(np.asarray(lines)[unknown], f"unknown {what}", ids.filter(pa.array(unknown)))


def positions(lists: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """For the flattened values of a list array: the index of each value's list, and its index in it."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    parents = pc.list_parent_indices(lists).to_numpy()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return parents, np.arange(len(parents), dtype=np.int64) - starts[parents]


def prefixed(prefix: str, col: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """``"<prefix>-<value>"`` for each string in ``col`` (request ids unique across sources)."""
    return pc.binary_join_element_wise(pa.scalar(prefix, col.type), col, pa.scalar("-", col.type))


def first_per_key(table: pa.Table, key: str) -> pa.Table:
    """The first row of ``table`` for each distinct ``key`` (catalogues must not repeat an id)."""
    if table.num_rows == 0:
        return table
    rows = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    firsts = rows.group_by(key, use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return table.take(np.sort(firsts.to_numpy()))


@dataclass
class ReadResult:
    """One dataset read into the canonical shape.

    ``events`` has the ``EVENT_OWN_SCHEMA`` columns (keys, engagement, rating, scroll); item and
    user metadata live once in ``items`` (``ITEM_SCHEMA``) and ``users`` (``USER_SCHEMA`` or None)
    and are joined on by ``denormalise``. ``skipped_rows`` counts input rows dropped as bad (only
    with ``skip_bad_rows``), ``skip_examples`` says why for the first few.
    """

    events: pa.Table
    items: pa.Table
    users: pa.Table | None
    source: str
    skipped_rows: int = 0
    skip_examples: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.events = conform(self.events, EVENT_OWN_SCHEMA)
        self.items = first_per_key(conform(self.items, ITEM_SCHEMA), "item_id")
        if self.users is not None:
            self.users = first_per_key(conform(self.users, USER_SCHEMA), "user_id")
        if self.events.num_rows == 0:
            raise NoRowsError(f"{self.source}: no rows left to ingest (skipped {self.skipped_rows} bad row(s))")

    def canonical(self) -> pa.Table:
        """All events as one EVENT_SCHEMA table (fine for small data; ingest goes day by day)."""
        return denormalise(self.events, self.items, self.users)


def denormalise(events: pa.Table, items: pa.Table, users: pa.Table | None) -> pa.Table:
    """Join item (and user) metadata onto events; returns a conformed EVENT_SCHEMA table.

    A left join that keeps the event order: each event looks up its item's row by id (a hash
    lookup into the catalogue, then a gather). An event whose item is missing from the catalogue
    keeps null metadata (MIND allows such items; see ``items_without_metadata``).
    """
    table = events
    lookups = [(items, "item_id", _ITEM_META)] + ([(users, "user_id", _USER_META)] if users is not None else [])
    for meta, key, columns in lookups:
        rows = pc.index_in(events[key], value_set=meta[key].combine_chunks())
        for name, col in zip(columns, meta.select(columns).take(rows).columns):
            table = table.append_column(name, col)
    return conform(table)


def items_without_metadata(item_ids: pa.Array | pa.ChunkedArray, items: pa.Table) -> pa.Array:
    """The distinct ids of ``item_ids`` that the catalogue ``items`` lacks, sorted."""
    distinct = pc.unique(item_ids)
    missing = distinct.filter(pc.invert(pc.is_in(distinct, value_set=items["item_id"].combine_chunks())))
    return pc.take(missing, pc.sort_indices(missing))


def combine(results: list[ReadResult]) -> ReadResult:
    """Several reads (e.g. MIND train and dev) as one; the first occurrence of an item or user wins."""
    if len(results) == 1:
        return results[0]
    users = [r.users for r in results if r.users is not None]
    return ReadResult(
        events=pa.concat_tables([r.events for r in results]),
        items=pa.concat_tables([r.items for r in results]),
        users=pa.concat_tables(users) if users else None,
        source=" + ".join(r.source for r in results),
        skipped_rows=sum(r.skipped_rows for r in results),
        skip_examples=[e for r in results for e in r.skip_examples][:_MAX_EXAMPLES],
    )
