"""The re-ranker on hand-computed examples, and against a per-candidate reference MMR."""

import doctest

import numpy as np
import pytest

import feedrank.serving.rerank as rerank_module
from feedrank.config import ConfigError, from_dict, load_yaml
from feedrank.serving.rerank import Candidates, RerankConfig, freshness_boost, rerank

PLAIN = dict(mmr_lambda=1.0, per_publisher_cap=None, freshness_boost=0.0)  # relevance only


def make(ids, scores, vectors=None, publishers=None, age_h=None, sources=None) -> Candidates:
    n = len(ids)
    return Candidates(
        item_ids=ids,
        scores=scores,
        vectors=np.eye(n, dtype=np.float32) if vectors is None else vectors,  # all dissimilar
        publishers=[f"pub{i}" for i in range(n)] if publishers is None else publishers,
        age_h=[100.0] * n if age_h is None else age_h,
        sources=["ann"] * n if sources is None else sources,
    )


def test_lambda_one_without_cap_or_boost_is_score_order():
    rng = np.random.default_rng(0)
    n = 30
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    scores = rng.normal(size=n)
    ids = [f"i{i}" for i in range(n)]
    result = rerank(make(ids, scores, vectors), seen=[], cfg=RerankConfig(k=n, **PLAIN))
    assert result.item_ids == [ids[i] for i in np.argsort(-scores)]
    assert [p.score for p in result.picks] == pytest.approx(np.sort(scores)[::-1])
    assert all(p.reason == "ann" for p in result.picks)


