"""Per-group values (GroupValues) and their re-weighted means: hand-computed values, agreement
with the scalar metrics, the meaning of counts (a group counted twice = a duplicated list) and
clear errors."""

import math

import numpy as np
import pytest

from feedrank.evaluate.metrics import (
    GroupValues,
    base_rate_values,
    group_auc,
    group_auc_values,
    hit_at_k,
    hit_values,
    log_loss,
    log_loss_values,
    mrr,
    mrr_values,
    ndcg_at_k,
    ndcg_values,
    normalized_entropy,
    normalized_entropy_of,
    precision_at_k,
    precision_values,
    recall_at_k,
    recall_values,
    weighted_means,
)


def test_mrr_values_hand_computed_with_undefined_group():
    # Group 1: positives at ranks 2 and 3 -> (1/2 + 1/3) / 2 = 5/12; group 2: rank 2 -> 1/2;
    # group 3 has no positive: undefined, weighs nothing. Rows interleaved on purpose.
    labels = [0, 1, 1, 0, 0, 0, 1, 0]
    scores = [0.9, 0.2, 0.8, 0.6, 0.1, 0.5, 0.4, 0.3]
    groups = [1, 2, 1, 2, 3, 3, 1, 1]
    v = mrr_values(labels, scores, groups)
    assert v.group_ids.tolist() == [1, 2, 3]
    assert v.values[:2] == pytest.approx([5 / 12, 1 / 2], abs=1e-15) and math.isnan(v.values[2])
    assert v.weights.tolist() == [1.0, 1.0, 1.0] and v.defined.tolist() == [True, True, False]
    assert v.mean() == pytest.approx(11 / 24, abs=1e-15) == mrr(labels, scores, groups)


def test_group_auc_values_hand_computed_weights_by_impressions_or_uniform():
    # 'a': AUC 0.5 over 3 rows; 'b': AUC 1.0 over 2 rows; 'c' all negative, 'd' one positive
    rows = [
        ("a", 1, 0.2), ("b", 1, 0.7), ("c", 0, 0.4), ("a", 0, 0.5),
        ("d", 1, 0.9), ("b", 0, 0.3), ("c", 0, 0.6), ("a", 0, 0.1),
    ]  # fmt: skip
    groups, labels, scores = (np.array(col) for col in zip(*rows))
    v = group_auc_values(labels, scores, groups)
    assert v.group_ids.tolist() == ["a", "b", "c", "d"]
    assert v.values[:2].tolist() == [0.5, 1.0] and np.isnan(v.values[2:]).all()
    assert v.weights.tolist() == [3.0, 2.0, 2.0, 1.0] and v.defined.tolist() == [True, True, False, False]
    assert v.mean() == pytest.approx(0.7, abs=1e-15)
    uniform = group_auc_values(labels, scores, groups, weighting="uniform")
    assert uniform.weights.tolist() == [1.0] * 4 and uniform.mean() == pytest.approx(0.75, abs=1e-15)


def test_log_loss_and_base_rate_values_are_row_weighted():
    # group 0: y [1, 0], p [0.8, 0.4] -> losses -ln 0.8, -ln 0.6; group 5: y [1], p [0.5] -> ln 2
    labels, probs, groups = [1, 1, 0], [0.8, 0.5, 0.4], [0, 5, 0]
    ll = log_loss_values(labels, probs, groups)
    assert ll.group_ids.tolist() == [0, 5] and ll.weights.tolist() == [2.0, 1.0] and ll.defined.all()
    assert ll.values == pytest.approx([-(math.log(0.8) + math.log(0.6)) / 2, math.log(2)], abs=1e-15)
    assert ll.mean() == pytest.approx(log_loss(labels, probs), abs=1e-15)
    rate = base_rate_values(labels, groups)
    assert rate.values.tolist() == [0.5, 1.0] and rate.weights.tolist() == [2.0, 1.0]
    assert rate.mean() == pytest.approx(2 / 3, abs=1e-15)
    assert log_loss_values(labels, probs).group_ids.tolist() == [0]  # no groups: one list, id 0


def _random_holdout(seed=0, n_groups=60):
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat(np.arange(n_groups) * 3 + 1, rng.integers(1, 12, n_groups)))
    labels = (rng.random(groups.size) < 0.3).astype(float)
    probs = np.round(np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.25, groups.size), 0, 1), 1)  # ties
    return labels, probs, groups


PAIRS = [  # (per-group values, the scalar metric), both as f(labels, scores, groups)
    (group_auc_values, group_auc),
    (mrr_values, mrr),
    (lambda y, s, g: ndcg_values(y, s, 3, g), lambda y, s, g: ndcg_at_k(y, s, 3, g)),
    (lambda y, s, g: precision_values(y, s, 2, g), lambda y, s, g: precision_at_k(y, s, 2, g)),
    (lambda y, s, g: recall_values(y, s, 2, g), lambda y, s, g: recall_at_k(y, s, 2, g)),
    (lambda y, s, g: hit_values(y, s, 1, g), lambda y, s, g: hit_at_k(y, s, 1, g)),
    (log_loss_values, lambda y, s, g: log_loss(y, s)),
]


