"""Write a reader's ``ReadResult`` as a canonical event log, day by day, with a manifest.

Days are written one at a time: item and user metadata are joined onto that day's events only
(``denormalise``), the day is sorted by time, validated and written by
``feedrank.data.log.write_log``, which refuses an invalid day and never touches days already on
disk. Memory therefore peaks at one denormalised day, not the whole log.

The item catalogue and users are merged with any already in the log directory (this source wins
for an id present in both), so ingesting MIND train and then dev into one directory keeps both
catalogues. A day present on disk and in this source is replaced (ingest is idempotent per day);
the manifest lists such days under ``replaced_days``.

Events whose item the catalogue lacks (MIND subsets name news that ``news.tsv`` does not hold)
are kept; their items enter the catalogue without metadata and are counted
(``items_without_metadata``). With ``dedupe=True`` a row repeating an earlier row's
(request_id, user_id, item_id, ts), the key of the validation rule against duplicates, is dropped
(the first one is kept) and counted, instead of the whole day being refused.

``validate=False`` writes every day unchecked (faster, for data known to be good): such a day
may break the rules that ``feedrank validate`` checks, and the manifest records
``validated: false`` for that ingest. Rows without a timestamp are refused either way (they have
no day to go to).

``manifest.json`` (machine-readable, beside the log) describes what is on disk, whatever this
ingest did: ``days`` and ``rows`` are those of the whole log, ``items_in_catalogue`` the size of
``items.parquet``, and ``ingests`` lists every ingest into the directory, oldest first, each with
its source, row/user/item counts, days written, days refused with their validation report,
replaced days, duplicates dropped and skipped input rows. A fully refused ingest is recorded
there and leaves the log's description as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

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
from feedrank.data.readers.common import ReadResult, denormalise, first_per_key, items_without_metadata
from feedrank.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, ValidationReport, conform, validate
from feedrank.fsutil import staged_file
from feedrank.progress import progress as progress_bar

MANIFEST_FILE = "manifest.json"
_DAY_US = 86_400 * 1_000_000
#: What makes two rows the same event: the key of ``feedrank.data.schema.validate``'s duplicate rule.
DUPLICATE_KEY = ["request_id", "user_id", "item_id", "ts"]
_MAX_MISSING_EXAMPLES = 5


@dataclass
class IngestResult:
    """What ``ingest`` did: the per-day write result and the manifest it saved (``run``: the
    record of this ingest, the last of ``manifest["ingests"]``)."""

    write: WriteResult
    manifest: dict
    manifest_path: Path

    @property
    def run(self) -> dict:
        return self.manifest["ingests"][-1]

    @property
    def ok(self) -> bool:
        return self.write.ok


def ingest(
    result: ReadResult, out_dir: str | Path, validate: bool = True, dedupe: bool = False, progress: bool = False
) -> IngestResult:
    """Write ``result`` under ``out_dir`` (events by day, items, users, manifest.json)."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = set(list_days(root))
    earlier = _earlier_ingests(root / MANIFEST_FILE)
    events = result.events
    # Metadata known from an earlier ingest into this log fills in this source's gaps.
    old_items = read_items(root) if (root / ITEMS_FILE).is_file() else None
    catalogue = _merge(result.items, old_items, "item_id", ITEM_SCHEMA)
    missing = items_without_metadata(events["item_id"], catalogue)
    users = None if result.users is None else _merge(result.users, read_users(root), "user_id", USER_SCHEMA)

    write = WriteResult()
    duplicates = 0
    for rows in progress_bar(_rows_by_day(result.events), desc="writing days", unit="day", enabled=progress):
        day = denormalise(events.take(pa.array(rows)), catalogue, users)
        if dedupe:
            kept = first_per_key(day, DUPLICATE_KEY)  # source order: the first occurrence wins
            duplicates += day.num_rows - kept.num_rows
            day = kept
        day = day.sort_by([("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending")])
        part = write_log(root, day, check=validate)
        write.written_days += part.written_days
        write.refused.update(part.refused)
        write.rows += part.rows

    placeholders = conform(pa.table({"item_id": missing}), ITEM_SCHEMA)
    catalogue = pa.concat_tables([catalogue, placeholders])
    write_items(root, catalogue)
    if users is not None:
        write_users(root, users)

    run = {
        "source": result.source,
        "rows_read": events.num_rows,
        "rows_written": write.rows,
        "users": pc.count_distinct(events["user_id"]).as_py(),
        "items_in_events": pc.count_distinct(events["item_id"]).as_py(),
        "items_without_metadata": len(missing),
        "items_without_metadata_examples": missing.slice(0, _MAX_MISSING_EXAMPLES).to_pylist(),
        "rows_without_item_metadata": pc.sum(pc.is_in(events["item_id"], value_set=missing)).as_py() or 0,
        "clicks": pc.sum(events["clicked"]).as_py() or 0,
        "days_written": sorted(write.written_days),
        "refused_days": {day: report.to_dict() for day, report in sorted(write.refused.items())},
        "replaced_days": sorted(existing & set(write.written_days)),
        "dedupe": dedupe,
        "duplicates_dropped": duplicates,
        "skipped_rows": result.skipped_rows,
        "skip_examples": result.skip_examples,
        "validated": validate,
        "ok": write.ok,
    }
    days = list_days(root)
    manifest = {
        "days": days,
        "rows": sum(_rows_on_disk(root, day) for day in days),
        "items_in_catalogue": catalogue.num_rows,
        "ingests": [*earlier, run],
    }
    path = root / MANIFEST_FILE
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return IngestResult(write=write, manifest=manifest, manifest_path=path)


def _earlier_ingests(path: Path) -> list[dict]:
    """The ingest records of an existing manifest (a manifest from before ``ingests`` is one record)."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); move it aside to start a new manifest") from exc
    if isinstance(doc, dict) and isinstance(doc.get("ingests"), list):
        return doc["ingests"]
    return [doc]


def _rows_on_disk(root: Path, day: str) -> int:
    """Rows of one day partition, from the Parquet footers (no data is read)."""
    return sum(pq.read_metadata(f).num_rows for f in sorted((root / EVENTS_DIR / f"date={day}").glob("*.parquet")))


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

