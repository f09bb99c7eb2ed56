"""user_batch: the one user-side Batch builder of evaluation (chunks) and serving (one user)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from feedrank.data.user_batch import user_batch
from feedrank.evaluate.retrieval import UserState, user_batches
from feedrank.features.counters import user_counters
from feedrank.features.vocab import Vocab, Vocabularies


def test_pads_a_csr_chunk_whose_offsets_do_not_start_at_zero():
    history = np.array([99, 99, 7, 8, 9, 5], dtype=np.int64)  # the first two belong to an earlier chunk
    b = user_batch(np.array([4, 5, 6]), np.array([[2, 3], [1, 1], [4, 2]]), np.array([2, 5, 5, 6]), history,
                   np.array([[0.5, 0.0], [1.0, 0.5], [0.0, 0.0]], np.float32), n_item_cats=3)
    assert b.history.tolist() == [[7, 8, 9], [0, 0, 0], [5, 0, 0]]
    assert b.history_mask.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert b.user.tolist() == [4, 5, 6] and b.user.dtype == torch.int64
    assert b.user_cats.tolist() == [[2, 3], [1, 1], [4, 2]]
    assert b.counters.tolist() == [[0.5, 0.0], [1.0, 0.5], [0.0, 0.0]]
    assert b.item_cats.shape == (3, 3) and not b.item_cats.any() and b.weight.tolist() == [1.0, 1.0, 1.0]
    assert len(b) == 3


def test_users_without_history_get_one_masked_padding_slot():
    b = user_batch(np.array([1]), np.array([[1, 1]]), np.array([0, 0]), np.zeros(0, np.int64),
                   np.zeros((1, 2), np.float32), n_item_cats=2)
    assert b.history.tolist() == [[0]] and b.history_mask.tolist() == [[False]]


def test_mismatched_row_counts_name_the_problem():
    with pytest.raises(ValueError, match=r"2 users but user_cats has 1 rows.*history_offsets 2 entries \(expected 3\)"):
        user_batch(np.array([1, 2]), np.array([[1, 1]]), np.array([0, 0]), np.zeros(0, np.int64),
                   np.zeros((2, 2), np.float32), n_item_cats=2)


def test_evaluation_chunks_and_the_serving_single_user_build_agree():
    """Serving builds one user at a time, evaluation chunks of many: every tensor row must match."""
    items = Vocab("item_id", ["a", "b", "c"], hash_buckets=2)
    vocabs = Vocabularies(users=Vocab("user_id", ["u1", "u2"]), items=items,
                          user_cats={"age_bucket": Vocab("age_bucket", ["20s"]), "country": Vocab("country", ["DE", "FR"])},
                          item_cats={c: Vocab(c, []) for c in ("publisher", "item_type", "category")})  # fmt: skip
    state = UserState(
        user_id=pa.array(["u1", "u2", "new"]),
        user_cats={"age_bucket": pa.array(["20s", None, "30s"]), "country": pa.array(["FR", "DE", None])},
        history_offsets=np.array([0, 2, 2, 5]),
        history_items=pa.array(["a", "c", "b", "zzz", "a"]),
        impressions=np.array([10, 0, 3]),
        clicks=np.array([2, 0, 1]),
    )
    chunks = list(user_batches(state, vocabs, chunk=2))
    assert [lo for lo, _ in chunks] == [0, 2]
    hist = items.lookup(state.history_items)
    for lo, chunk in chunks:
        for r in range(len(chunk)):
            u = lo + r
            off = state.history_offsets
            one = user_batch(
                vocabs.users.lookup(state.user_id[u : u + 1]),
                np.stack([vocabs.user_cats[c].lookup(state.user_cats[c][u : u + 1]) for c in vocabs.user_cats], axis=1),
                np.array([0, off[u + 1] - off[u]]), hist[off[u] : off[u + 1]],
                user_counters(int(state.impressions[u]), int(state.clicks[u]))[None], n_item_cats=3,
            )  # fmt: skip
            width = one.history.shape[1]
            for name in ("user", "user_cats", "counters"):
                assert torch.equal(getattr(chunk, name)[r], getattr(one, name)[0]), name
            assert torch.equal(chunk.history[r, :width], one.history[0]) and not chunk.history_mask[r, width:].any()
    # hand-checked: u1 = index 2 with history a, c; "new" is OOV with a hash-bucketed history item
    assert chunks[0][1].user.tolist() == [2, 3] and chunks[1][1].user.tolist() == [1]
    assert chunks[0][1].history[0].tolist() == [2, 4]
    np.testing.assert_array_equal(chunks[0][1].counters[0].numpy(), np.log1p([10.0, 2.0]).astype(np.float32))
