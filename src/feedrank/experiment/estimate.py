"""Two-arm estimates with delta-method variances, optionally CUPED-adjusted.

Users are randomised, not impressions, so a user is the independent unit. A per-impression metric
such as CTR = sum(clicks) / sum(impressions) is a *ratio of two per-user means*, and its variance
must come from per-user sums: the delta method replaces each user by their linearised
contribution ``(num_u - R * den_u) / mean(den)``, whose plain sample variance divided by ``n`` is
the variance of ``R``. Treating impressions as independent instead understates the variance by the
*design effect* (often 1.5-5x for feeds, because a user's clicks are correlated), which makes a
test reject far more often than its alpha says.

A per-user mean metric (time spent per user) is the special case ``den = 1``; one code path serves
both. Arrays may carry leading batch axes (``(n_sims, n_users)``) so simulations stay vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

from feedrank.experiment.cuped import cuped_theta

#: Direction of a test on treatment minus control.
Alternative = Literal["two-sided", "larger", "smaller"]


def linearise(num: np.ndarray, den: np.ndarray | None = None, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The ratio ``R = sum(num) / sum(den)`` and each unit's delta-method contribution to it.

    ``scale`` multiplies the contributions for statistics whose weights are themselves estimated
    (a concentration index like HHI = sum(share^2) has gradient ``2 * share``, so scale 2).
    Returns ``(R, lin)`` with ``mean(lin) == 0`` and ``var(R) ~= var(lin) / n``.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=np.float64)
    if num.shape != den.shape:
        raise ValueError(f"numerator and denominator shapes differ: {num.shape} vs {den.shape}")
    if num.shape[-1] == 0:
        raise ValueError("no units to estimate from (empty arm)")
    if not (np.all(np.isfinite(num)) and np.all(np.isfinite(den))):
        raise ValueError("metric values contain NaN or infinity")
    mean_den = den.mean(axis=-1, keepdims=True)
    if np.any(mean_den == 0):
        raise ValueError("denominator sums to zero (no impressions): the ratio is undefined")
    ratio = num.sum(axis=-1, keepdims=True) / (mean_den * num.shape[-1])
    lin = scale * (num - ratio * den) / mean_den
    return ratio[..., 0], lin


def design_effect(num: np.ndarray, den: np.ndarray) -> float:
    """Clustered variance of a proportion over its naive binomial variance (>= 1 when users cluster).

    ``num``/``den`` are per-user clicks and impressions. The naive variance assumes every
    impression is an independent Bernoulli(R) trial; the true one comes from per-user sums.
    """
    ratio, lin = linearise(num, den)
    ratio = float(ratio)
    if not 0 < ratio < 1:
        raise ValueError(f"design effect needs a proportion strictly between 0 and 1, got {ratio}")
    if lin.shape[-1] < 2:
        raise ValueError("design effect needs at least 2 users")
    naive = ratio * (1 - ratio) / np.asarray(den, dtype=np.float64).mean()
    return float(lin.var(ddof=1) / naive)


@dataclass(frozen=True)
class ArmComparison:
    """Estimates for control and treatment and the variances of those estimates.

    Fields are floats for one experiment or arrays for a batch. ``variance_factor`` is the CUPED
    reduction actually achieved (1.0 without a covariate, ``cuped`` False).
    """

    control: np.ndarray
    treatment: np.ndarray
    var_control: np.ndarray
    var_treatment: np.ndarray
    n_control: int
    n_treatment: int
    variance_factor: np.ndarray
    cuped: bool = False

    @property
    def abs_lift(self) -> np.ndarray:
        return self.treatment - self.control

    @property
    def abs_se(self) -> np.ndarray:
        return np.sqrt(self.var_control + self.var_treatment)

    @property
    def rel_lift(self) -> np.ndarray:
        return self.treatment / self.control - 1.0

    @property
    def rel_se(self) -> np.ndarray:
        """Delta method for ``T / C``: var ~= var(T) / C^2 + T^2 var(C) / C^4 (arms independent)."""
        c, t = self.control, self.treatment
        return np.sqrt(self.var_treatment / c**2 + t**2 * self.var_control / c**4)

    def p_value(self, alternative: Alternative = "two-sided") -> np.ndarray:
        return z_p_value(self.abs_lift / self.abs_se, alternative)

    def abs_ci(self, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        half = stats.norm.isf(alpha / 2) * self.abs_se
        return self.abs_lift - half, self.abs_lift + half

    def rel_ci(self, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        half = stats.norm.isf(alpha / 2) * self.rel_se
        return self.rel_lift - half, self.rel_lift + half


def z_p_value(z: np.ndarray, alternative: Alternative = "two-sided") -> np.ndarray:
    """Normal p-value of a z statistic; ``larger`` tests treatment > control."""
    if alternative == "two-sided":
        return 2 * stats.norm.sf(np.abs(z))
    if alternative == "larger":
        return stats.norm.sf(z)
    if alternative == "smaller":
        return stats.norm.cdf(z)
    raise ValueError(f"alternative must be 'two-sided', 'larger' or 'smaller', got {alternative!r}")


Pair = tuple[np.ndarray, np.ndarray | None]


def compare_arms(
    control: Pair,
    treatment: Pair,
    pre_control: Pair | None = None,
    pre_treatment: Pair | None = None,
    scale: float = 1.0,
    name: str = "metric",
) -> ArmComparison:
    """Compare a (ratio or mean) metric between two arms of independent users.

    Each argument is ``(numerator, denominator)`` per user (denominator ``None`` for a per-user
    mean). With pre-period pairs, CUPED adjusts both arms with one ``theta`` fitted on the pooled,
    per-arm-centred linearised values, and shifts each arm's estimate by ``theta`` times its
    covariate's deviation from the pooled covariate (Deng et al. 2013, section 3.4 for ratios).
    Raises ``ValueError`` naming ``name`` for an empty arm or zero variance.
    """
    if (pre_control is None) != (pre_treatment is None):
        raise ValueError(f"{name}: pre-period covariate given for one arm only")
    try:
        r_c, lin_c = linearise(*control, scale=scale)
        r_t, lin_t = linearise(*treatment, scale=scale)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    n_c, n_t = lin_c.shape[-1], lin_t.shape[-1]
    if n_c < 2 or n_t < 2:
        raise ValueError(f"{name}: each arm needs at least 2 users, got control={n_c}, treatment={n_t}")
    raw_c = lin_c.var(axis=-1, ddof=1) / n_c
    raw_t = lin_t.var(axis=-1, ddof=1) / n_t
    if np.any(raw_c + raw_t <= 0):
        raise ValueError(f"{name}: zero variance in both arms; the metric cannot be tested")
    if pre_control is None:
        return ArmComparison(
            control=r_c,
            treatment=r_t,
            var_control=raw_c,
            var_treatment=raw_t,
            n_control=n_c,
            n_treatment=n_t,
            variance_factor=np.ones_like(raw_c),
        )

    try:
        x_c, xlin_c = linearise(*pre_control)
        x_t, xlin_t = linearise(*pre_treatment)
    except ValueError as exc:
        raise ValueError(f"{name} (pre-period covariate): {exc}") from exc
    if xlin_c.shape != lin_c.shape or xlin_t.shape != lin_t.shape:
        raise ValueError(f"{name}: pre-period covariate has a different number of users than the metric")
    # One theta for both arms: per-arm linearised values are already centred, so pooling them is
    # the least-squares fit of metric on covariate with arm-specific intercepts.
    theta = cuped_theta(np.concatenate([lin_c, lin_t], axis=-1), np.concatenate([xlin_c, xlin_t], axis=-1))
    pre_num = np.concatenate([np.asarray(pre_control[0]), np.asarray(pre_treatment[0])], axis=-1)
    pre_den = (
        None
        if pre_control[1] is None
        else np.concatenate([np.asarray(pre_control[1]), np.asarray(pre_treatment[1])], axis=-1)
    )
    x_pool, _ = linearise(pre_num, pre_den)
    th = np.expand_dims(theta, -1)
    var_c = (lin_c - th * xlin_c).var(axis=-1, ddof=1) / n_c
    var_t = (lin_t - th * xlin_t).var(axis=-1, ddof=1) / n_t
    return ArmComparison(
        control=r_c - theta * (x_c - x_pool),
        treatment=r_t - theta * (x_t - x_pool),
        var_control=var_c,
        var_treatment=var_t,
        n_control=n_c,
        n_treatment=n_t,
        variance_factor=(var_c + var_t) / (raw_c + raw_t),
        cuped=True,
    )
