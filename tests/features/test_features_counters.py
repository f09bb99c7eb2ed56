"""The counter scaling and CTR shrinkage shared by training, evaluation and serving."""

import numpy as np
import pyarrow as pa
import pytest

from feedrank.features.build import FeatureConfig
from feedrank.features.counters import point_in_time_counters, scale_counts, shrunk_ctr, user_counters
from feedrank.features.vocab import OOV, Vocab
from feedrank.serving.pipeline import item_counters
from feedrank.serving.state import VocabIndex


def test_scale_counts_is_float64_log1p_rounded_once():
    counts = np.array([0, 1, 9, 12345, 2**40])
    out = scale_counts(counts)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.log1p(counts.astype(np.float64)).astype(np.float32))
    assert out[0] == 0.0 and out[2] == np.float32(np.log(10.0))


def test_shrunk_ctr_by_hand():
    ctr = shrunk_ctr(np.array([0, 1, 5]), np.array([0, 9, 5]), prior_ctr=0.05, prior_weight=20.0)
    assert ctr.dtype == np.float32
    np.testing.assert_allclose(ctr, [1 / 20, 2 / 29, 6 / 25], rtol=1e-6)  # (c + 20 * 0.05) / (n + 20)


def test_user_counters_one_user_and_many():
    assert user_counters(10, 2).shape == (2,)
    np.testing.assert_array_equal(user_counters(10, 2), scale_counts(np.array([10, 2])))
    many = user_counters(np.array([10, 0, 3]), np.array([2, 0, 1]))
    assert many.shape == (3, 2)
    np.testing.assert_array_equal(many[2], user_counters(3, 1))


def test_serving_item_counters_equal_training_counters_after_the_same_history():
    """An item's serving counters (catalogue totals) equal the training counters of a row placed
    after all of its impressions: same scaling, same shrinkage, bit for bit."""
    # item 0: 4 impressions (2 clicks) at ranks 0..3, then a probe row at rank 4
    item = np.zeros(5, np.int64)
    rank = np.arange(5)
    clicked = np.array([1, 0, 1, 0, 0], bool)
    train = point_in_time_counters(np.arange(5), item, rank, 5, clicked, prior_ctr=0.05, prior_weight=20.0)
    catalogue = pa.table({"train_impressions": pa.array([4], pa.int64()), "train_clicks": pa.array([2], pa.int64())})
    serving = item_counters(catalogue, FeatureConfig(ctr_prior=0.05, ctr_prior_weight=20.0))
    assert serving.dtype == np.float32 and serving.shape == (1, 3)
    expected = [train["item_impressions"][4], train["item_clicks"][4], train["item_ctr"][4]]
    np.testing.assert_array_equal(serving[0], expected)
    np.testing.assert_allclose(serving[0], [np.log(5), np.log(3), 3 / 24], rtol=1e-6)


@pytest.mark.parametrize("buckets", [0, 5])
def test_unknown_indices_is_the_bucket_rule_of_lookup_and_of_the_serving_index(buckets):
    vocab = Vocab("x", ["a", "b", "c"], hash_buckets=buckets)
    unknown = ["zz", "q", "", None]
    got = vocab.unknown_indices(unknown)
    assert got.dtype == np.int64 and got[-1] == OOV
    if buckets:
        assert all(2 + 3 <= i < 2 + 3 + buckets for i in got[:-1])
    else:
        assert got.tolist() == [OOV] * 4
    assert vocab.oov_hits == 0  # the rule alone does not count: lookup does
    assert vocab.lookup(unknown).tolist() == got.tolist()
    index = VocabIndex(vocab)
    assert [index(v) for v in unknown] == got.tolist()
