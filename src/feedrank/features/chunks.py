"""The canonical log in time order, in chunks that never split a timestamp: what the streaming
feature build (``feedrank.features.build``) reads, twice.

The total order is ``SORT_KEYS`` (time first; the rest only breaks ties reproducibly, the log forbids
duplicate (request, user, item, ts)). Days are disjoint in time, so each day is sorted on its own
(``feedrank.data.log.iter_days``) and the sorted days are cut into chunks of about ``chunk_rows``
rows; a cut moves forward to the end of its timestamp, so every row of a timestamp is in one chunk.
That is what lets per-chunk state stand in for "everything strictly before this row": every row of
an earlier chunk is strictly earlier. Memory: one day plus one chunk, whatever the log's length.

Example::

    for chunk in time_ordered_chunks("runs/log", ["user_id", "item_id", "ts"], cutoff=None, chunk_rows=262_144):
        ...   # chunk["ts"] ascending; chunk i's last timestamp < chunk i + 1's first
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.data.log import iter_days
from feedrank.data.schema import KEY_COLUMNS

SORT_KEYS = [("ts", "ascending"), ("request_id", "ascending"), ("position", "ascending"),
             ("item_id", "ascending"), ("user_id", "ascending")]  # fmt: skip
#: Rows a chunk of the feature build (a memory knob: the output does not depend on it).
DEFAULT_CHUNK_ROWS = 262_144


def time_ordered_chunks(log_dir: str | Path, columns: list[str], cutoff: dt.datetime | None,
                        chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[pa.Table]:  # fmt: skip
    """The log's rows before ``cutoff`` in ``SORT_KEYS`` order, as tables of at least ``chunk_rows``
    rows (the last one may be shorter), each ending at the end of a timestamp. A null in a
    ``KEY_COLUMNS`` column among ``columns`` is a ``ValueError`` naming the column."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    pending: list[pa.Table] = []
    n_pending = 0
    for day in iter_days(log_dir, columns=columns, end=cutoff):
        if day.num_rows == 0:
            continue
        for name in (c for c in KEY_COLUMNS if c in day.column_names):
            if day[name].null_count:
                raise ValueError(f"{log_dir}: column {name!r} has {day[name].null_count} null value(s)")
        pending.append(day.take(pc.sort_indices(day, sort_keys=SORT_KEYS)))
        n_pending += day.num_rows
        while n_pending >= chunk_rows:
            rows = pa.concat_tables(pending)
            ts = rows["ts"].cast(pa.int64()).to_numpy()
            # The day ends at a day boundary, so a timestamp group never continues into the next day.
            cut = int(np.searchsorted(ts, ts[chunk_rows - 1], side="right"))
            yield rows.slice(0, cut)
            pending, n_pending = [rows.slice(cut)], rows.num_rows - cut
    if n_pending:
        yield pa.concat_tables(pending)
