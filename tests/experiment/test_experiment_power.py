"""Power analysis against hand-computed values, statsmodels, and simulation."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from statsmodels.stats.power import NormalIndPower, zt_ind_solve_power
from statsmodels.stats.proportion import proportion_effectsize

from feedrank.experiment.cuped import cuped_adjust, cuped_theta, variance_factor
from feedrank.experiment.estimate import compare_arms, design_effect
from feedrank.experiment.params import parse_fraction
from feedrank.experiment.power import (
    Design,
    MetricModel,
    duration_days,
    estimate_metric,
    mde_for_duration,
    minimum_detectable_effect,
    power,
    proportion_metric,
    sample_size,
)


def test_sample_size_hand_computed():
    # sd 1, baseline 10, 1% lift -> delta 0.1; n = (1.959964 + 0.841621)^2 * 1 * 2 / 0.01 = 1569.78
    size = sample_size(MetricModel("m", 10.0, 1.0), 0.01)
    assert (size.n_control, size.n_treatment, size.total) == (1570, 1570, 3140)


@pytest.mark.parametrize("alternative, sm_alt", [("two-sided", "two-sided"), ("one-sided", "larger")])
@pytest.mark.parametrize("ratio", [1.0, 2.0, 0.5])
def test_sample_size_and_power_match_statsmodels(alternative, sm_alt, ratio):
    metric = MetricModel("time_spent", 120.0, 300.0)
    design = Design(alpha=0.05, power=0.8, alternative=alternative, ratio=ratio)
    effect_size = metric.absolute(0.02) / metric.sd
    n_sm = NormalIndPower().solve_power(effect_size=effect_size, alpha=0.05, power=0.8, ratio=ratio, alternative=sm_alt)
    size = sample_size(metric, 0.02, design)
    # The closed form drops the far rejection tail (~1e-6 of power, under a user here), then
    # rounds up: never smaller than statsmodels' exact solution, and at most 2 users larger.
    assert 0 <= size.n_control - n_sm < 2.0
    assert 0 <= size.n_treatment - ratio * n_sm < 2.0 * ratio + 1.0
    for n in (500, 5000, size.n_control):
        expected = NormalIndPower().power(effect_size=effect_size, nobs1=n, alpha=0.05, ratio=ratio, alternative=sm_alt)
        assert power(metric, 0.02, n, design) == pytest.approx(expected, rel=1e-9)
    assert power(metric, 0.02, size.n_control, design) >= 0.8


def test_zt_ind_solve_power_agrees_for_means():
    metric = MetricModel("m", 50.0, 20.0)
    n_sm = zt_ind_solve_power(effect_size=metric.absolute(0.05) / 20.0, alpha=0.01, power=0.9, ratio=1.0)
    assert sample_size(metric, 0.05, Design(alpha=0.01, power=0.9)).n_control == math.ceil(n_sm)


def test_proportion_close_to_statsmodels_arcsine_effect_size():
    # Cohen's h ~ delta / sqrt(p(1-p)) for small effects. The arcsine transform effectively
    # averages both arms' variances while we use the control variance for both: within 3%.
    p, lift = 0.05, 0.05
    h = proportion_effectsize(p * (1 + lift), p)
    n_sm = NormalIndPower().solve_power(effect_size=h, alpha=0.05, power=0.8, ratio=1.0)
    ours = sample_size(proportion_metric("ctr", p), lift).n_control
    assert ours == pytest.approx(n_sm, rel=0.03)


def test_mde_inverts_sample_size_and_duration():
    metric = MetricModel("m", 10.0, 4.0)
    design = Design(ratio=3.0)
    size = sample_size(metric, 0.03, design)
    effect = minimum_detectable_effect(metric, size.total, design)
    assert effect.relative == pytest.approx(0.03, rel=2e-3)
    assert effect.absolute == pytest.approx(0.3, rel=2e-3)
    # 1e6 daily users at 5% = 50,000/day
    assert duration_days(100_000, 1e6, 0.05) == 2
    assert duration_days(100_001, 1e6, 0.05) == 3
    by_days = mde_for_duration(metric, 2, 1e6, 0.05, design)
    assert by_days.relative == pytest.approx(minimum_detectable_effect(metric, 100_000, design).relative)


def test_unequal_arm_variances_hand_computed():
    # sd_c 1, sd_t 2, delta 0.1, equal split: n = 7.849 * (1 + 4) / 0.01 = 3924.4 per arm
    metric = MetricModel("m", 10.0, 1.0, sd_treatment=2.0)
    assert sample_size(metric, 0.01).n_control == 3925
    assert power(metric, 0.01, 3925) == pytest.approx(0.8, abs=1e-3)


def test_cuped_factor_shrinks_sample_size():
    base = MetricModel("m", 10.0, 4.0)
    reduced = MetricModel("m", 10.0, 4.0, variance_factor=0.6)
    assert sample_size(reduced, 0.02).n_control == pytest.approx(0.6 * sample_size(base, 0.02).n_control, abs=1)


def test_proportion_metric_variance_and_design_effect():
    m = proportion_metric("ctr", 0.1, units_per_user=9, design_effect=2.0)
    assert m.sd == pytest.approx(math.sqrt(0.1 * 0.9 * 2 / 9))
    assert m.design_effect == 2.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Design(alpha=0.0), "alpha"),
        (lambda: Design(alpha=1.0), "alpha"),
        (lambda: Design(power=1.0), "power"),
        (lambda: Design(ratio=0), "allocation ratio"),
        (lambda: MetricModel("m", 1.0, 0.0), "zero variance"),
        (lambda: sample_size(MetricModel("m", 1.0, 1.0), 0.0), "minimum detectable effect"),
        (lambda: sample_size(MetricModel("m", 1.0, 1.0), -0.01), "minimum detectable effect"),
        (lambda: sample_size(MetricModel("m", 0.0, 1.0), 0.01), "baseline is 0"),
        (lambda: duration_days(100, 1000, 0.0), "traffic"),
        (lambda: duration_days(100, 1000, 1.5), "traffic"),
        (lambda: proportion_metric("ctr", 1.2), "ctr baseline"),
        (lambda: estimate_metric("m", np.ones(10)), "zero variance"),
    ],
)
def test_bad_input_raises_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_parse_fraction():
    assert parse_fraction("0.5%") == pytest.approx(0.005)
    assert parse_fraction("0.005") == pytest.approx(0.005)
    assert parse_fraction(0.05) == 0.05
    assert parse_fraction(" 150% ") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="ambiguous"):
        parse_fraction("5", "--traffic")
    with pytest.raises(ValueError, match="--mde.*not a number"):
        parse_fraction("abc", "--mde")


def test_cuped_theta_and_variance_factor_known_correlation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=200_000)
    y = 2.0 * x + rng.normal(size=x.size)  # rho^2 = 4 / 5
    assert float(cuped_theta(y, x)) == pytest.approx(2.0, abs=0.01)
    assert float(variance_factor(y, x)) == pytest.approx(0.2, abs=0.005)
    adjusted = cuped_adjust(y, x)
    assert adjusted.mean() == pytest.approx(y.mean())  # the mean (and so the effect) is kept


def test_design_effect_beta_binomial_known_answer():
    # Beta(a, b) click propensity per user, k impressions each: ICC = 1 / (a + b + 1),
    # design effect = 1 + (k - 1) * ICC = 1 + 19 / 10 = 2.9.
    rng = np.random.default_rng(2)
    k = 20
    p = rng.beta(1.0, 8.0, 200_000)
    clicks = rng.binomial(k, p)
    assert design_effect(clicks, np.full(p.size, k)) == pytest.approx(2.9, rel=0.03)
    iid = rng.binomial(k, 0.1, 200_000)
    assert design_effect(iid, np.full(iid.size, k)) == pytest.approx(1.0, rel=0.03)


def _clustered_ctr(rng, shape, lift=0.0):
    """Per-user clicks/impressions: Poisson impressions, Beta propensities (clustered)."""
    impressions = rng.poisson(15, shape) + 1
    p = rng.beta(1.0, 12.0, shape) * (1 + lift)
    return rng.binomial(impressions, p).astype(float), impressions.astype(float)


def test_simulated_power_matches_for_clustered_ctr():
    """Plan from a pilot log, run many experiments at that size: rejection rate == stated power."""
    rng = np.random.default_rng(3)
    clicks, imps = _clustered_ctr(rng, 200_000)
    metric = estimate_metric("ctr", clicks, imps, proportion=True)
    assert metric.design_effect > 2  # clustering matters here
    lift, sims = 0.08, 1000
    # A multiplicative lift raises the treatment's per-user variance too: plan with both.
    sd_t = estimate_metric("ctr", *_clustered_ctr(rng, 200_000, lift)).sd
    metric = replace(metric, sd_treatment=sd_t)
    n = sample_size(metric, lift).n_control
    c = _clustered_ctr(rng, (sims, n))
    t = _clustered_ctr(rng, (sims, n), lift)
    rejected = compare_arms(c, t).p_value() < 0.05
    se = math.sqrt(0.8 * 0.2 / sims)
    assert abs(rejected.mean() - 0.8) < 3.5 * se
    # Planning as if impressions were independent gives far too few users and far less power.
    naive = proportion_metric("ctr", metric.baseline, units_per_user=float(imps.mean()))
    assert sample_size(naive, lift).n_control < n / 2


def test_simulated_power_with_cuped():
    """CUPED in planning (variance x (1 - rho^2)) and in analysis: power still as stated."""
    rng = np.random.default_rng(4)
    rho, sd, base = 0.7, 60.0, 100.0

    def users(shape, lift=0.0):
        x = rng.normal(size=shape)
        y = base * (1 + lift) + sd * (rho * x + math.sqrt(1 - rho**2) * rng.normal(size=shape))
        return y, base + sd * x

    y_hist, x_hist = users(200_000)
    metric = estimate_metric("time_spent", y_hist, pre_numerator=x_hist)
    assert metric.variance_factor == pytest.approx(1 - rho**2, abs=0.01)
    lift, sims = 0.03, 1000
    n = sample_size(metric, lift).n_control
    yc, xc = users((sims, n))
    yt, xt = users((sims, n), lift)
    cmp = compare_arms((yc, None), (yt, None), (xc, None), (xt, None))
    rejected = cmp.p_value() < 0.05
    assert abs(rejected.mean() - 0.8) < 3.5 * math.sqrt(0.8 * 0.2 / sims)
    assert np.mean(cmp.variance_factor) == pytest.approx(1 - rho**2, abs=0.02)