def test_near_duplicate_is_pushed_below_a_less_relevant_different_item():
    # relevance after min-max: a 1, b 0.9, c 0.5, d 0; cos(a, b) = 0.96, cos(b, c) = 0.28, others 0.
    # lambda 0.5: slot 1 a (0.5); slot 2: b 0.45 - 0.5*0.96 = -0.03, c 0.25, d 0 -> c;
    # slot 3: b still -0.03 (max(0.96, 0.28)), d 0 - 0 = 0 -> d; slot 4: b.
    vectors = np.array([[1, 0, 0], [0.96, 0.28, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    cands = make(["a", "b", "c", "d"], [1.0, 0.9, 0.5, 0.0], vectors)
    result = rerank(cands, seen=[], cfg=RerankConfig(k=4, mmr_lambda=0.5, per_publisher_cap=None))
    assert result.item_ids == ["a", "c", "d", "b"]
    reasons = {p.item_id: p.reason for p in result.picks}
    assert reasons["a"] == "ann"
    assert reasons["b"] == "ann; moved down by MMR (similar to a, cos 0.96)"
    assert reasons["c"] == "ann; moved up by MMR (diversity)"
    assert reasons["d"] == "ann; moved up by MMR (diversity)"
    assert [p.score for p in result.picks] == [1.0, 0.5, 0.0, 0.9]  # final score = ranker score (no boost)
    # min-max normalisation: any increasing affine change of the scores gives the same feed
    scaled = make(["a", "b", "c", "d"], [13.0, 12.0, 8.0, 3.0], vectors)
    assert rerank(scaled, [], RerankConfig(k=4, mmr_lambda=0.5, per_publisher_cap=None)).item_ids == result.item_ids


def test_publisher_cap_when_alternatives_exist():
    ids = ["p1", "p2", "p3", "p4", "p5", "q1", "q2", "r1"]
    pubs = ["P"] * 5 + ["Q", "Q", "R"]
    cands = make(ids, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], publishers=pubs)
    result = rerank(cands, [], RerankConfig(k=5, mmr_lambda=1.0, per_publisher_cap=2))
    assert result.item_ids == ["p1", "p2", "q1", "q2", "r1"]
    assert [p.publisher for p in result.picks].count("P") == 2
    assert result.held_by_cap == ["p3", "p4", "p5"] and result.cap_relaxed == 0


def test_publisher_cap_relaxed_when_too_few_publishers():
    pubs = ["P", "P", "P", "P", "Q"]
    cands = make(["p1", "p2", "p3", "p4", "q1"], [1.0, 0.9, 0.8, 0.7, 0.1], publishers=pubs)
    result = rerank(cands, [], RerankConfig(k=5, mmr_lambda=1.0, per_publisher_cap=2))
    assert result.item_ids == ["p1", "p2", "q1", "p3", "p4"]
    assert result.cap_relaxed == 2 and result.held_by_cap == []
    assert result.picks[3].reason == (
        "ann; over publisher cap 2 (4 from P): too few other publishers among the candidates"
    )
    assert "cap" not in result.picks[2].reason


def test_seen_items_are_removed_unless_disabled():
    cands = make(["a", "b", "c"], [0.9, 0.8, 0.7])
    result = rerank(cands, seen=["b", "zzz"], cfg=RerankConfig(k=3, **PLAIN))
    assert result.item_ids == ["a", "c"] and result.seen_removed == 1
    kept = rerank(cands, seen=["b"], cfg=RerankConfig(k=3, remove_seen=False, **{**PLAIN}))
    assert kept.item_ids == ["a", "b", "c"] and kept.seen_removed == 0
    everything_seen = rerank(cands, seen=np.array(["a", "b", "c"]), cfg=RerankConfig(k=3))
    assert everything_seen.picks == [] and everything_seen.seen_removed == 3


def test_freshness_boost_moves_a_fresh_item_up_by_the_exact_amount():
    # boost 0.2, half-life 24 h: age 48 -> +0.05, age 0 -> +0.2, age 24 -> +0.1
    cands = make(["old", "new", "mid"], [1.0, 0.9, 0.5], age_h=[48.0, 0.0, 24.0], sources=["ann", "fresh", "popular"])
    cfg = RerankConfig(k=3, mmr_lambda=1.0, per_publisher_cap=None, freshness_boost=0.2, freshness_half_life_h=24.0)
    result = rerank(cands, [], cfg)
    assert result.item_ids == ["new", "old", "mid"]
    assert [p.score for p in result.picks] == pytest.approx([1.1, 1.05, 0.6], abs=1e-12)
    assert [p.reason for p in result.picks] == [
        "fresh; freshness boost +0.200",
        "ann; freshness boost +0.050",
        "popular; freshness boost +0.100",
    ]
    assert [p.source for p in result.picks] == ["fresh", "ann", "popular"]


def test_freshness_boost_function():
    np.testing.assert_allclose(freshness_boost(np.array([-5.0, 0.0, 12.0, 24.0, 48.0]), 0.2, 24.0),
                               [0.2, 0.2, 0.2 / np.sqrt(2), 0.1, 0.05])  # fmt: skip


def test_duplicates_keep_the_highest_scored_copy_and_are_counted():
    cands = make(["a", "b", "a", "c", "a"], [0.5, 0.9, 0.8, 0.1, 0.2],
                 sources=["ann", "ann", "popular", "fresh", "ann"])  # fmt: skip
    result = rerank(cands, [], RerankConfig(k=5, **PLAIN))
    assert result.duplicates_dropped == 2
    assert result.item_ids == ["b", "a", "c"]
    assert result.picks[1].score == 0.8 and result.picks[1].source == "popular"


def test_integer_ids_come_back_as_python_ints():
    result = rerank(make([7, 3, 9], [0.1, 0.3, 0.2]), seen=[9], cfg=RerankConfig(k=2, **PLAIN))
    assert result.item_ids == [3, 7] and all(type(i) is int for i in result.item_ids)


def test_empty_candidates_give_an_empty_result():
    empty = Candidates(item_ids=[], scores=[], vectors=[], publishers=[], age_h=[], sources=[])
    result = rerank(empty, seen=["x"], cfg=RerankConfig())
    assert result.picks == [] and result.duplicates_dropped == 0 and result.seen_removed == 0


def test_k_larger_than_candidates_returns_all():
    result = rerank(make(["a", "b"], [0.2, 0.4]), [], RerankConfig(k=10))
    assert result.item_ids == ["b", "a"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [0.1, 0.2]}, "candidate arrays differ in length: item_ids=3, scores=2, vectors=3, publishers=3, age_h=3, sources=3"),
        ({"scores": [0.1, float("nan"), 0.3]}, "scores: 1 NaN value(s)"),
        ({"scores": [0.1, float("inf"), 0.3]}, "scores: 1 infinite value(s)"),
        ({"age_h": [1.0, float("nan"), float("nan")]}, "age_h: 2 NaN value(s)"),
        ({"vectors": np.ones(3, dtype=np.float32)}, "vectors: expected a 2-D [n, dim] array, got shape (3,)"),
        ({"publishers": [["P"], ["Q"], ["R"]]}, "publishers: expected a 1-D array"),
    ],
)
def test_bad_candidates_name_the_array(kwargs, message):
    base = dict(item_ids=["a", "b", "c"], scores=[0.1, 0.2, 0.3], vectors=np.eye(3), publishers=["P", "Q", "R"],
                age_h=[1.0, 2.0, 3.0], sources=["ann"] * 3)  # fmt: skip
    with pytest.raises(ValueError) as err:
        Candidates(**{**base, **kwargs})
    assert message in str(err.value)


