"""Clustered paired bootstrap: exact degenerate cases, power, determinism, whole-group
resampling and clear errors."""

import dataclasses

import numpy as np
import pytest

from feedrank.evaluate import bootstrap as B
from feedrank.evaluate.bootstrap import (
    GroupDecomposition,
    Metric,
    bootstrap_ci,
    bootstrap_models,
    get_metric,
    paired_bootstrap,
)
from feedrank.evaluate.metrics import group_auc, hit_values, mrr_values, ndcg_values


def _holdout(n_groups=150, size=8, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), size)
    labels = rng.integers(0, 2, groups.size)
    return rng, groups, labels


def test_identical_models_give_zero_delta_zero_interval_and_p_one():
    rng, groups, labels = _holdout()
    scores = rng.random(labels.size)
    results = paired_bootstrap(labels, scores, scores.copy(), groups, ["auc", "gauc", "ndcg@10"], n_resamples=100)
    assert [r.metric for r in results] == ["auc", "gauc", "ndcg@10"]
    for r in results:
        assert r.delta == 0.0 and r.ci == (0.0, 0.0) and r.p_value == 1.0
        assert r.value_a == r.value_b and not r.b_better


def test_clearly_better_model_excludes_zero_and_worse_model_too():
    rng, groups, labels = _holdout()
    weak = labels + rng.normal(0, 3.0, labels.size)
    strong = labels + rng.normal(0, 0.5, labels.size)
    (better,) = paired_bootstrap(labels, weak, strong, groups, ["gauc"], n_resamples=200)
    assert better.delta > 0.1 and better.ci[0] > 0 and better.b_better
    assert better.p_value == pytest.approx(2 / 201)  # no replicate with delta <= 0
    assert better.value_b == pytest.approx(group_auc(labels, strong, groups))
    (worse,) = paired_bootstrap(labels, strong, weak, groups, ["gauc"], n_resamples=200)
    assert worse.delta == pytest.approx(-better.delta) and worse.ci[1] < 0 and not worse.b_better
    assert worse.p_value == pytest.approx(2 / 201)  # two-sided


def test_p_value_grows_as_the_difference_shrinks():
    rng, groups, labels = _holdout(n_groups=80)
    base = labels + rng.normal(0, 1.0, labels.size)
    noise = rng.normal(0, 1.0, labels.size)
    p = [
        paired_bootstrap(labels, base, base + eps * labels + 0.3 * noise, groups, ["gauc"], n_resamples=200)[0].p_value
        for eps in (1.0, 0.1, 0.0)
    ]
    assert p[0] < 0.05
    assert p[0] <= p[1] <= 1.0
    assert p[2] > 0.05  # adding pure noise is not a significant improvement


def test_lower_is_better_metric_direction():
    rng, groups, labels = _holdout()
    good = np.clip(0.2 + 0.6 * labels + rng.normal(0, 0.05, labels.size), 0.01, 0.99)
    bad = np.full(labels.size, 0.5)
    (r,) = paired_bootstrap(labels, bad, good, groups, ["log_loss"], n_resamples=100)
    assert not r.higher_is_better and r.delta < 0 and r.ci[1] < 0 and r.b_better


def test_deterministic_with_seed_and_seed_matters():
    rng, groups, labels = _holdout()
    scores = labels + rng.normal(0, 1.0, labels.size)
    one = bootstrap_ci(labels, scores, groups, "mrr", n_resamples=50, seed=3)
    two = bootstrap_ci(labels, scores, groups, "mrr", n_resamples=50, seed=3)
    other = bootstrap_ci(labels, scores, groups, "mrr", n_resamples=50, seed=4)
    assert one == two
    assert one.ci != other.ci and one.value == other.value
    assert one.ci[0] <= one.value <= one.ci[1]
    assert one.n_resamples == 50 and one.level == 0.95


def test_level_widens_the_interval():
    rng, groups, labels = _holdout()
    scores = labels + rng.normal(0, 1.0, labels.size)
    narrow = bootstrap_ci(labels, scores, groups, "gauc", n_resamples=300, level=0.5)
    wide = bootstrap_ci(labels, scores, groups, "gauc", n_resamples=300, level=0.99)
    assert wide.ci[0] < narrow.ci[0] < narrow.ci[1] < wide.ci[1]


