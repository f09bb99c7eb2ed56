"""Full-catalogue top-k metrics: hand-computed values, every input format, exclusion, and a
per-user reference loop written from RecBole's definitions (recbole/evaluator/metrics.py)."""

import itertools
import math

import numpy as np
import pytest
import scipy.sparse
import torch

from feedrank.evaluate.metrics import TopKResult, topk_metrics

# 3 users, 5 items. User 2 has no relevant item and is skipped.
RANKED = np.array([[0, 1, 2, 4], [3, 4, 0, 1], [1, 2, 3, 0]])
RELEVANT_SETS = [{2, 4}, {3}, set()]
D2, D3 = 1 / math.log2(3), 1 / math.log2(4)


def relevant_formats():
    matrix = np.zeros((3, 5), dtype=bool)
    matrix[0, [2, 4]] = True
    matrix[1, 3] = True
    csr = (np.array([0, 2, 3, 3]), np.array([4, 2, 3]))  # indices unsorted within a row on purpose
    return {
        "list of sets": RELEVANT_SETS,
        "bool matrix": matrix,
        "torch bool matrix": torch.from_numpy(matrix),
        "csr arrays": csr,
        "scipy sparse": scipy.sparse.csr_matrix(matrix),
    }


@pytest.mark.parametrize("fmt", list(relevant_formats()))
def test_hand_computed_k2_every_relevant_format(fmt):
    # k=2. u0 top [0, 1]: no hit -> all 0. u1 top [3, 4]: hit at rank 1 -> recall 1, precision 1/2,
    # ndcg 1, mrr 1, hit 1. Averages over the 2 users with relevant items.
    result = topk_metrics(RANKED, relevant_formats()[fmt], k=2)
    assert result == TopKResult(k=2, n_users=2, recall=0.5, precision=0.25, ndcg=0.5, mrr=0.5, hit=0.5)
    assert result.as_dict() == {"recall@2": 0.5, "precision@2": 0.25, "ndcg@2": 0.5, "mrr@2": 0.5, "hit@2": 0.5}


def test_hand_computed_k3():
    # u0 top [0, 1, 2]: hit at rank 3 -> recall 1/2, precision 1/3, mrr 1/3,
    #    ndcg = (1/log2 4) / (1 + 1/log2 3)   (ideal over min(k, |relevant|) = 2 positions)
    # u1 unchanged from k=2 except precision 1/3.
    result = topk_metrics(torch.from_numpy(RANKED), RELEVANT_SETS, k=3)
    assert result.recall == pytest.approx((0.5 + 1) / 2, abs=1e-12)
    assert result.precision == pytest.approx(1 / 3, abs=1e-12)
    assert result.ndcg == pytest.approx((D3 / (1 + D2) + 1) / 2, abs=1e-12)
    assert result.mrr == pytest.approx((1 / 3 + 1) / 2, abs=1e-12)
    assert result.hit == 1.0


def test_score_matrix_gives_the_same_as_its_ranking():
    scores = np.array(
        [[0.9, 0.8, 0.7, 0.1, 0.6], [0.3, 0.2, 0.1, 0.9, 0.8], [0.1, 0.9, 0.8, 0.7, 0.0]], dtype=np.float32
    )  # row-wise descending order is exactly RANKED (+ the unranked last item)
    for k in (1, 2, 3, 4):
        assert topk_metrics(scores, RELEVANT_SETS, k) == topk_metrics(RANKED, RELEVANT_SETS, k)


def test_k_larger_than_catalogue_pads_with_misses():
    scores = np.array([[0.2, 0.9, 0.5]])  # ranking [1, 2, 0], relevant {0} at rank 3
    result = topk_metrics(scores, [{0}], k=10)
    assert result.recall == 1.0 and result.precision == pytest.approx(0.1)  # divides by k
    assert result.mrr == pytest.approx(1 / 3) and result.ndcg == pytest.approx(D3)


def test_exclude_removes_items_before_the_cut():
    # u0 excludes item 0: ranked ids [0, 1, 2, 4] -> [1, 2, 4] -> top 2 = [1, 2]: hit at rank 2
    exclude = [{0}, set(), set()]
    result = topk_metrics(RANKED, RELEVANT_SETS, k=2, exclude=exclude)
    assert result.mrr == pytest.approx((1 / 2 + 1) / 2, abs=1e-12)
    assert result.ndcg == pytest.approx((D2 / (1 + D2) + 1) / 2, abs=1e-12)
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.6], [0.3, 0.2, 0.1, 0.9, 0.8], [0.1, 0.9, 0.8, 0.7, 0.0]])
    assert topk_metrics(scores, RELEVANT_SETS, k=2, exclude=exclude) == result
    assert scores[0, 0] == 0.9  # the caller's matrix is not modified


def test_excluding_everything_leaves_empty_slots():
    scores = np.array([[0.5, 0.4]])
    result = topk_metrics(scores, [{1}], k=2, exclude=[{0, 1}])
    assert result.hit == 0.0 and result.precision == 0.0


def test_faiss_style_empty_slots_are_misses():
    result = topk_metrics(np.array([[2, -1, -1]]), [{2, 5}], k=3)
    assert result.recall == 0.5 and result.precision == pytest.approx(1 / 3)


def test_no_user_with_relevant_items_gives_nan():
    result = topk_metrics(np.array([[0, 1]]), [set()], k=2)
    assert result.n_users == 0 and math.isnan(result.recall) and math.isnan(result.ndcg)


