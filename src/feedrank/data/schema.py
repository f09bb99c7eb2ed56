"""The canonical event log: one row per impression of one item to one user in one feed request.

Every reader (MIND, MovieLens, EB-NeRD, CSV/Parquet) and the simulator produce exactly this schema,
and everything downstream (features, training, evaluation, serving) reads only this schema. Item and
user metadata are denormalised onto each row so that a row is self-contained for point-in-time
feature computation; the item catalogue is also stored on its own (``ITEM_SCHEMA``) because serving
and full-catalogue evaluation need items that were never shown.

Engagement columns describe what happened to the impression: ``clicked``, ``dwell_s`` (seconds, 0
when not clicked), ``shared`` and ``hidden`` (an explicit "not interested"). Datasets that only know
positives (MovieLens ratings) write ``clicked=True`` rows with a synthetic ``request_id``.

Item text: ``title`` and an optional ``abstract`` (MIND's abstract, EB-NeRD's subtitle; null when
the source has none). A log written before ``abstract`` existed reads back with null abstracts:
every reader of the log passes ``EVENT_SCHEMA`` to the dataset, which fills a missing column with
nulls. Readers refuse an abstract longer than ``MAX_ABSTRACT_CHARS`` (``POST /items`` too): text
that long is a body or a parsing error, not a lead paragraph.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TS_TYPE = pa.timestamp("us", tz="UTC")

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def to_epoch_us(ts: dt.datetime) -> int:
    """Epoch microseconds of ``ts``: the integer a ``TS_TYPE`` value holds, to compare with ``ts``
    columns cast to int64. Exact integer arithmetic (a float ``timestamp()`` can be off by one
    microsecond); a naive datetime is taken as UTC, as pyarrow and ``parse_ts`` take it."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.timezone.utc)
    return (ts - _EPOCH) // dt.timedelta(microseconds=1)

#: Longest abstract a reader or ``POST /items`` accepts (MIND-small's longest is under 2,000).
MAX_ABSTRACT_CHARS = 10_000

#: Columns that must never be null: they identify the impression.
KEY_COLUMNS = ("user_id", "item_id", "ts", "request_id")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("ts", TS_TYPE, nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("clicked", pa.bool_(), nullable=False),
        pa.field("dwell_s", pa.float32(), nullable=False),
        pa.field("shared", pa.bool_(), nullable=False),
        pa.field("hidden", pa.bool_(), nullable=False),
        # item metadata (denormalised)
        pa.field("publisher", pa.string()),
        pa.field("item_type", pa.string()),
        pa.field("created_ts", TS_TYPE),
        pa.field("title", pa.string()),
        pa.field("abstract", pa.string()),  # optional lead text (MIND abstract, EB-NeRD subtitle)
        pa.field("category", pa.string()),
        # user metadata (denormalised)
        pa.field("age_bucket", pa.string()),
        pa.field("country", pa.string()),
        # source-specific signals kept because they are real feedback
        pa.field("rating", pa.float32()),  # MovieLens explicit rating
        pa.field("scroll_pct", pa.float32()),  # EB-NeRD scroll percentage
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("publisher", pa.string()),
        pa.field("item_type", pa.string()),
        pa.field("created_ts", TS_TYPE),
        pa.field("title", pa.string()),
        pa.field("abstract", pa.string()),
        pa.field("category", pa.string()),
    ]
)

USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("age_bucket", pa.string()),
        pa.field("country", pa.string()),
    ]
)

#: Defaults for non-key columns a source may not have.
_FILL_DEFAULTS = {"position": 0, "clicked": False, "dwell_s": 0.0, "shared": False, "hidden": False}


class SchemaError(ValueError):
    """A table cannot be brought to the canonical schema (missing or uncastable column)."""