def _group_sizes_differ():
    """Group g has g + 1 rows; its score column stores g, so a replicate can check it got whole groups."""
    n_groups = 30
    original = np.repeat(np.arange(n_groups), np.arange(1, n_groups + 1))
    rng = np.random.default_rng(1)
    perm = rng.permutation(original.size)  # groups need not be contiguous
    return original[perm], np.zeros(original.size)


def test_whole_groups_are_resampled_and_duplicates_become_separate_lists():
    groups, labels = _group_sizes_differ()
    scores = groups.astype(np.float64)

    def whole_groups(y, s, g):
        # every resampled list is one original group, complete: constant s and s + 1 rows
        sizes = np.bincount(g)
        first = np.zeros(sizes.size)
        first[g] = s
        constant = np.all(s == first[g])
        return float(constant and np.array_equal(sizes, first + 1))

    def distinct_originals(y, s, g):
        return float(np.unique(s).size)

    table = bootstrap_models(labels, {"m": scores}, groups, [whole_groups, distinct_originals], n_resamples=100)
    assert table.values[0].tolist() == [1.0, 30.0]
    assert np.all(table.replicates[0, 0] == 1.0)
    distinct = table.replicates[0, 1]
    assert distinct.max() < 30  # drawing 30 of 30 with replacement almost never hits all
    assert 14 < distinct.mean() < 24  # ~ 30 * (1 - 1/e) = 19


def test_clusters_resample_users_and_keep_requests_as_lists():
    # 40 users with 3 requests of 4 impressions each; request ids are unique across users
    users = np.repeat(np.arange(40), 12)
    requests = np.repeat(np.arange(120), 4)
    labels = np.zeros(users.size)

    def lists_and_users(y, s, g):
        # s is the user id: each drawn user brings all 12 rows, each request stays a list of 4
        rows_per_user = np.bincount(s.astype(np.int64))
        return float(np.all(np.bincount(g) == 4) and np.all(rows_per_user % 12 == 0))

    table = bootstrap_models(labels, {"m": users.astype(float)}, requests, [lists_and_users], n_resamples=20, clusters=users)
    assert np.all(table.replicates == 1.0)
    with pytest.raises(ValueError, match="inside one cluster"):
        bootstrap_models(labels, {"m": labels}, requests, ["gauc"], clusters=np.tile([0, 1], 240))


def test_undefined_replicates_are_dropped_not_fatal():
    # one positive among 20 groups: many replicates contain no positive and auc is undefined there
    groups = np.repeat(np.arange(20), 2)
    labels = np.zeros(40)
    labels[0] = 1
    r = bootstrap_ci(labels, np.arange(40.0)[::-1], groups, "auc", n_resamples=200)
    assert r.value == 1.0 and 0 < r.n_resamples < 200 and r.ci == (1.0, 1.0)


