"""Write a reader's ``ReadResult`` as a canonical event log, day by day, with a manifest.

Days are written one at a time: item and user metadata are joined onto that day's events only
(``denormalise``), the day is sorted by time, validated and written by
``feedrank.data.log.write_log``, which refuses an invalid day and never touches days already on
disk. Memory therefore peaks at one denormalised day, not the whole log.

The item catalogue and users are merged with any already in the log directory (this source wins
for an id present in both), so ingesting MIND train and then dev into one directory keeps both
catalogues. A day present on disk and in this source is replaced (ingest is idempotent per day);
the manifest lists such days under ``replaced_days``.

``manifest.json`` (machine-readable, beside the log) records the source, row/user/item counts,
days written, days refused with their validation report, replaced days and skipped input rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from feedrank.data.log import (
    EVENTS_DIR,
    ITEMS_FILE,
    WriteResult,
    list_days,
    read_items,
    read_users,
    write_items,
    write_log,
    write_users,
)
from feedrank.data.readers.common import ReadResult, denormalise, first_per_key
from feedrank.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, ValidationReport, conform, validate
from feedrank.fsutil import staged_file
from feedrank.progress import progress as progress_bar

MANIFEST_FILE = "manifest.json"
_DAY_US = 86_400 * 1_000_000


@dataclass
class IngestResult:
    """What ``ingest`` did: the per-day write result and the manifest it saved."""

    write: WriteResult
    manifest: dict
    manifest_path: Path

    @property
    def ok(self) -> bool:
        return self.write.ok


def ingest(result: ReadResult, out_dir: str | Path, validate: bool = True, progress: bool = False) -> IngestResult:
    """Write ``result`` under ``out_dir`` (events by day, items, users, manifest.json)."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = set(list_days(root))
    write = WriteResult()
    for rows in progress_bar(_rows_by_day(result.events), desc="writing days", unit="day", enabled=progress):
        day = denormalise(result.events.take(pa.array(rows)), result.items, result.users)
        day = day.sort_by([("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending")])
        part = write_log(root, day, check=validate)
        write.written_days += part.written_days
        write.refused.update(part.refused)
        write.rows += part.rows

    write_items(root, _merge(result.items, read_items(root) if (root / ITEMS_FILE).is_file() else None, "item_id", ITEM_SCHEMA))
    if result.users is not None:
        write_users(root, _merge(result.users, read_users(root), "user_id", USER_SCHEMA))

    events = result.events
    manifest = {
        "source": result.source,
        "rows_read": events.num_rows,
        "rows_written": write.rows,
        "users": pc.count_distinct(events["user_id"]).as_py(),
        "items_in_events": pc.count_distinct(events["item_id"]).as_py(),
        "items_in_catalogue": result.items.num_rows,
        "clicks": pc.sum(events["clicked"]).as_py() or 0,
        "days": sorted(write.written_days),
        "refused_days": {day: report.to_dict() for day, report in sorted(write.refused.items())},
        "replaced_days": sorted(existing & set(write.written_days)),
        "skipped_rows": result.skipped_rows,
        "skip_examples": result.skip_examples,
        "validated": validate,
        "ok": write.ok,
    }
    path = root / MANIFEST_FILE
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return IngestResult(write=write, manifest=manifest, manifest_path=path)


def _rows_by_day(events: pa.Table) -> list[np.ndarray]:
    """Row indices of ``events`` for each UTC day, in day order (rows without ts last, alone).

    Days are gathered one at a time with ``take`` by the caller, so no second full copy of the
    events is ever held.
    """
    micros = pc.fill_null(pc.cast(events["ts"], pa.int64()), np.iinfo(np.int64).max).to_numpy()
    day = np.floor_divide(micros, _DAY_US)
    order = np.argsort(day, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(day[order])) + 1)


def _merge(new: pa.Table, old: pa.Table | None, key: str, schema: pa.Schema) -> pa.Table:
    """``new`` plus the rows of ``old`` whose key it lacks."""
    new = conform(new, schema)
    if old is None:
        return new
    return first_per_key(pa.concat_tables([new, conform(old, schema)]), key)


def validate_log(root: str | Path) -> dict[str, ValidationReport]:
    """Validate every day partition of an existing log; one report per day, in day order."""
    days = list_days(root)
    if not days:
        raise FileNotFoundError(f"no event log under {root}: expected {Path(root) / EVENTS_DIR}/date=YYYY-MM-DD/*.parquet")
    events = Path(root) / EVENTS_DIR
    return {
        day: validate(ds.dataset(events / f"date={day}", format="parquet", schema=EVENT_SCHEMA).to_table())
        for day in days
    }

