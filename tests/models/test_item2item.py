"""Item-to-item models: EASE against a hand-computed example, co-visitation against brute force."""

import numpy as np
import pytest

from feedrank.models.item2item import SESSION_CUTOFF_TAUS, Item2ItemConfig, fit, fit_covisit, fit_ease, interactions, session_gram


def test_ease_matches_hand_computed_closed_form():
    # 2 users x 2 items, both users engaged with both items: X^T X = [[2, 2], [2, 2]].
    # reg = 1: G = [[3, 2], [2, 3]], det 5, P = [[3, -2], [-2, 3]] / 5,
    # B[i, j] = -P[i, j] / P[j, j] = 2/3 off the diagonal, 0 on it.
    x = interactions(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), 2, 2)
    b = fit_ease(x, reg=1.0).matrix().toarray()
    np.testing.assert_allclose(b, [[0.0, 2 / 3], [2 / 3, 0.0]], atol=1e-6)


def test_ease_three_items_against_numpy_inverse_by_hand():
    x = interactions(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 2, 2]), 3, 3)
    # X^T X = [[1,1,0],[1,2,1],[0,1,2]]; + 2I -> G
    g = np.array([[3.0, 1, 0], [1, 4, 1], [0, 1, 4]])
    p = np.linalg.inv(g)
    expected = np.array([[0 if i == j else -p[i, j] / p[j, j] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(fit_ease(x, reg=2.0).matrix().toarray(), expected, atol=1e-6)


def test_covisit_neighbours_equal_brute_force_counts():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 60, 25, 4
    users, items = rng.integers(0, n_users, 400), rng.integers(0, n_items, 400)
    model = fit_covisit(interactions(users, items, n_users, n_items), k=k, chunk_items=7)
    sets = [set(items[users == u]) for u in range(n_users)]
    for i in range(n_items):
        counts = {j: sum(i in s and j in s for s in sets) for j in range(n_items) if j != i}
        ranked = sorted((j for j in counts if counts[j] > 0), key=lambda j: (-counts[j], j))[:k]
        got, weights = model.neighbours(i)
        assert sorted(got.tolist()) == sorted(ranked)
        np.testing.assert_allclose(np.sort(weights), np.sort([counts[j] for j in ranked]))


def test_top_k_excludes_history_and_ranks_by_score():
    x = interactions(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 0, 1, 1, 2]), 3, 3)
    model = fit_covisit(x, k=2)
    hist = interactions(np.array([0]), np.array([0]), 1, 3)
    top = model.top_k(hist, k=2)
    assert top[0, 0] == 1  # item 1 co-occurs with 0 twice, item 2 never
    assert 0 not in top[0, :1]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="item indices"):
        interactions(np.array([0]), np.array([5]), 1, 3)
    with pytest.raises(ValueError, match="reg"):
        fit_ease(interactions(np.array([0]), np.array([0]), 1, 1), reg=0)


def test_session_gram_equals_brute_force_pair_sum():
    rng = np.random.default_rng(1)
    n_users, n_items, tau = 8, 12, 50.0
    users, items = rng.integers(0, n_users, 120), rng.integers(0, n_items, 120)
    ts = rng.uniform(0, 2000, 120)
    got = session_gram(users, items, ts, n_items, tau).toarray()
    first: dict[tuple[int, int], float] = {}  # a repeated (user, item) counts once, at its first time
    for u, i, t in zip(users, items, ts):
        first[(u, i)] = min(t, first.get((u, i), np.inf))
    expected = np.zeros((n_items, n_items))
    for (u, a), ta in first.items():
        for (v, b), tb in first.items():
            if u == v and abs(ta - tb) <= SESSION_CUTOFF_TAUS * tau:
                expected[a, b] += np.exp(-abs(ta - tb) / tau)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(np.diag(got), np.diag((interactions(users, items, n_users, n_items).T @
                                                      interactions(users, items, n_users, n_items)).toarray()))


def test_session_ease_by_hand():
    # one user, items 0 and 1 rated 0 s and tau s apart, item 2 far later: the session term adds
    # w * (1 on the diagonal, e^-1 between 0 and 1, nothing with 2) to X^T X
    users, items, ts = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 2]), np.array([0.0, 100.0, 1e6, 0.0, 5.0])
    x = interactions(users, items, 2, 3)
    cfg = Item2ItemConfig(reg=2.0, session_weight=0.5, session_tau_s=100.0)
    g = (x.T @ x).toarray() + 0.5 * np.array([[2, np.exp(-1), np.exp(-0.05)], [np.exp(-1), 1, 0],
                                              [np.exp(-0.05), 0, 2]]) + 2.0 * np.eye(3)  # fmt: skip
    p = np.linalg.inv(g)
    expected = np.array([[0 if i == j else -p[i, j] / p[j, j] for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(fit(x, "ease", cfg, (users, items, ts)).matrix().toarray(), expected, atol=1e-6)
    plain = fit(x, "ease", Item2ItemConfig(reg=2.0), (users, items, ts)).matrix().toarray()
    np.testing.assert_allclose(plain, fit_ease(x, reg=2.0).matrix().toarray())  # weight 0: plain EASE
    with pytest.raises(ValueError, match="times"):
        fit(x, "ease", cfg)
    with pytest.raises(ValueError, match="session_tau_s"):
        Item2ItemConfig(session_tau_s=0).validate()
