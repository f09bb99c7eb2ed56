import numpy as np
import pytest

from feedrank.features.counters import COUNTER_COLUMNS, item_age_hours, item_logq, point_in_time_counters
from feedrank.features.history import EventIndex, dense_rank


def test_dense_rank_ties_share_a_rank():
    rank, n = dense_rank(np.array([30, 10, 30, 20, 10]))
    assert rank.tolist() == [2, 0, 2, 1, 0]
    assert n == 3


def test_count_and_last_before_are_strict_and_per_group():
    # group 0: events at ranks 0, 1, 1, 3 with values 10, 11, 12, 13; group 1: one event at rank 0.
    idx = EventIndex(
        group=np.array([0, 0, 1, 0, 0]),
        rank=np.array([0, 1, 0, 1, 3]),
        n_ranks=5,
        values=np.array([10, 11, 99, 12, 13]),
    )
    q_group = np.array([0, 0, 0, 0, 1, 2])
    q_rank = np.array([0, 1, 2, 4, 1, 4])
    assert idx.count_before(q_group, q_rank).tolist() == [0, 1, 3, 4, 1, 0]
    offsets, values = idx.last_before(q_group, q_rank, n=2)
    lists = [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(q_group))]
    assert lists == [[], [10], [11, 12], [12, 13], [99], []]


def test_last_before_zero_length_and_bad_args():
    idx = EventIndex(np.array([0]), np.array([0]), 2, values=np.array([5]))
    offsets, values = idx.last_before(np.array([0]), np.array([1]), n=0)
    assert offsets.tolist() == [0, 0] and len(values) == 0
    with pytest.raises(ValueError, match="ranks in"):
        EventIndex(np.array([0]), np.array([2]), 2)
    with pytest.raises(ValueError, match="differ in length"):
        EventIndex(np.array([0, 1]), np.array([0]), 2)


def test_counters_by_hand():
    # rows: (user, item, rank, clicked); rows 1 and 2 share rank 1 (same request)
    user = np.array([0, 0, 0, 1, 0])
    item = np.array([0, 1, 0, 0, 0])
    rank = np.array([0, 1, 1, 2, 3])
    clicked = np.array([True, True, False, True, False])
    out = point_in_time_counters(user, item, rank, 4, clicked, prior_ctr=0.1, prior_weight=10.0)
    assert list(out) == list(COUNTER_COLUMNS)
    np.testing.assert_allclose(np.expm1(out["user_impressions"]), [0, 1, 1, 0, 3], atol=1e-6)
    np.testing.assert_allclose(np.expm1(out["user_clicks"]), [0, 1, 1, 0, 2], atol=1e-6)
    np.testing.assert_allclose(np.expm1(out["item_impressions"]), [0, 0, 1, 2, 3], atol=1e-6)
    np.testing.assert_allclose(np.expm1(out["item_clicks"]), [0, 0, 1, 1, 2], atol=1e-6)
    # ctr = (clicks + 10 * 0.1) / (imps + 10)
    np.testing.assert_allclose(out["item_ctr"], [1 / 10, 1 / 10, 2 / 11, 2 / 12, 3 / 13], rtol=1e-6)


def test_item_age_uses_created_else_first_seen_and_clips_at_zero():
    hour = 3_600_000_000
    ts = np.array([5, 7, 3, 9]) * hour
    created = np.array([1, 0, 0, 10]) * hour
    valid = np.array([True, False, False, True])
    item = np.array([0, 1, 1, 2])
    # item 1 has no created_ts: first seen at 3h
    assert item_age_hours(ts, created, valid, item).tolist() == [4.0, 4.0, 0.0, 0.0]


def test_item_logq_smoothed_over_window_only():
    item = np.array([0, 0, 1, 2, 3])
    engaged = np.array([True, True, False, True, True])
    window = np.array([True, True, True, True, False])
    # window: items 0,1,2 shown (V=3), engagements E=3 (item 0: 2, item 2: 1); item 3 not in window
    engagements = np.bincount(item[engaged & window], minlength=4)
    shown = np.bincount(item[window], minlength=4) > 0
    q = np.exp(item_logq(engagements, shown)[item])
    np.testing.assert_allclose(q, [3 / 6, 3 / 6, 1 / 6, 2 / 6, 1 / 6], rtol=1e-6)
    with pytest.raises(ValueError, match="no rows"):
        item_logq(np.zeros(4, np.int64), np.zeros(4, bool))