def test_none_publisher_is_a_clear_error():
    with pytest.raises(ValueError, match="publishers: ids must be of one comparable type without None"):
        rerank(make(["a", "b"], [0.1, 0.2], publishers=["P", None]), [], RerankConfig())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"k": 0}, "k must be >= 1, got 0"),
        ({"mmr_lambda": 1.5}, "mmr_lambda must be in [0, 1]"),
        ({"per_publisher_cap": 0}, "per_publisher_cap must be >= 1 or null"),
        ({"freshness_half_life_h": 0}, "freshness_half_life_h must be finite and > 0"),
        ({"mmr_lamda": 0.5}, "unknown key(s) 'mmr_lamda'"),
    ],
)
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(RerankConfig, data, "rerank")
    assert message in str(err.value)


def test_k_below_one_is_rejected_at_call_time_too():
    with pytest.raises(ValueError, match="k must be >= 1"):
        rerank(make(["a"], [0.1]), [], RerankConfig(k=0))


def test_yaml_config(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("rerank:\n  k: 10\n  mmr_lambda: 0.6\n  per_publisher_cap: null\n  freshness_boost: 0.1\n")
    cfg = load_yaml(RerankConfig, path, section="rerank")
    assert cfg == RerankConfig(k=10, mmr_lambda=0.6, per_publisher_cap=None, freshness_boost=0.1)


def reference_mmr(score, vectors, publishers, k, lam, cap):
    """Textbook MMR with a hard publisher cap, one candidate at a time (slow, obviously right)."""
    span = score.max() - score.min()
    rel = (score - score.min()) / span if span else np.ones_like(score)
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    picked: list[int] = []
    for _ in range(min(k, len(score))):
        counts = {p: sum(publishers[j] == p for j in picked) for p in set(publishers)}
        rest = [i for i in range(len(score)) if i not in picked]
        allowed = [i for i in rest if counts[publishers[i]] < cap] or rest
        def objective(i):
            penalty = max((float(v[i] @ v[j]) for j in picked), default=0.0)
            return lam * rel[i] - (1 - lam) * penalty
        picked.append(max(allowed, key=lambda i: (objective(i), score[i])))
    return picked


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_mmr_on_random_requests(seed):
    rng = np.random.default_rng(seed)
    n, k, lam, cap = 40, 15, float(rng.uniform(0.2, 0.9)), 3
    vectors = rng.normal(size=(n, 6)).astype(np.float32)
    scores = rng.normal(size=n)
    publishers = [f"P{i}" for i in rng.integers(0, 6, n)]
    ids = [f"i{i}" for i in range(n)]
    result = rerank(make(ids, scores, vectors, publishers), [], RerankConfig(k=k, mmr_lambda=lam, per_publisher_cap=cap))
    expected = reference_mmr(scores, vectors, publishers, k, lam, cap)
    assert result.item_ids == [ids[i] for i in expected]
    chosen = [p.publisher for p in result.picks]
    assert max(chosen.count(p) for p in set(chosen)) <= cap


def reference_rerank(ids, scores, vectors, publishers, age_h, seen, cfg):
    """The rules of the module docstring one row at a time: dedupe, seen, boost, sort, MMR."""
    best = {}
    for i, item in enumerate(ids):
        if item not in best or scores[i] > scores[best[item]]:
            best[item] = i
    rows = [i for i in sorted(best.values()) if not (cfg.remove_seen and ids[i] in seen)]
    boosted = {i: scores[i] + cfg.freshness_boost * 0.5 ** (max(age_h[i], 0.0) / cfg.freshness_half_life_h) for i in rows}
    rows.sort(key=lambda i: -boosted[i])
    if not rows:
        return [], []
    score = np.array([boosted[i] for i in rows])
    cap = float("inf") if cfg.per_publisher_cap is None else cfg.per_publisher_cap
    picked = reference_mmr(score, vectors[rows], [publishers[i] for i in rows], cfg.k, cfg.mmr_lambda, cap)
    return [ids[rows[j]] for j in picked], [float(score[j]) for j in picked]


@pytest.mark.parametrize("seed", range(12))
def test_rerank_matches_the_reference_with_duplicates_seen_boost_and_full_publishers(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 60))
    ids = [f"i{j}" for j in rng.integers(0, max(1, int(n * 0.8)), n)]  # about one row in five a copy
    vectors = rng.normal(size=(n, 5)).astype(np.float32)
    scores, age_h = rng.normal(size=n), rng.uniform(-2.0, 72.0, n)
    publishers = [f"P{j}" for j in rng.integers(0, int(rng.integers(1, 6)), n)]  # few: caps fill, then relax
    seen = set(rng.choice(ids, size=int(rng.integers(0, 4))).tolist())
    cfg = RerankConfig(k=int(rng.integers(1, 30)), mmr_lambda=float(rng.uniform(0.1, 0.95)),
                       per_publisher_cap=[None, 1, 2, 3][seed % 4], freshness_boost=float(rng.choice([0.0, 0.3])),
                       remove_seen=bool(seed % 3))  # fmt: skip
    result = rerank(make(ids, scores, vectors, publishers, age_h), sorted(seen), cfg)
    want_ids, want_scores = reference_rerank(ids, scores, vectors, publishers, age_h, seen, cfg)
    assert result.item_ids == want_ids
    assert [p.score for p in result.picks] == pytest.approx(want_scores, abs=1e-12)
    assert result.duplicates_dropped == n - len(set(ids))


