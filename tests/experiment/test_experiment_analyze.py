"""A/B analysis: known answers for means, ratios (delta method), CUPED (= OLS), HHI; guardrails,
SRM, summaries, bad input; always-valid p-values under repeated peeking."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import statsmodels.api as sm
from scipy import stats

from feedrank.experiment.analyze import analyze
from feedrank.experiment.assignment import assign
from feedrank.experiment.estimate import compare_arms
from feedrank.experiment.metrics import Guardrail, user_metrics
from feedrank.experiment.sequential import always_valid_p, mixture_log_lr

ARMS = ["control", "treatment"]


def test_mean_metric_hand_computed():
    table = {
        "arm": ["control"] * 4 + ["treatment"] * 5,
        "dwell_s": [10, 20, 30, 40, 20, 30, 40, 50, 60],
    }
    r = analyze(table, ARMS, metrics=["time_spent"], guardrails=[]).metrics[0]
    # var(mean_c) = 166.67 / 4, var(mean_t) = 250 / 5; se = sqrt(91.667) = 9.574; z = 1.5667
    assert (r.control, r.treatment, r.abs_lift) == (25.0, 40.0, 15.0)
    se = math.sqrt(500 / 12 + 50)
    assert r.abs_ci[1] - r.abs_lift == pytest.approx(1.959964 * se, rel=1e-6)
    assert r.p_value == pytest.approx(2 * stats.norm.sf(15 / se), rel=1e-9)
    assert r.p_value == pytest.approx(0.1172, abs=1e-4)
    assert r.rel_lift == pytest.approx(0.6)
    rel_se = math.sqrt(50 / 25**2 + 40**2 * (500 / 12) / 25**4)  # 0.50067
    assert r.rel_ci[0] == pytest.approx(0.6 - 1.959964 * rel_se, rel=1e-6)
    assert not r.significant and not r.cuped


def test_ratio_metric_matches_textbook_delta_method():
    rng = np.random.default_rng(0)
    n = 3000
    imps = rng.poisson(10, 2 * n) + 1
    clicks = rng.binomial(imps, rng.beta(2, 20, 2 * n))
    arm = np.repeat(ARMS, n)
    r = analyze({"arm": arm, "clicks": clicks, "impressions": imps}, ARMS, metrics=["ctr"], guardrails=[]).metrics[0]

    def textbook(num, den):  # Var(sum num / sum den) = (s_n^2 - 2 R s_nd + R^2 s_d^2) / (n mu_d^2)
        ratio = num.sum() / den.sum()
        cov = np.cov(num, den, ddof=1)
        return ratio, (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio**2 * cov[1, 1]) / (num.size * den.mean() ** 2)

    rc, vc = textbook(clicks[:n], imps[:n])
    rt, vt = textbook(clicks[n:], imps[n:])
    assert r.control == pytest.approx(rc) and r.treatment == pytest.approx(rt)
    assert r.abs_ci[1] - r.abs_lift == pytest.approx(1.959964 * math.sqrt(vc + vt), rel=1e-6)


def test_cuped_equals_ols_with_arm_dummy_and_covariate():
    rng = np.random.default_rng(1)
    n = 4000
    x = rng.gamma(2.0, 30.0, 2 * n)
    treat = np.repeat([0.0, 1.0], n)
    y = 0.8 * x + rng.normal(0, 20, 2 * n) + 3.0 * treat
    table = {"arm": np.repeat(ARMS, n), "dwell_s": y, "pre_dwell_s": x}
    r = analyze(table, ARMS, metrics=["time_spent"], guardrails=[]).metrics[0]
    ols = sm.OLS(y, sm.add_constant(np.column_stack([treat, x]))).fit()
    assert r.cuped
    assert r.abs_lift == pytest.approx(ols.params[1], rel=1e-9)
    assert (r.abs_ci[1] - r.abs_lift) / 1.959964 == pytest.approx(ols.bse[1], rel=0.02)
    plain = analyze(table, ARMS, metrics=["time_spent"], guardrails=[], use_cuped=False).metrics[0]
    assert r.variance_factor == pytest.approx(1 - np.corrcoef(y[:n], x[:n])[0, 1] ** 2, abs=0.02)
    width_ratio = (r.abs_ci[1] - r.abs_ci[0]) / (plain.abs_ci[1] - plain.abs_ci[0])
    assert width_ratio == pytest.approx(math.sqrt(r.variance_factor), rel=0.01) and width_ratio < 0.6


def test_publisher_hhi_hand_computed_from_events():
    events = pa.table(
        {
            "user_id": ["a", "a", "b", "b", "c", "c", "d", "d"],
            "clicked": [True, False] * 4,
            "dwell_s": [5.0, 0.0] * 4,
            "hidden": [False] * 8,
            "publisher": ["P", "P", "Q", None, "P", "Q", "Q", "Q"],
        }
    )
    arm = np.array(["control"] * 4 + ["treatment"] * 4, dtype=object)
    users = user_metrics(events, arm)
    assert users["arm"].to_pylist() == ["control", "control", "treatment", "treatment"]
    # control: P,P,Q,(unknown) -> shares .5,.25,.25 -> HHI .375; treatment: P,Q,Q,Q -> .25^2 + .75^2 = .625
    cols = {c: users[c].to_numpy() for c in users.column_names}
    hhi_c = cols["publisher_share"][:2].sum() / cols["impressions"][:2].sum()
    hhi_t = cols["publisher_share"][2:].sum() / cols["impressions"][2:].sum()
    assert (hhi_c, hhi_t) == (pytest.approx(0.375), pytest.approx(0.625))
    with pytest.raises(ValueError, match="user 'a' appears in more than one arm"):
        user_metrics(events, np.array(["control", "treatment"] * 4, dtype=object))


def test_publisher_hhi_delta_method_se_matches_simulation():
    rng = np.random.default_rng(2)
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    n_users, sims = 300, 300
    estimates, ses = [], []
    for _ in range(sims):
        per_user = rng.integers(1, 10, 2 * n_users)
        u = np.repeat(np.arange(2 * n_users), per_user)
        loyal = rng.choice(4, 2 * n_users, p=shares)  # users stick to a publisher: clustering
        pub = np.where(rng.random(u.size) < 0.6, loyal[u], rng.choice(4, u.size, p=shares))
        events = pa.table(
            {
                "user_id": pa.array(u.astype(str)),
                "clicked": np.zeros(u.size, dtype=bool),
                "dwell_s": np.zeros(u.size),
                "hidden": np.zeros(u.size, dtype=bool),
                "publisher": pa.array(pub.astype(str)),
            }
        )
        arm = np.where(u < n_users, "control", "treatment").astype(object)
        r = analyze(user_metrics(events, arm), ARMS, metrics=["publisher_hhi"], guardrails=[]).metrics[0]
        estimates.append(r.abs_lift)
        ses.append((r.abs_ci[1] - r.abs_lift) / 1.959964)
    assert np.mean(ses) == pytest.approx(np.std(estimates), rel=0.15)


def _users(rng, n, ctr_lift=0.0, hide_lift=0.0, n_treatment=None):
    n_t = n if n_treatment is None else n_treatment
    imps = rng.poisson(20, n + n_t) + 1
    lift = np.r_[np.ones(n), np.full(n_t, 1 + ctr_lift)]
    clicks = rng.binomial(imps, np.clip(rng.beta(2, 30, n + n_t) * lift, 0, 1))
    hide = np.r_[np.full(n, 0.02), np.full(n_t, 0.02 * (1 + hide_lift))]
    return {
        "arm": np.r_[np.full(n, "control"), np.full(n_t, "treatment")],
        "impressions": imps,
        "clicks": clicks,
        "dwell_s": clicks * rng.exponential(30, n + n_t),
        "hides": rng.binomial(imps, hide),
        "publisher_share": imps * rng.uniform(0.2, 0.4, n + n_t),
    }


def test_summary_sentence_positive_effect_clean_experiment():
    a = analyze(_users(np.random.default_rng(3), 20_000, ctr_lift=0.05), ARMS)
    (sentence,) = a.summary()
    r = a.metrics[0]
    assert r.metric == "ctr" and r.significant and r.rel_lift > 0
    lo, hi = (f"{100 * v:+.1f}%" for v in r.rel_ci)
    p = "p<0.001" if r.p_value < 0.001 else f"p={r.p_value:.3f}"
    assert sentence == (
        f"Treatment raised CTR by {100 * r.rel_lift:.1f}% (95% CI {lo} to {hi}, {p}); "
        "no guardrail breached (1 not evaluated: latency_p99_ms); sample ratio OK."
    )
    assert {g.metric: g.verdict for g in a.guardrails} == {
        "hide_rate": "ok",
        "publisher_hhi": "ok",
        "latency_p99_ms": "not evaluated",
    }
    assert "Treatment raised CTR" in a.render_text()
    assert a.to_dict()["summary"] == [sentence]


def test_guardrail_breach_and_srm_are_reported():
    a = analyze(_users(np.random.default_rng(4), 20_000, hide_lift=0.3, n_treatment=21_000), ARMS)
    hide = next(g for g in a.guardrails if g.metric == "hide_rate")
    assert hide.verdict == "breached" and hide.rel_change == pytest.approx(0.3, abs=0.06)
    assert not a.srm.ok
    (sentence,) = a.summary()
    assert "did not significantly change CTR" in sentence
    assert "guardrail breached: hide rate +" in sentence and "(limit +5.0%)" in sentence
    assert "SAMPLE RATIO MISMATCH" in sentence


def test_guardrail_tolerance_is_respected():
    # +3% hide rate is within a 5% tolerance even when significantly above 0.
    users = _users(np.random.default_rng(5), 200_000, hide_lift=0.03)
    strict = analyze(users, ARMS, metrics=["ctr"], guardrails=[Guardrail("hide_rate", 0.0)]).guardrails[0]
    tolerant = analyze(users, ARMS, metrics=["ctr"], guardrails=[Guardrail("hide_rate", 0.05)]).guardrails[0]
    assert (strict.verdict, tolerant.verdict) == ("breached", "ok")


def test_arms_derived_from_salt_when_no_arm_column():
    rng = np.random.default_rng(6)
    ids = np.array([f"u{i}" for i in range(500)], dtype=object)
    table = {"user_id": ids, "dwell_s": rng.exponential(30, 500)}
    a = analyze(table, ARMS, metrics=["time_spent"], guardrails=[], salt="s9")
    expected = assign(ids, "s9", ARMS)
    assert a.users == {"control": int((expected == "control").sum()), "treatment": int((expected == "treatment").sum())}


@pytest.mark.parametrize(
    "table, kwargs, match",
    [
        ({"arm": ["control"] * 3, "dwell_s": [1.0, 2.0, 3.0]}, {}, r"arm\(s\) \['treatment'\] have no users"),
        ({"arm": ["control", "x", "treatment"], "dwell_s": [1.0, 2.0, 3.0]}, {}, r"arm\(s\) \['x'\] not among"),
        ({"dwell_s": [1.0, 2.0]}, {}, "no 'arm' column; pass salt="),
        (
            {"arm": ["control", "control", "treatment", "treatment"], "dwell_s": [5.0] * 4},
            {},
            "time_spent: zero variance",
        ),
        (
            {"arm": ["control", "treatment"] * 2, "dwell_s": [1.0, 2.0, 3.0, 4.0]},
            {"metrics": ["ctr"]},
            r"needs column\(s\) \['clicks', 'impressions'\]",
        ),
        ({"arm": ["control", "treatment"] * 2, "dwell_s": [1.0, 2.0, 3.0, np.nan]}, {}, "NaN"),
        (
            {"arm": ["control", "treatment"] * 2, "dwell_s": [1.0, 2.0, 3.0, 4.0]},
            {"control": "nope"},
            "control arm 'nope'",
        ),
        ({"arm": ["control", "treatment"] * 2, "dwell_s": [1.0, 2.0, 3.0, 4.0]}, {"alpha": 1.5}, "alpha"),
        (
            {"arm": ["control", "treatment"] * 2, "dwell_s": [1.0, 2.0, 3.0, 4.0]},
            {"metrics": ["revenue"]},
            "unknown metric 'revenue'",
        ),
    ],
)
def test_bad_input(table, kwargs, match):
    with pytest.raises(ValueError, match=match):
        analyze(table, ARMS, **{"metrics": ["time_spent"], "guardrails": [], **kwargs})


def test_unmeasurable_guardrail_does_not_sink_the_analysis():
    users = _users(np.random.default_rng(7), 1000)
    users["hides"] = np.zeros_like(users["hides"])
    g = analyze(users, ARMS, metrics=["ctr"], guardrails=[Guardrail("hide_rate", 0.05)]).guardrails[0]
    assert g.verdict == "not evaluated" and "zero variance" in g.note


def test_unknown_guardrail_metric_is_refused():
    with pytest.raises(ValueError, match="guardrail metric 'speed' unknown"):
        analyze(_users(np.random.default_rng(0), 100), ARMS, metrics=["ctr"], guardrails=[Guardrail("speed")])


def _peeking(rng, sims, looks, per_look, effect):
    """Cumulative difference-in-means and its variance at each look, for many experiments."""
    c = rng.normal(0.0, 1.0, (sims, looks, per_look)).sum(-1).cumsum(-1)
    t = rng.normal(effect, 1.0, (sims, looks, per_look)).sum(-1).cumsum(-1)
    n = per_look * np.arange(1, looks + 1)
    return (t - c) / n, 2.0 / n


def test_always_valid_p_keeps_false_positives_at_alpha_under_peeking():
    rng = np.random.default_rng(8)
    sims, looks = 4000, 20
    diff, var = _peeking(rng, sims, looks, 200, 0.0)
    naive = (2 * stats.norm.sf(np.abs(diff) / np.sqrt(var)) < 0.05).any(axis=1).mean()
    seq = (always_valid_p(diff, np.broadcast_to(var, diff.shape), tau=0.1)[:, -1] < 0.05).mean()
    se = math.sqrt(0.05 * 0.95 / sims)
    assert naive > 0.15  # peeking at fixed-horizon p-values: several times alpha
    assert seq < 0.05 + 3 * se
    # ... while real effects are still found.
    diff, var = _peeking(rng, 1000, looks, 200, 0.1)
    assert (always_valid_p(diff, np.broadcast_to(var, diff.shape), tau=0.1)[:, -1] < 0.05).mean() > 0.8


def test_always_valid_p_formula_and_monotonicity():
    # v = 1, tau = 1, d = 2: Lambda = sqrt(1/2) * exp(1 * 4 / (2 * 1 * 2)) = e / sqrt(2)
    assert float(mixture_log_lr(2.0, 1.0, 1.0)) == pytest.approx(1.0 - 0.5 * math.log(2))
    p = always_valid_p(np.array([2.0, 0.0, 3.0]), np.ones(3), 1.0)
    assert p[0] == pytest.approx(math.sqrt(2) / math.e) and p[1] == p[0] and p[2] < p[0]
    with pytest.raises(ValueError, match="zero variance"):
        always_valid_p(1.0, 0.0, 1.0)


def test_analyze_reports_always_valid_p():
    r = analyze(
        _users(np.random.default_rng(9), 20_000, ctr_lift=0.05),
        ARMS,
        metrics=["ctr"],
        guardrails=[],
        sequential_tau=0.05,
    ).metrics[0]
    assert r.always_valid_p is not None and r.p_value <= r.always_valid_p <= 1.0


def test_compare_arms_batches_along_leading_axis():
    rng = np.random.default_rng(10)
    yc, yt = rng.normal(size=(3, 50)), rng.normal(size=(3, 60))
    batch = compare_arms((yc, None), (yt, None))
    for i in range(3):
        one = compare_arms((yc[i], None), (yt[i], None))
        assert batch.p_value()[i] == pytest.approx(float(one.p_value()))
