"""collate checks a Batch's values at the boundary (the models' forward checks only shapes).

These are the bad-input tests that used to call the models' forward (tests/models): the same bad
values, now named by ``collate`` before any model sees them.
"""

import numpy as np
import pyarrow as pa
import pytest

from feedrank.data.batch import BatchLimits
from feedrank.data.collate import BATCH_COLUMNS, Collator, collate
from feedrank.features.build import EXAMPLE_SCHEMA, ITEM_CAT_INDEX_COLUMNS, USER_CAT_INDEX_COLUMNS

HISTORIES = [[5, 6, 7], [], [8], [2, 3, 4, 9, 10]]
LIMITS = BatchLimits(n_users=6, n_items=11, user_cat_sizes=[6, 7], item_cat_sizes=[6, 7, 8])


def example_rows() -> pa.Table:
    """4 rows whose indices are 2..5, ages and counters 0.0..0.3, positions 2..5 (all valid under LIMITS)."""
    n = len(HISTORIES)
    cols = {f.name: pa.array(np.arange(n) + 2, f.type) for f in EXAMPLE_SCHEMA if pa.types.is_integer(f.type)}
    cols |= {f.name: pa.array(np.arange(n) / 10, f.type) for f in EXAMPLE_SCHEMA if pa.types.is_floating(f.type)}
    cols |= {f.name: pa.array([True, False] * (n // 2)) for f in EXAMPLE_SCHEMA if pa.types.is_boolean(f.type)}
    cols["history"] = pa.array(HISTORIES, pa.list_(pa.int64()))
    cols["item_tokens"] = pa.array([[2, 3], [], [4], [3]][:n] + [[]] * max(0, n - 4), pa.list_(pa.int64()))
    return pa.table({c: cols[c] for c in BATCH_COLUMNS})


def with_column(rows: pa.Table, name: str, values) -> pa.Table:
    i = rows.schema.get_field_index(name)
    return rows.set_column(i, name, pa.array(values, rows.schema.field(i).type))


def test_valid_rows_pass_with_and_without_limits():
    assert len(collate(example_rows(), limits=LIMITS)) == 4
    assert len(collate(example_rows())) == 4


@pytest.mark.parametrize(
    "column, values, message",
    [
        ("item_idx", [2, 3, 4, 11], r"item has indices outside the vocabulary \[0, 11\): min 2, max 11"),
        ("user_idx", [2, 3, 4, 106], r"user has indices outside the vocabulary \[0, 6\): min 2, max 106"),
        (USER_CAT_INDEX_COLUMNS[1], [2, 3, 4, 7], r"user_cats\[:, 1\] has indices outside the vocabulary \[0, 7\)"),
        (ITEM_CAT_INDEX_COLUMNS[0], [2, 3, 4, 6], r"item_cats\[:, 0\] has indices outside the vocabulary \[0, 6\)"),
        ("history", [[5, 6, 7], [], [1008], [2]], r"history has indices outside the vocabulary \[0, 11\): min 0, max 1008"),
    ],
)
def test_out_of_vocabulary_indices_are_named(column, values, message):
    """Was: the two-tower's and the ranker's forward raised on these (an index beyond a table
    would otherwise fail deep in an embedding lookup, or, on CUDA, as a device-side assert)."""
    rows = with_column(example_rows(), column, values)
    with pytest.raises(ValueError, match=message):
        collate(rows, limits=LIMITS)
    with pytest.raises(ValueError, match=message):
        Collator(max_history=3, limits=LIMITS)(rows)


def test_negative_indices_are_named_without_limits():
    with pytest.raises(ValueError, match=r"item has indices outside the vocabulary \[0, \.\.\.\): min -1"):
        collate(with_column(example_rows(), "item_idx", [2, -1, 4, 5]))


def test_limits_must_match_the_categorical_columns():
    with pytest.raises(ValueError, match="user_cats has 2 column.* vocabularies have 1"):
        collate(example_rows(), limits=BatchLimits(6, 11, user_cat_sizes=[6], item_cat_sizes=[6, 7, 8]))


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("item_age_h", float("nan"), "item_age_h has negative, NaN or infinite values"),
        ("item_age_h", -1000.0, "item_age_h has negative, NaN or infinite values"),  # even for a model without freshness
        ("item_age_h", float("inf"), "item_age_h has negative, NaN or infinite values"),
        ("user_clicks", float("nan"), "counters has NaN or infinite values"),
        ("item_ctr", float("inf"), "counters has NaN or infinite values"),
        ("position", -1, "position must be >= 0, got min -1"),
    ],
)
def test_bad_ages_counters_and_positions_are_named(column, value, message):
    """Was: the ranker's forward (NaN counters, NaN ages, negative positions) and the item tower's
    (negative or NaN ages) raised on these."""
    rows = example_rows()
    values = rows.column(column).to_pylist()
    values[2] = value
    with pytest.raises(ValueError, match=message):
        collate(with_column(rows, column, values))


def clicked(rows) -> np.ndarray:
    return rows.column("clicked").to_numpy(zero_copy_only=False)


def test_keep_drops_rows_before_packing_and_never_empties_a_batch():
    rows = example_rows()  # clicked: True, False, True, False
    batch = Collator(max_history=3, keep=clicked)(rows)
    assert batch.user.tolist() == [2, 4] and batch.history.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.clicked.tolist() == [1.0, 1.0]
    none_clicked = with_column(rows, "clicked", [False] * 4)
    assert len(collate(none_clicked, keep=clicked)) == 4  # packed whole: the loss masks the rows out
    with pytest.raises(ValueError, match="keep: expected 4 booleans"):
        collate(rows, keep=lambda r: np.ones(3, dtype=bool))