def _recbole_reference(ranked, relevant_sets, k):
    """RecBole's definitions, one user at a time (users without relevant items skipped)."""
    per_user = []
    for row, relevant in zip(ranked, relevant_sets):
        if not relevant:
            continue
        pos_index = [int(item) in relevant for item in row[:k]]
        hits = sum(pos_index)
        first = pos_index.index(True) + 1 if hits else None
        dcg = sum(1 / math.log2(i + 2) for i, hit in enumerate(pos_index) if hit)
        idcg = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
        per_user.append([hits / len(relevant), hits / k, dcg / idcg, 1 / first if first else 0.0, float(hits > 0)])
    return np.mean(per_user, axis=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_recbole_reference_loop(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 60, 40, 10
    scores = rng.random((n_users, n_items))
    relevant = [set(rng.choice(n_items, rng.integers(0, 15), replace=False).tolist()) for _ in range(n_users)]
    ranked = torch.topk(torch.from_numpy(scores), k).indices.numpy()
    expected = _recbole_reference(ranked, relevant, k)
    for inputs in (scores, ranked, torch.from_numpy(ranked)):
        result = topk_metrics(inputs, relevant, k)
        got = [result.recall, result.precision, result.ndcg, result.mrr, result.hit]
        np.testing.assert_allclose(got, expected, atol=1e-12)
        assert result.n_users == sum(1 for s in relevant if s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_ties_are_the_average_over_every_order(seed):
    """A score matrix with many ties equals the mean of the RecBole reference over every ranking
    that sorting the scores allows (all permutations of the tied items), exclusions included."""
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 6, 6, 3
    scores = rng.integers(0, 3, (n_users, n_items)).astype(np.float64)
    scores[0] = 1.0  # a constant model: every order of the catalogue
    relevant = [set(rng.choice(n_items, rng.integers(1, 4), replace=False).tolist()) for _ in range(n_users)]
    exclude = [set(rng.choice(sorted(set(range(n_items)) - rel), 1).tolist()) for rel in relevant]
    rankings = []
    for row, excl in zip(scores, exclude):
        items = [i for i in range(n_items) if i not in excl]
        orders = [list(p) for p in itertools.permutations(items)
                  if all(row[a] >= row[b] for a, b in zip(p, p[1:]))]  # fmt: skip
        rankings.append(orders)
    per_user = [np.mean([_recbole_reference([order], [rel], k) for order in orders], axis=0)
                for orders, rel in zip(rankings, relevant)]  # fmt: skip
    result = topk_metrics(scores, relevant, k, exclude=exclude)
    got = [result.recall, result.precision, result.ndcg, result.mrr, result.hit]
    np.testing.assert_allclose(got, np.mean(per_user, axis=0), atol=1e-12)


def test_constant_scores_score_what_a_random_ranking_scores():
    # 1 relevant item among 10: P(in the top 2) = 2/10, E[1/rank of it within the top 2] = (1 + 1/2)/10
    result = topk_metrics(np.zeros((1, 10)), [{4}], k=2)
    assert result.recall == pytest.approx(0.2, abs=1e-12) and result.hit == pytest.approx(0.2, abs=1e-12)
    assert result.mrr == pytest.approx(0.15, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ranked_or_scores=RANKED, relevant=RELEVANT_SETS, k=0), "k must be an integer >= 1"),
        (dict(ranked_or_scores=RANKED, relevant=RELEVANT_SETS, k=5), "4 ranked ids per user, fewer than k = 5"),
        (dict(ranked_or_scores=RANKED[:, 0], relevant=RELEVANT_SETS, k=1), "non-empty 2-D matrix"),
        (dict(ranked_or_scores=np.array([[0, 0]]), relevant=[{0}], k=2), "repeats an item id in the list of user 0"),
        (dict(ranked_or_scores=np.array([[0, -2]]), relevant=[{0}], k=2), "must be >= 0"),
        (dict(ranked_or_scores=np.array([[0.5, np.nan]]), relevant=[{0}], k=1), "contains NaN"),
        (dict(ranked_or_scores=np.array([[0.5, 0.1]]), relevant=[{7}], k=1), "relevant has item id 7"),
        (dict(ranked_or_scores=np.array([[0.5, 0.1]]), relevant=[{0}], k=1, exclude=[{2}]), "exclude has item id 2"),
        (dict(ranked_or_scores=RANKED, relevant=[{1}], k=1), "relevant has 1 item sets for 3 users"),
        (dict(ranked_or_scores=RANKED, relevant=[{-1}, set(), set()], k=1), "relevant item ids must be >= 0"),
        (dict(ranked_or_scores=RANKED, relevant=(np.array([0, 1]), np.array([1])), k=1), "indptr must have"),
        (dict(ranked_or_scores=RANKED, relevant=(np.array([0, 2, 1, 1]), np.array([1])), k=1), "never decrease"),
        (dict(ranked_or_scores=RANKED, relevant=np.ones((3, 5)), k=1), "must be boolean"),
        (dict(ranked_or_scores=RANKED, relevant={1, 2}, k=1), "unsupported type set"),
        (dict(ranked_or_scores=np.array([["a"]]), relevant=[{1}], k=1), "float scores or integer item ids"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        topk_metrics(**kwargs)