def test_metric_names_and_directions():
    assert get_metric("ndcg@5").name == "ndcg@5"
    assert get_metric("log_loss").higher_is_better is False and get_metric("log_loss").uses_probs
    assert get_metric("recall@3").fn([1, 0, 0, 1], [0.9, 0.8, 0.7, 0.1], np.zeros(4)) == 0.5
    for bad in ("ndgc@10", "ndcg@0", "ndcg@x", "auc@5"):
        with pytest.raises(ValueError, match="unknown metric"):
            get_metric(bad)
    custom = Metric("mean", lambda y, s, g: float(np.mean(s)), higher_is_better=False)
    (r,) = paired_bootstrap([0, 1, 0, 1], [1.0, 1, 1, 1], [2.0, 2, 2, 2], [0, 0, 1, 1], [custom], n_resamples=5)
    assert r.metric == "mean" and r.delta == 1.0 and r.ci == (1.0, 1.0) and not r.b_better


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=None), "groups is required"),
        (dict(groups=np.zeros(5)), "labels has 6 rows but groups has 5"),
        (dict(scores_b=np.zeros(7)), r"scores\['b'\] has 7"),
        (dict(scores_a=[0.1, np.nan, 0.3, 0.4, 0.5, 0.6]), r"scores\['a'\] contains NaN"),
        (dict(labels=[]), "labels is empty"),
        (dict(metrics=[]), "metrics is empty"),
        (dict(metrics=["nope"]), "unknown metric 'nope'"),
        (dict(n_resamples=0), "n_resamples must be an integer >= 1"),
        (dict(level=1.0), "level must lie in"),
        (dict(labels=[0, 1, 2, 0, 1, 0]), "labels must be binary"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    args = dict(
        labels=[0, 1, 0, 0, 1, 0],
        scores_a=np.linspace(0, 1, 6),
        scores_b=np.linspace(1, 0, 6),
        groups=[1, 1, 1, 2, 2, 2],
        metrics=["gauc"],
        n_resamples=10,
    )
    args.update(kwargs)
    labels, a, b, groups, metrics = (args.pop(k) for k in ("labels", "scores_a", "scores_b", "groups", "metrics"))
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(labels, a, b, groups, metrics, **args)


# ------------------------------------------------------------------ fast path (group re-weighting)

FAST = ["gauc", "mrr", "ndcg@3", "recall@2", "precision@2", "hit@1", "log_loss", "ne"]


def _on_rows(names):
    """The same metrics forced onto the row path (re-score every replicate's rows)."""
    return [dataclasses.replace(get_metric(name), decomposition=None) for name in names]


def _users_and_requests(seed=0):
    """30 users with 2-4 requests of 1-9 impressions; request ids sparse, rows shuffled; ties."""
    rng = np.random.default_rng(seed)
    n_requests = 90
    request_user = np.sort(rng.integers(0, 30, n_requests))
    sizes = rng.integers(1, 10, n_requests)
    requests = np.repeat(np.arange(n_requests) * 11 + 5, sizes)
    users = np.repeat(request_user, sizes)
    perm = rng.permutation(requests.size)
    requests, users = requests[perm], users[perm]
    labels = (rng.random(requests.size) < 0.25).astype(float)
    a = np.round(np.clip(0.25 + 0.3 * labels + rng.normal(0, 0.25, labels.size), 0, 1), 1)
    b = np.round(np.clip(0.25 + 0.4 * labels + rng.normal(0, 0.2, labels.size), 0, 1), 1)
    return labels, {"a": a, "b": b}, requests, users


@pytest.mark.parametrize("by_user", [False, True])
def test_fast_path_reproduces_the_row_path_replicate_by_replicate(by_user):
    # Same seed -> same drawn clusters; a group's value does not depend on where it is drawn,
    # so the re-weighted replicates equal the re-scored ones up to float rounding.
    labels, scores, requests, users = _users_and_requests()
    clusters = users if by_user else None
    fast = bootstrap_models(labels, scores, requests, FAST, n_resamples=120, seed=7, clusters=clusters)
    rows = bootstrap_models(labels, scores, requests, _on_rows(FAST), n_resamples=120, seed=7, clusters=clusters)
    assert all(m.decomposition is not None for m in fast.metrics)
    assert np.array_equal(fast.values, rows.values)
    assert np.isfinite(fast.replicates).all()
    np.testing.assert_allclose(fast.replicates, rows.replicates, rtol=0, atol=1e-12)


def test_fast_path_matches_row_path_when_replicates_are_undefined():
    # one positive in 20 requests: a replicate without it has no defined group (mrr, gauc) and a
    # base rate of 0 (ne): nan on both paths, in the same replicates
    groups = np.repeat(np.arange(20), 3)
    labels = np.zeros(60)
    labels[4] = 1
    probs = np.linspace(0.05, 0.95, 60)
    names = ["mrr", "gauc", "ne", "log_loss"]
    fast = bootstrap_models(labels, {"m": probs}, groups, names, n_resamples=200, seed=1)
    rows = bootstrap_models(labels, {"m": probs}, groups, _on_rows(names), n_resamples=200, seed=1)
    nan = np.isnan(fast.replicates)
    assert np.array_equal(nan, np.isnan(rows.replicates))
    assert 0 < nan[0, 0].sum() < 200 and np.array_equal(nan[0, 0], nan[0, 2]) and not nan[0, 3].any()
    np.testing.assert_allclose(fast.replicates[~nan], rows.replicates[~nan], rtol=0, atol=1e-12)
    assert fast.interval("m", "ne").n_resamples == 200 - nan[0, 2].sum()


def test_fast_and_row_paths_agree_in_distribution_across_seeds():
    rng, groups, labels = _holdout(n_groups=200, size=8, seed=3)
    scores = labels + rng.normal(0, 1.5, labels.size)
    names = ["gauc", "ndcg@5"]
    fast = bootstrap_models(labels, {"m": scores}, groups, names, n_resamples=2000, seed=10)
    rows = bootstrap_models(labels, {"m": scores}, groups, _on_rows(names), n_resamples=2000, seed=11)
    for name in names:
        (lo_f, hi_f), (lo_r, hi_r) = fast.interval("m", name).ci, rows.interval("m", name).ci
        assert abs(lo_f - lo_r) < 0.01 and abs(hi_f - hi_r) < 0.01
        assert hi_f - lo_f > 0.02  # a real interval, not a degenerate one that trivially agrees


def test_identical_models_on_probability_metrics_give_exact_zero():
    rng, groups, labels = _holdout()
    probs = np.clip(0.3 + 0.3 * labels + rng.normal(0, 0.2, labels.size), 0, 1)
    names = ["log_loss", "ne", "mrr", "recall@3"]
    results = paired_bootstrap(labels, probs, probs.copy(), groups, names, n_resamples=100)
    for r in results:
        assert r.delta == 0.0 and r.ci == (0.0, 0.0) and r.p_value == 1.0 and r.n_resamples == 100


def test_chunks_of_replicates_do_not_change_the_result(monkeypatch):
    labels, scores, requests, users = _users_and_requests(seed=2)
    whole = bootstrap_models(labels, scores, requests, FAST, n_resamples=50, seed=3, clusters=users)
    monkeypatch.setattr(B, "_CHUNK_CELLS", 7 * 90)  # 90 requests -> chunks of 7 replicates
    chunked = bootstrap_models(labels, scores, requests, FAST, n_resamples=50, seed=3, clusters=users)
    np.testing.assert_allclose(chunked.replicates, whole.replicates, rtol=0, atol=1e-12)


def test_custom_metric_with_a_decomposition_takes_the_fast_path():
    labels, scores, requests, _ = _users_and_requests(seed=4)
    calls = []

    def hit1(y, s, g):
        calls.append(1)
        return get_metric("hit@1").fn(y, s, g)

    custom = Metric("top1", hit1, decomposition=GroupDecomposition(lambda y, s, g: (hit_values(y, s, 1, g),)))
    table = bootstrap_models(labels, scores, requests, [custom, "hit@1"], n_resamples=40, seed=0)
    assert len(calls) == 2  # the point estimate of each model only, never per replicate
    np.testing.assert_allclose(table.replicates[:, 0], table.replicates[:, 1], rtol=0, atol=1e-15)


def test_precomputed_group_values_bootstrap_like_the_rows_they_came_from():
    """``bootstrap_values`` (retrieval: per-user values from a full-catalogue ranking) draws the same
    groups as ``bootstrap_models`` for the same seed, so its replicates are the same numbers."""
    rng, groups, labels = _holdout(n_groups=80, size=6, seed=3)
    scores = {"a": rng.random(labels.size), "b": labels + rng.normal(0, 1, labels.size)}
    rows = bootstrap_models(labels, scores, groups, ["mrr", "ndcg@3"], n_resamples=50, seed=7)
    values = {m: {"mrr": mrr_values(labels, s, groups), "ndcg@3": ndcg_values(labels, s, 3, groups)}
              for m, s in scores.items()}  # fmt: skip
    table = B.bootstrap_values(values, n_resamples=50, seed=7)
    np.testing.assert_allclose(table.values, rows.values, atol=1e-12)
    np.testing.assert_allclose(table.replicates, rows.replicates, atol=1e-12)
    assert table.compare("a", "b")[0].ci == pytest.approx(rows.compare("a", "b")[0].ci)
    with pytest.raises(ValueError, match="same metrics"):
        B.bootstrap_values({"a": values["a"], "b": {"mrr": values["b"]["mrr"]}}, n_resamples=5)


def test_lift_share_is_model_minus_random_over_oracle_minus_random_per_replicate():
    rng, groups, labels = _holdout(n_groups=200, size=8, seed=4)
    oracle = labels + rng.normal(0, 0.3, labels.size)
    half = labels + rng.normal(0, 1.5, labels.size)
    table = bootstrap_models(labels, {"oracle": oracle, "model": half, "random": np.zeros(labels.size)}, groups,
                             ["gauc"], n_resamples=100)  # fmt: skip
    share = table.lift_share("model", "gauc", "oracle", "random")
    value = lambda m: table.interval(m, "gauc").value  # noqa: E731
    assert share.value == pytest.approx((value("model") - 0.5) / (value("oracle") - 0.5))
    assert value("random") == 0.5 and 0 < share.ci[0] < share.value < share.ci[1] < 1
    assert table.lift_share("oracle", "gauc", "oracle", "random").value == 1.0