def conform(table: pa.Table, schema: pa.Schema = EVENT_SCHEMA) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, in order, cast to its types.

    Optional columns that are absent become nulls; absent engagement columns take their neutral
    default (not clicked, zero dwell). A missing key column or an impossible cast raises
    ``SchemaError`` naming the column.
    """
    n = table.num_rows
    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            try:
                col = col.cast(f.type) if col.type != f.type else col
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"column {f.name!r}: cannot cast {col.type} to {f.type}: {exc}") from exc
        elif f.name in _FILL_DEFAULTS:
            col = pa.array(np.full(n, _FILL_DEFAULTS[f.name]), type=f.type)
        elif f.nullable:
            col = pa.nulls(n, type=f.type)
        else:
            raise SchemaError(f"missing required column {f.name!r}")
        columns.append(col)
    # Build with a nullable copy of the schema: null keys must reach validate(), which reports
    # them by count and example instead of failing here with an opaque Arrow error.
    loose = pa.schema([f.with_nullable(True) for f in schema])
    return pa.Table.from_arrays(columns, schema=loose)


@dataclass
class Violation:
    """One kind of rule broken: how many rows, and a few of them to look at."""

    rule: str
    count: int
    examples: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        ex = "; ".join(str(e) for e in self.examples)
        return f"{self.rule}: {self.count} row(s), e.g. {ex}"


@dataclass
class ValidationReport:
    rows: int
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.violations

    def __str__(self) -> str:
        if self.ok:
            return f"{self.rows} rows: valid"
        lines = [f"{self.rows} rows: {len(self.violations)} rule(s) violated"]
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "ok": self.ok,
            "violations": [{"rule": v.rule, "count": v.count, "examples": v.examples} for v in self.violations],
        }


class InvalidLogError(ValueError):
    """Raised when a table fails validation; carries the full report."""

    def __init__(self, report: ValidationReport, where: str = ""):
        self.report = report
        super().__init__(f"{where + ': ' if where else ''}{report}")


_EXAMPLE_COLUMNS = ["user_id", "item_id", "ts", "request_id", "position", "dwell_s", "created_ts"]


def _examples(table: pa.Table, mask: pa.ChunkedArray | pa.Array, limit: int = 3) -> list[dict]:
    rows = table.filter(mask).slice(0, limit).select(_EXAMPLE_COLUMNS).to_pylist()
    return [{k: (str(v) if v is not None else None) for k, v in row.items()} for row in rows]


def validate(table: pa.Table) -> ValidationReport:
    """Check a canonical-schema table against every rule; report each rule's count and examples.

    Rules: no nulls in key or engagement columns; dwell is finite and non-negative; position is
    non-negative; no engagement (click, share) before the item was created; no dwell on an
    unclicked impression; no duplicate (request, user, item, ts) rows. Vectorised; no per-row Python.
    """
    table = conform(table)
    violations: list[Violation] = []

    def check(rule: str, mask) -> None:
        mask = pc.fill_null(mask, False)
        count = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
        if count:
            violations.append(Violation(rule, count, _examples(table, mask)))

    for name in (*KEY_COLUMNS, "position", "clicked", "dwell_s", "shared", "hidden"):
        check(f"null {name}", pc.is_null(table[name]))
    dwell = table["dwell_s"]
    check("non-finite dwell_s", pc.invert(pc.is_finite(dwell)))
    check("negative dwell_s", pc.less(dwell, 0))
    check("negative position", pc.less(table["position"], 0))
    check("dwell_s > 0 on an unclicked impression", pc.and_(pc.invert(table["clicked"]), pc.greater(dwell, 0)))
    engaged = pc.or_(table["clicked"], table["shared"])
    check("engagement before item creation (time travel)", pc.and_(engaged, pc.less(table["ts"], table["created_ts"])))

    if table.num_rows:
        keys = table.select(["request_id", "user_id", "item_id", "ts"]).append_column(
            "_row", pa.array(np.arange(table.num_rows))
        )
        firsts = keys.group_by(["request_id", "user_id", "item_id", "ts"], use_threads=False).aggregate(
            [("_row", "min")]
        )["_row_min"]
        dup = np.ones(table.num_rows, dtype=bool)
        dup[firsts.to_numpy()] = False
        check("duplicate row (same request_id, user_id, item_id, ts)", pa.array(dup))
    return ValidationReport(rows=table.num_rows, violations=violations)
