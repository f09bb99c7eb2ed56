"""pad_ragged: the one history padding rule behind collate and user_batch."""

import numpy as np
import pyarrow as pa
import pytest

from feedrank.data.collate import pad_histories, pad_ragged
from feedrank.data.user_batch import user_batch


def test_rows_are_right_padded_to_the_longest_in_order():
    padded, mask = pad_ragged(np.array([7, 8, 9, 5, 6]), np.array([3, 0, 1, 1]))
    assert padded.dtype == np.int64 and mask.dtype == np.bool_
    assert padded.tolist() == [[7, 8, 9], [0, 0, 0], [5, 0, 0], [6, 0, 0]]
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, False, False], [True, False, False]]


@pytest.mark.parametrize("lengths, shape", [(np.array([0, 0]), (2, 1)), (np.zeros(0, np.int64), (0, 1))])
def test_width_is_at_least_one(lengths, shape):
    padded, mask = pad_ragged(np.zeros(0, np.int64), lengths)
    assert padded.shape == mask.shape == shape and not mask.any() and not padded.any()


def test_values_that_do_not_match_the_lengths_are_refused():
    with pytest.raises(ValueError, match="cannot assign 2 input values"):
        pad_ragged(np.array([1, 2]), np.array([2, 1]))


def test_collate_and_user_batch_pad_the_same_histories_identically():
    rows = [[4, 5, 6], [], [9]]
    padded, mask = pad_histories(pa.array(rows, pa.list_(pa.int64())))
    b = user_batch(np.arange(3), np.zeros((3, 1), np.int64), np.array([0, 3, 3, 4]), np.array([4, 5, 6, 9]),
                   np.zeros((3, 1), np.float32), n_item_cats=1)
    assert padded.tolist() == b.history.tolist() == [[4, 5, 6], [0, 0, 0], [9, 0, 0]]
    assert mask.tolist() == b.history_mask.tolist()