@pytest.mark.parametrize("values_fn, metric", PAIRS)
def test_all_counts_one_give_the_full_sample_metric(values_fn, metric):
    labels, probs, groups = _random_holdout()
    part = values_fn(labels, probs, groups)
    ones = np.ones((1, part.group_ids.size))
    assert weighted_means([part], ones)[0, 0] == pytest.approx(metric(labels, probs, groups), rel=1e-13)


@pytest.mark.parametrize("values_fn, metric", PAIRS)
def test_counts_mean_duplicated_and_dropped_groups(values_fn, metric):
    # counts c_j: the metric on a holdout where group j appears c_j times as separate lists
    labels, probs, groups = _random_holdout(seed=1)
    part = values_fn(labels, probs, groups)
    counts = np.random.default_rng(2).integers(0, 4, part.group_ids.size)
    rows, new_groups = [], []
    for j, gid in enumerate(part.group_ids):
        for copy in range(counts[j]):
            members = np.flatnonzero(groups == gid)
            rows.append(members)
            new_groups.append(np.full(members.size, 10 * j + copy))
    rows, new_groups = np.concatenate(rows), np.concatenate(new_groups)
    expected = metric(labels[rows], probs[rows], new_groups)
    assert weighted_means([part], counts[None, :])[0, 0] == pytest.approx(expected, rel=1e-12)


def test_many_replicates_and_parts_in_one_call_and_identical_parts_are_bitwise_equal():
    labels, probs, groups = _random_holdout()
    a, b = mrr_values(labels, probs, groups), mrr_values(labels, probs.copy(), groups)
    c = ndcg_values(labels, probs, 5, groups)
    counts = np.random.default_rng(0).integers(0, 3, (7, a.group_ids.size))
    means = weighted_means([a, b, c], counts)
    assert means.shape == (7, 3)
    assert np.array_equal(means[:, 0], means[:, 1])  # a paired delta of identical models is exactly 0
    for r in range(7):
        assert means[r, 2] == pytest.approx(weighted_means([c], counts[r : r + 1])[0, 0], rel=1e-13)


def test_mean_is_nan_when_no_counted_group_is_defined():
    v = mrr_values([1, 0, 0, 0], [0.2, 0.1, 0.5, 0.6], [0, 0, 1, 1])  # group 1 has no positive
    assert math.isnan(weighted_means([v], [[0, 3]])[0, 0])
    assert weighted_means([v], [[2, 3]])[0, 0] == 1.0
    assert math.isnan(mrr_values([0, 0], [0.1, 0.2], [4, 4]).mean())


def test_normalized_entropy_of_matches_the_metric_and_is_nan_at_rates_0_and_1():
    labels, probs, _ = _random_holdout()
    expected = normalized_entropy(labels, probs)
    assert float(normalized_entropy_of(log_loss(labels, probs), labels.mean())) == pytest.approx(expected, rel=1e-15)
    out = normalized_entropy_of([0.3, 0.3, 0.3], [0.0, 0.5, 1.0])
    assert math.isnan(out[0]) and math.isnan(out[2]) and out[1] == pytest.approx(0.3 / math.log(2), rel=1e-15)


def test_weighted_means_bad_input_names_the_problem():
    v = mrr_values([1, 0, 1, 0], [0.2, 0.1, 0.5, 0.6], [0, 0, 1, 1])
    other = mrr_values([1, 0, 1, 0], [0.2, 0.1, 0.5, 0.6], [0, 0, 2, 2])
    with pytest.raises(ValueError, match="parts is empty"):
        weighted_means([], [[1, 1]])
    with pytest.raises(ValueError, match="same group_ids"):
        weighted_means([v, other], [[1, 1]])
    with pytest.raises(ValueError, match=r"shape \[n_resamples, n_groups=2\], got \(3,\)"):
        weighted_means([v], [1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_means([v], [[1, -1]])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_means([v], [[1, np.nan]])
    with pytest.raises(ValueError, match="groups is required"):
        group_auc_values([1, 0], [0.2, 0.1], None)
    with pytest.raises(ValueError, match="probs must lie in"):
        log_loss_values([1, 0], [1.2, 0.1], [0, 0])
    with pytest.raises(ValueError, match="eps must lie in"):
        log_loss_values([1, 0], [0.2, 0.1], eps=0.7)
    with pytest.raises(ValueError, match="labels has 2 rows but groups has 3"):
        base_rate_values([1, 0], [0, 0, 1])


def test_group_values_is_a_plain_record():
    v = GroupValues(np.array([7]), np.array([0.25]), np.array([2.0]), np.array([True]))
    num, den = v.terms()
    assert num.tolist() == [0.5] and den.tolist() == [2.0] and v.mean() == 0.25