def test_module_docstring_example():
    result = doctest.testmod(rerank_module)
    assert result.attempted >= 1 and result.failed == 0


def stepwise_mmr(relevance, vectors, publisher, k, lam, cap):
    """The per-step MMR that ``mmr_select`` replaced (every trace update inside the loop): the
    oracle for its picks and for every reason it derives afterwards from the per-step rows."""
    n = len(relevance)
    cap = n if cap is None else cap
    remaining = np.ones(n, dtype=bool)
    per_publisher = np.zeros(publisher.max(initial=-1) + 1, dtype=np.int64)
    max_sim = np.zeros(n, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    near, cos = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32)
    promoted, held, relaxed_at = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    picks = []
    for step in range(min(k, n)):
        objective = lam * relevance - ((1.0 - lam) * max_sim if step else 0.0)
        eligible = remaining & (per_publisher[publisher] < cap)
        relaxed = not eligible.any()
        if relaxed:
            eligible = remaining
        p = int(np.argmax(np.where(eligible, objective, -np.inf)))
        passed = eligible & (relevance > relevance[p])
        first_time = passed & (near < 0)
        near[first_time], cos[first_time] = nearest[first_time], max_sim[first_time]
        promoted[p] = passed.any()
        held |= remaining & ~eligible & (objective > objective[p])
        relaxed_at[p] = relaxed
        picks.append(p)
        remaining[p] = False
        per_publisher[publisher[p]] += 1
        sims = vectors @ vectors[p]
        closer = (sims > max_sim) | (step == 0)
        max_sim = np.where(closer, sims, max_sim)
        nearest[closer] = p
    return picks, near, cos, promoted, held, relaxed_at


@pytest.mark.parametrize("seed", range(8))
def test_mmr_select_trace_matches_the_stepwise_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 120))
    k = int(rng.integers(1, 40))
    lam = float(rng.choice([0.0, 0.3, 0.8, 1.0]))
    cap = [None, 1, 2, 3][seed % 4]
    centres = rng.normal(size=(5, 8))
    vectors = rerank_module._normalise((centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=(n, 8))).astype(np.float32))
    relevance = np.sort(rng.random(n))[::-1].copy()
    relevance[rng.random(n) < 0.2] = relevance[0]  # ties
    publisher = rng.integers(0, int(rng.integers(1, 6)), n)
    picks, trace = rerank_module.mmr_select(relevance, vectors, publisher, k, lam, cap)
    want_picks, near, cos, promoted, held, relaxed = stepwise_mmr(relevance, vectors, publisher, k, lam, cap)
    assert picks.tolist() == want_picks
    np.testing.assert_array_equal(trace.passed_near, near)
    np.testing.assert_array_equal(trace.passed_cos, cos)
    np.testing.assert_array_equal(trace.promoted, promoted)
    np.testing.assert_array_equal(trace.held, held)
    np.testing.assert_array_equal(trace.relaxed, relaxed)
