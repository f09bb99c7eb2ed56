"""Each group's latest row, folded over a log read batch by batch: O(groups + a batch) memory.

Why: the bundle catalogue takes each item's categorical values, title and ``created_ts`` from its
latest row (``feedrank.bundle.build_catalogue``). Reading the training window whole to find those
rows cost ~130 B a row, 12 GiB at 100M rows; folding keeps only candidate rows. The rule is
``feedrank.features.user_state.latest_rows``: the row with the latest ``ts``, and among equal
timestamps the later row; it is associative over batches taken in log order (each batch keeps its
latest row per group, and a later batch's candidate wins a tie), so the fold gives what one
``latest_rows`` over the whole table gives.

Example::

    fold = LatestRows(n_groups=len(vocab))
    for batch in batches:
        fold.add(group_of(batch), batch_ts_us, batch.select(["title", "created_ts"]))
    rows, has_row = fold.result()   # rows.take(...) per group; has_row[g]: group g was seen
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from feedrank.features.user_state import latest_rows

_GROUP, _TS = "__group", "__ts"
#: Candidate rows kept beyond ``2 x n_groups`` before they are folded: a fold leaves at most
#: ``n_groups`` rows, so the next comes after ``n_groups + _SLACK`` more and each row is folded O(1)
#: times. Small, because the pending rows (titles included) are what the fold holds beyond its
#: result: 65,536 held ~6 MiB more on a 1,000-item log (benchmarks/train_100m.py at the CI sizes).
_SLACK = 4096


class LatestRows:
    """The latest row of each group code in ``[0, n_groups)`` among the rows ``add`` is given."""

    def __init__(self, n_groups: int):
        self.n_groups = n_groups
        self._pending: list[pa.Table] = []
        self._n_pending = 0

    def add(self, group: np.ndarray, ts: np.ndarray, rows: pa.Table) -> None:
        """One batch (in log order): group codes, int64 timestamps and the columns to keep."""
        rows = rows.append_column(_GROUP, pa.array(group, pa.int64())).append_column(_TS, pa.array(ts, pa.int64()))
        self._append(self._latest(rows))
        if self._n_pending > 2 * self.n_groups + _SLACK:  # candidates of many batches: keep the latest
            self._append(self._latest(self._take_pending()))

    def result(self) -> tuple[pa.Table, np.ndarray]:
        """``(rows, has_row)``: ``rows`` has one row per group code (row ``g`` is group ``g``'s latest;
        rows of groups without one are arbitrary), ``has_row`` marks the groups that had a row."""
        latest = self._latest(self._take_pending()) if self._pending else None
        has_row = np.zeros(self.n_groups, dtype=bool)
        if latest is None or latest.num_rows == 0:
            return latest, has_row
        group = latest[_GROUP].to_numpy()
        has_row[group] = True
        at = np.zeros(self.n_groups, dtype=np.int64)
        at[group] = np.arange(len(group))
        return latest.take(pa.array(at)).drop_columns([_GROUP, _TS]), has_row

    def _latest(self, rows: pa.Table) -> pa.Table:
        row_of, has_row = latest_rows(rows[_GROUP].to_numpy(), rows[_TS].to_numpy(), self.n_groups)
        return rows.take(pa.array(row_of[has_row]))

    def _append(self, rows: pa.Table) -> None:
        self._pending.append(rows)
        self._n_pending += rows.num_rows

    def _take_pending(self) -> pa.Table:
        rows = pa.concat_tables(self._pending)
        self._pending, self._n_pending = [], 0
        return rows
