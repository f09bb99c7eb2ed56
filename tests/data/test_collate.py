import numpy as np
import pyarrow as pa
import pytest
import torch

from feedrank.data.batch import Batch
from feedrank.data.collate import BATCH_COLUMNS, Collator, collate, history_offsets, pad_histories
from feedrank.features.build import EXAMPLE_SCHEMA

HISTORIES = [[5, 6, 7], [], [8], [2, 3, 4, 9, 10]]


def example_rows(histories=HISTORIES) -> pa.Table:
    n = len(histories)
    cols = {f.name: pa.array(np.arange(n) + 2, f.type) for f in EXAMPLE_SCHEMA if pa.types.is_integer(f.type)}
    cols |= {f.name: pa.array(np.arange(n) / 10, f.type) for f in EXAMPLE_SCHEMA if pa.types.is_floating(f.type)}
    cols |= {f.name: pa.array([True, False] * (n // 2) + [True] * (n % 2)) for f in EXAMPLE_SCHEMA if pa.types.is_boolean(f.type)}
    cols["history"] = pa.array(histories, pa.list_(pa.int64()))
    cols["item_tokens"] = pa.array([[2, 3], [], [4], [3]][:n] + [[]] * max(0, n - 4), pa.list_(pa.int64()))
    return pa.table({c: cols[c] for c in BATCH_COLUMNS})


def test_pad_histories_right_pads_with_mask():
    hist, mask = pad_histories(pa.array(HISTORIES, pa.list_(pa.int64())))
    assert hist.dtype == torch.int64 and mask.dtype == torch.bool
    assert hist.tolist() == [[5, 6, 7, 0, 0], [0, 0, 0, 0, 0], [8, 0, 0, 0, 0], [2, 3, 4, 9, 10]]
    assert mask.sum(1).tolist() == [3, 0, 1, 5]
    assert mask[1].tolist() == [False] * 5


def test_truncation_keeps_the_most_recent():
    hist, mask = pad_histories(pa.array(HISTORIES, pa.list_(pa.int64())), max_len=2)
    assert hist.tolist() == [[6, 7], [0, 0], [8, 0], [9, 10]]
    assert mask.tolist() == [[True, True], [False, False], [True, False], [True, True]]


def test_all_empty_histories_still_have_one_padding_column():
    hist, mask = pad_histories(pa.array([[], []], pa.list_(pa.int64())))
    assert hist.shape == (2, 1) and not mask.any()


def test_sliced_and_chunked_lists_are_read_at_their_offsets():
    arr = pa.array(HISTORIES, pa.list_(pa.int64())).slice(2)
    assert pad_histories(arr)[0].tolist() == [[8, 0, 0, 0, 0], [2, 3, 4, 9, 10]]
    chunked = pa.chunked_array([pa.array(HISTORIES[:2], pa.list_(pa.int64())), pa.array(HISTORIES[2:], pa.list_(pa.int64()))])
    assert pad_histories(chunked)[0].tolist() == pad_histories(pa.array(HISTORIES, pa.list_(pa.int64())))[0].tolist()


def test_history_offsets_for_embedding_bag():
    flat, offsets = history_offsets(pa.array(HISTORIES, pa.list_(pa.int64())), max_len=3)
    assert flat.tolist() == [5, 6, 7, 8, 4, 9, 10]
    assert offsets.tolist() == [0, 3, 3, 4]
    bag = torch.nn.EmbeddingBag(11, 2, mode="sum")
    with torch.no_grad():
        bag.weight.copy_(torch.arange(22, dtype=torch.float32).reshape(11, 2))
    pooled = bag(flat, offsets)
    assert pooled[1].tolist() == [0.0, 0.0]  # the empty history pools to zeros
    assert pooled[2].tolist() == [16.0, 17.0]


def test_collate_builds_a_batch_with_documented_shapes_and_types():
    batch = collate(example_rows())
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.user.tolist() == [2, 3, 4, 5] and batch.user.dtype == torch.int64
    assert batch.user_cats.shape == (4, 2) and batch.item_cats.shape == (4, 3)
    assert batch.counters.shape == (4, 5) and batch.counters.dtype == torch.float32
    assert batch.history.shape == (4, 5) and batch.history_mask.sum().item() == 9
    assert batch.clicked.tolist() == [1.0, 0.0, 1.0, 0.0] and batch.clicked.dtype == torch.float32
    assert batch.position.dtype == torch.int64 and batch.request.dtype == torch.int64
    assert batch.weight.tolist() == [1.0] * 4
    assert batch.item_age_h.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert batch.request.tolist() == [2, 3, 4, 5] and batch.position.tolist() == [2, 3, 4, 5]
    assert batch.item_cats[:, 2].tolist() == [2, 3, 4, 5]
    assert batch.counters[3].tolist() == pytest.approx([0.3] * 5)
    assert batch.item_logq.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_packed_tensors_are_disjoint_views():
    batch = collate(example_rows())
    assert batch.user.untyped_storage().data_ptr() == batch.history.untyped_storage().data_ptr()  # one segment
    batch.user += 100
    batch.weight *= 0
    assert batch.item.tolist() == [2, 3, 4, 5] and batch.request.tolist() == [2, 3, 4, 5]
    assert batch.item_logq.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])


def by_dwell(rows) -> np.ndarray:
    return 1.0 + rows.column("dwell_s").to_numpy()


def test_weights_from_array_or_function():
    rows = example_rows()
    assert collate(rows, weight=np.array([1, 2, 3, 4])).weight.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert Collator(max_history=1, weight=by_dwell)(rows).weight.tolist() == pytest.approx([1.0, 1.1, 1.2, 1.3])
    with pytest.raises(ValueError, match="weight: expected 4 finite values, got shape \\(3,\\)"):
        collate(rows, weight=np.ones(3))
    with pytest.raises(ValueError, match="weight: expected 4 finite"):
        collate(rows, weight=np.array([1.0, np.nan, 1.0, 1.0]))


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="lack column\\(s\\) \\['item_logq'\\]"):
        collate(example_rows().drop_columns(["item_logq"]))
    with pytest.raises(ValueError, match="empty"):
        collate(example_rows().slice(0, 0))
    rows = example_rows()
    rows = rows.set_column(rows.schema.get_field_index("item_idx"), "item_idx", pa.array([1, None, 3, 4], pa.int64()))
    with pytest.raises(ValueError, match="column 'item_idx': 1 null"):
        collate(rows)
