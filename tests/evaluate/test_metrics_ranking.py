"""AUC, GAUC and per-group ranking metrics against hand-computed values, scikit-learn and a slow
per-group reference loop."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score, precision_score, recall_score, roc_auc_score

from feedrank.evaluate.metrics import (
    _lexsort,
    auc,
    dcg_at_k,
    group_auc,
    hit_at_k,
    mrr,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
)

D = [math.nan] + [1 / math.log2(r + 1) for r in range(1, 12)]  # D[r]: discount at 1-based rank r


# ---------------------------------------------------------------------------------- AUC


def test_auc_hand_computed_without_and_with_ties():
    # positives 0.9, 0.4 beat both negatives 0.1, 0.3: 4 of 4 pairs
    assert auc([0, 1, 1, 0], [0.1, 0.9, 0.4, 0.3]) == 1.0
    # pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.2) = 1, (0.8, 0.5) = 1, (0.8, 0.2) = 1 -> 3.5 / 4
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.8, 0.2]) == pytest.approx(0.875, abs=1e-12)
    # constant scores: every pair is a tie
    assert auc([1, 0, 0, 1, 0], [3, 3, 3, 3, 3]) == pytest.approx(0.5, abs=1e-12)


def test_auc_matches_sklearn_with_many_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 5000)
    scores = rng.integers(0, 25, 5000).astype(np.float32)  # heavy ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_single_class_raises():
    with pytest.raises(ValueError, match="only one class"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_group_auc_hand_computed_skips_single_class_groups():
    # Group 'a': labels [1, 0, 0], scores [0.2, 0.5, 0.1]: pos beats 0.1, loses to 0.5 -> AUC 0.5, 3 rows
    # Group 'b': labels [1, 0], scores [0.7, 0.3] -> AUC 1.0, 2 rows
    # Group 'c' is all negative, group 'd' a single positive: both skipped
    # impressions: (3 * 0.5 + 2 * 1.0) / 5 = 0.7 ; uniform: (0.5 + 1.0) / 2 = 0.75
    rows = [  # (group, label, score), interleaved on purpose
        ("a", 1, 0.2), ("b", 1, 0.7), ("c", 0, 0.4), ("a", 0, 0.5),
        ("d", 1, 0.9), ("b", 0, 0.3), ("c", 0, 0.6), ("a", 0, 0.1),
    ]  # fmt: skip
    groups, labels, scores = zip(*rows)
    assert group_auc(labels, scores, np.array(groups)) == pytest.approx(0.7, abs=1e-12)
    assert group_auc(labels, scores, np.array(groups), weighting="uniform") == pytest.approx(0.75, abs=1e-12)


def test_group_auc_nan_when_no_group_has_both_classes():
    assert math.isnan(group_auc([1, 0, 1], [0.3, 0.2, 0.1], groups=[1, 2, 3]))


def test_group_auc_rejects_bad_weighting():
    with pytest.raises(ValueError, match="weighting"):
        group_auc([1, 0], [0.3, 0.2], groups=[1, 1], weighting="positives")


# ---------------------------------------------------------------------------------- MRR / NDCG / @k


def test_mrr_hand_computed():
    # Group 1: scores [0.9, 0.8, 0.1, 0.3] -> order labels 0, 1, 1, 0: positives at ranks 2 and 3
    #          -> (1/2 + 1/3) / 2 = 5/12
    # Group 2: labels [1, 0], scores [0.2, 0.6] -> positive at rank 2 -> 1/2
    # Group 3: no positive, skipped. MRR = (5/12 + 1/2) / 2 = 11/24
    labels = [0, 1, 0, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.1, 0.3, 0.2, 0.6, 0.5, 0.4]
    groups = [1, 1, 1, 1, 2, 2, 3, 3]
    assert mrr(labels, scores, groups) == pytest.approx(11 / 24, abs=1e-12)
    # one list: scores order labels 0(0.9) 1(0.8) 0(0.6) 0(0.5) 0(0.4) 1(0.3) 1(0.2) 0(0.1)
    assert mrr(labels, scores) == pytest.approx((1 / 2 + 1 / 6 + 1 / 7) / 3, abs=1e-12)


def test_ties_are_the_expected_value_over_random_orders():
    # All scores equal: the positive's rank is 1, 2 or 3 with probability 1/3 each, wherever it sits.
    for labels in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        scores = [0.5, 0.5, 0.5]
        assert mrr(labels, scores) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3, abs=1e-12)
        assert hit_at_k(labels, scores, k=2) == pytest.approx(2 / 3, abs=1e-12)
        assert hit_at_k(labels, scores, k=3) == 1.0
        assert precision_at_k(labels, scores, k=2) == pytest.approx(1 / 3, abs=1e-12)  # E[hits] = 2/3, / k
        assert recall_at_k(labels, scores, k=1) == pytest.approx(1 / 3, abs=1e-12)
        assert ndcg_at_k(labels, scores, k=3) == pytest.approx((D[1] + D[2] + D[3]) / 3, abs=1e-12)
        assert ndcg_at_k(labels, scores, k=2) == pytest.approx((D[1] + D[2]) / 3, abs=1e-12)
        assert auc(labels, scores) == 0.5
    # A tie only between positives changes nothing: ranks 1 and 2 -> (1 + 1/2) / 2
    assert mrr([1, 1, 0], [0.7, 0.7, 0.1]) == pytest.approx(0.75, abs=1e-12)
    # Two positives among four tied items, k = 1: hit = P(first slot positive) = 1/2; k = 2:
    # 1 - P(both slots negative) = 1 - (2/4)(1/3) = 5/6.
    assert hit_at_k([1, 0, 1, 0], [1, 1, 1, 1], k=1) == pytest.approx(0.5, abs=1e-12)
    assert hit_at_k([1, 0, 1, 0], [1, 1, 1, 1], k=2) == pytest.approx(5 / 6, abs=1e-12)


def test_ndcg_graded_hand_computed_and_sklearn():
    # labels [2, 0, 1], scores [0.1, 0.9, 0.5] -> ranked labels 0, 1, 2 -> gains 0, 1, 3
    # DCG@3 = 0 + 1/log2(3) + 3/log2(4); ideal order gains 3, 1, 0 -> IDCG@3 = 3 + 1/log2(3)
    labels, scores = [2, 0, 1], [0.1, 0.9, 0.5]
    assert ndcg_at_k(labels, scores, k=3) == pytest.approx((D[2] + 3 * D[3]) / (3 + D[2]), abs=1e-12)
    # @2: DCG = 1/log2(3), IDCG = 3 + 1/log2(3)
    assert ndcg_at_k(labels, scores, k=2) == pytest.approx(D[2] / (3 + D[2]), abs=1e-12)
    # sklearn uses linear gains: feed it our exponential gains 2**label - 1
    gains = 2.0 ** np.array(labels) - 1
    assert ndcg_at_k(labels, scores, k=2) == pytest.approx(ndcg_score([gains], [scores], k=2), abs=1e-12)


def test_ndcg_binary_matches_sklearn_and_k_beyond_list():
    rng = np.random.default_rng(1)
    labels, scores = rng.integers(0, 2, 40), rng.random(40)
    labels[0] = 1
    for k in (1, 3, 10, 40, 100):
        assert ndcg_at_k(labels, scores, k=k) == pytest.approx(ndcg_score([labels], [scores], k=k), abs=1e-9)
    assert ndcg_at_k(labels, scores, k=100) == ndcg_at_k(labels, scores, k=40)


def test_precision_recall_hit_hand_computed():
    # Group A: labels [1, 0, 1, 0, 0], scores [0.9, 0.8, 0.1, 0.7, 0.3] -> ranked labels 1, 0, 0, 0, 1
    # Group B: labels [0, 1], scores [0.5, 0.4] -> ranked labels 0, 1
    labels = [1, 0, 1, 0, 0, 0, 1]
    scores = [0.9, 0.8, 0.1, 0.7, 0.3, 0.5, 0.4]
    groups = ["A"] * 5 + ["B"] * 2
    # @1: A hits 1 (p 1, r 1/2, hit 1); B hits 0 -> p 1/2, r 1/4, hit 1/2
    assert precision_at_k(labels, scores, 1, groups) == pytest.approx(0.5, abs=1e-12)
    assert recall_at_k(labels, scores, 1, groups) == pytest.approx(0.25, abs=1e-12)
    assert hit_at_k(labels, scores, 1, groups) == pytest.approx(0.5, abs=1e-12)
    # @2: A hits 1 (p 1/2, r 1/2); B hits 1 (p 1/2, r 1) -> p 1/2, r 3/4, hit 1
    assert precision_at_k(labels, scores, 2, groups) == pytest.approx(0.5, abs=1e-12)
    assert recall_at_k(labels, scores, 2, groups) == pytest.approx(0.75, abs=1e-12)
    assert hit_at_k(labels, scores, 2, groups) == 1.0
    # @10, longer than both lists: precision still divides by 10 -> (2/10 + 1/10) / 2; recall 1
    assert precision_at_k(labels, scores, 10, groups) == pytest.approx(0.15, abs=1e-12)
    assert recall_at_k(labels, scores, 10, groups) == pytest.approx(1.0, abs=1e-12)


def test_precision_recall_match_sklearn_on_one_list():
    rng = np.random.default_rng(2)
    labels, scores = rng.integers(0, 2, 50), rng.random(50)
    for k in (1, 5, 17, 50):
        top_k = np.zeros(50, dtype=int)
        top_k[np.argsort(-scores)[:k]] = 1
        assert precision_at_k(labels, scores, k) == pytest.approx(precision_score(labels, top_k), abs=1e-12)
        assert recall_at_k(labels, scores, k) == pytest.approx(recall_score(labels, top_k), abs=1e-12)


def test_single_element_groups():
    # Three one-row groups: positive, negative (skipped), positive
    labels, scores, groups = [1, 0, 1], [0.2, 0.9, 0.4], [5, 6, 7]
    assert mrr(labels, scores, groups) == 1.0
    assert ndcg_at_k(labels, scores, 3, groups) == 1.0
    assert precision_at_k(labels, scores, 3, groups) == pytest.approx(1 / 3, abs=1e-12)
    assert recall_at_k(labels, scores, 3, groups) == 1.0
    assert hit_at_k(labels, scores, 1, groups) == 1.0


def test_groups_without_positives_give_nan():
    for metric in (precision_at_k, recall_at_k, hit_at_k, ndcg_at_k):
        assert math.isnan(metric([0, 0, 0], [0.1, 0.2, 0.3], 2, [1, 1, 2]))
    assert math.isnan(mrr([0, 0], [0.1, 0.2]))


# ---------------------------------------------------------------------------------- property test


def _orders(y, s):
    """Every distinct order of ``y`` that sorting by ``s`` descending allows (ties permuted), each
    equally likely under a uniformly random order of equal scores."""
    blocks = [tuple(y[s == value]) for value in sorted(set(s.tolist()), reverse=True)]
    arrangements = [sorted(set(itertools.permutations(block))) for block in blocks]
    for choice in itertools.product(*arrangements):
        yield [label for block in choice for label in block]


def _reference(labels, scores, groups, k):
    """One group at a time, with Python sorting, averaged over every order of the ties: the slow,
    obviously-right version of the tie rule."""
    per_group = {"gauc": [], "size": [], "mrr": [], "ndcg": [], "p": [], "r": [], "hit": []}
    for g in np.unique(groups):
        y, s = labels[groups == g], scores[groups == g]
        binary = (y > 0).astype(int)
        if 0 < binary.sum() < len(binary):
            per_group["gauc"].append(roc_auc_score(binary, s))
            per_group["size"].append(len(y))
        if binary.sum() == 0:
            continue
        idcg = sum((2**label - 1) * D[i + 1] for i, label in enumerate(sorted(y, reverse=True)[:k]))
        values = []
        for ranked in _orders(y, s):
            ranked_binary = [int(label > 0) for label in ranked]
            hits = sum(ranked_binary[:k])
            values.append([
                np.mean([1 / (i + 1) for i, b in enumerate(ranked_binary) if b]),
                sum((2**label - 1) * D[i + 1] for i, label in enumerate(ranked[:k])) / idcg,
                hits / k, hits / binary.sum(), float(hits > 0),
            ])  # fmt: skip
        for name, value in zip(("mrr", "ndcg", "p", "r", "hit"), np.mean(values, axis=0)):
            per_group[name].append(value)
    return per_group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_group_metrics_match_reference_loop(seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 3
    groups = rng.integers(0, 60, n)  # interleaved, sizes vary, some single-row groups
    scores = rng.integers(0, 4, n).astype(np.float64)  # many ties
    grades = rng.choice([0, 0, 0, 1, 2], n)
    binary = (grades > 0).astype(int)
    ref = _reference(grades, scores, groups, k)
    ref_binary = _reference(binary, scores, groups, k)

    gauc = np.average(ref_binary["gauc"], weights=ref_binary["size"])
    assert group_auc(binary, scores, groups) == pytest.approx(gauc, abs=1e-9)
    assert group_auc(binary, scores, groups, weighting="uniform") == pytest.approx(np.mean(ref_binary["gauc"]), abs=1e-9)
    assert ndcg_at_k(grades, scores, k, groups) == pytest.approx(np.mean(ref["ndcg"]), abs=1e-9)
    assert mrr(binary, scores, groups) == pytest.approx(np.mean(ref_binary["mrr"]), abs=1e-9)
    assert precision_at_k(binary, scores, k, groups) == pytest.approx(np.mean(ref_binary["p"]), abs=1e-9)
    assert recall_at_k(binary, scores, k, groups) == pytest.approx(np.mean(ref_binary["r"]), abs=1e-9)
    assert hit_at_k(binary, scores, k, groups) == pytest.approx(np.mean(ref_binary["hit"]), abs=1e-9)

    # Shuffling the rows changes nothing (ties are averaged over, not broken by position).
    perm = rng.permutation(n)
    assert ndcg_at_k(grades[perm], scores[perm], k, groups[perm]) == pytest.approx(np.mean(ref["ndcg"]), abs=1e-9)
    assert mrr(binary[perm], scores[perm], groups[perm]) == pytest.approx(np.mean(ref_binary["mrr"]), abs=1e-9)


# ---------------------------------------------------------------------------------- sorting helper


def _sorted_rows(keys, order):
    return np.stack([key[order] for key in reversed(keys)], axis=1)


def test_lexsort_orders_like_numpy_lexsort():
    rng = np.random.default_rng(3)
    keys = [rng.integers(0, 3, 1000), -rng.random(1000).round(1), rng.integers(0, 50, 1000)]
    np.testing.assert_array_equal(_sorted_rows(keys, _lexsort(keys)), _sorted_rows(keys, np.lexsort(keys)))


def test_lexsort_falls_back_when_codes_overflow():
    # four keys with 2**16 distinct values each: 2**64 combinations cannot fold into one int64
    rng = np.random.default_rng(4)
    keys = [rng.permutation(2**16) for _ in range(4)]
    np.testing.assert_array_equal(_lexsort(keys), np.lexsort(keys))


def test_dcg_of_dwell_gains_is_the_expected_seconds_per_feed():
    # dwell 30 s and 10 s; labels log2(1 + dwell) make the gain 2**label - 1 the dwell itself
    dwell = np.array([0.0, 30.0, 10.0, 0.0])
    labels, groups = np.log2(1 + dwell), [1, 1, 2, 2]
    # group 1 ranks the 30 s item second: 30 / log2(3); group 2 ties both: (D1 + D2) / 2 * 10
    got = dcg_at_k(labels, [0.9, 0.1, 0.5, 0.5], k=10, groups=groups)
    assert got == pytest.approx((30 * D[2] + 10 * (D[1] + D[2]) / 2) / 2, abs=1e-9)
    # a list without dwell is worth 0 seconds, not undefined
    assert dcg_at_k([0.0, 0.0], [0.3, 0.1], k=10) == 0.0
    assert ndcg_at_k(labels, [0.1, 0.9, 0.5, 0.4], k=10, groups=groups) == pytest.approx(1.0)
