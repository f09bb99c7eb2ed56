"""collate packs the user x item-categorical counters a ranker reads, and names what is missing or bad."""

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from feedrank.data.collate import BATCH_COLUMNS, Collator, batch_columns, collate
from feedrank.features.counters import cross_counter_columns
from feedrank.models.ranker import Ranker, RankerConfig

_spec = importlib.util.spec_from_file_location("collate_checks", Path(__file__).with_name("test_collate_checks.py"))
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

CROSS = ("category", "publisher")


def rows_with_cross() -> pa.Table:
    rows = checks.example_rows()
    for j, name in enumerate(cross_counter_columns(CROSS)):
        rows = rows.append_column(name, pa.array(np.arange(rows.num_rows) + j / 10, pa.float32()))
    return rows


def test_cross_counters_are_packed_in_column_order_and_read_only_when_asked():
    batch = collate(rows_with_cross(), cross_counters=CROSS)
    want = np.stack([np.arange(4) + j / 10 for j in range(4)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(batch.cross_counters.numpy(), want)
    assert collate(rows_with_cross()).cross_counters is None
    assert Collator(cross_counters=CROSS).columns == BATCH_COLUMNS + cross_counter_columns(CROSS) == batch_columns(CROSS)


def test_missing_or_non_finite_cross_counters_are_named():
    with pytest.raises(ValueError, match=r"cross counter column\(s\) \['user_category_impressions'.*features.cross_counters"):
        collate(checks.example_rows(), cross_counters=CROSS)
    bad = checks.with_column(rows_with_cross(), "user_publisher_clicks", [0.0, np.nan, 1.0, 2.0])
    with pytest.raises(ValueError, match="cross_counters has NaN or infinite values"):
        collate(bad, cross_counters=CROSS)


def test_a_ranker_reads_its_cross_counters_and_refuses_a_batch_without_them():
    sizes = dict(n_users=6, n_items=11, user_cat_sizes=[6, 7], item_cat_sizes=[6, 7, 8], n_user_counters=2, n_item_counters=3)
    torch.manual_seed(0)
    model = Ranker(RankerConfig(dim=8, hidden=[16]), **sizes, cross_counters=CROSS).eval()
    batch = collate(rows_with_cross(), cross_counters=CROSS)
    scores = model.predict(batch)["click"]
    batch.cross_counters = batch.cross_counters + 3.0
    assert not torch.allclose(model.predict(batch)["click"], scores)  # the field is read
    batch.cross_counters = None
    with pytest.raises(ValueError, match="reads cross counters of"):
        model.predict(batch)
    plain = Ranker(RankerConfig(dim=8, hidden=[16]), **sizes).eval()
    with pytest.raises(ValueError, match="this ranker reads none"):
        plain.predict(collate(rows_with_cross(), cross_counters=CROSS))
