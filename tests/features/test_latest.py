"""``LatestRows`` folds many batches (with many compactions of its pending rows) into what one
``latest_rows`` over the whole table gives: ties to the later row, groups without rows marked."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from feedrank.features.latest import LatestRows
from feedrank.features.user_state import latest_rows


def test_fold_over_batches_with_compactions_equals_one_pass() -> None:
    rng = np.random.default_rng(0)
    n_groups, n_rows, batch = 50, 40_000, 41  # ~1000 batches of <= 41 candidates: several folds
    group = rng.integers(0, n_groups - 3, n_rows)  # the last 3 groups have no row
    group[n_rows // 2 :] %= 10  # groups >= 10 end mid-log: their latest rows come out of the folds
    ts = np.sort(rng.integers(0, 3, n_rows))  # log order; each third ties, across many batches
    value = pa.table({"value": np.arange(n_rows)})
    fold = LatestRows(n_groups)
    compactions = 0
    for start in range(0, n_rows, batch):
        before = fold._n_pending + (len(np.unique(group[start:start + batch])))
        fold.add(group[start:start + batch], ts[start:start + batch], value.slice(start, batch))
        compactions += fold._n_pending < before
    assert compactions >= 2, "the test must cross the compaction threshold"
    rows, has_row = fold.result()
    row_of, expected_has = latest_rows(group, ts, n_groups)
    np.testing.assert_array_equal(has_row, expected_has)
    np.testing.assert_array_equal(rows["value"].to_numpy()[has_row], row_of[expected_has])
