"""Power analysis: how many users, how many days, and what effect a test can see.

Everything is per randomisation unit, the user. A metric enters as a ``MetricModel``: its control
mean and the standard deviation of one user's contribution (for a ratio metric like CTR, the
delta-method linearised contribution; see ``feedrank.experiment.estimate``), optionally shrunk by
CUPED's ``1 - rho^2``. The test is the two-sample z-test on the difference of means, the same one
``analyze`` runs, so the numbers here describe that analysis:

    n_control = (z_alpha + z_power)^2 * sd^2 * (1 + 1/ratio) / delta^2,   n_treatment = ratio * n_control

(with ``sd_t^2 / ratio`` in place of ``sd^2 / ratio`` when the treatment variance differs)

with ``z_alpha`` the (1 - alpha/2) quantile for a two-sided test and (1 - alpha) for one-sided.
The closed form ignores the far rejection tail of a two-sided test (below 1e-5 at usual settings),
so the power at the returned size is never below the target. ``power()`` includes both tails and
equals ``statsmodels.stats.power.NormalIndPower``.

Users per day: ``daily_users`` is the number of distinct users newly eligible each day (for a
window of many days, pass the distinct-user count of the window divided by its length: returning
users do not add sample). ``traffic`` is the share of them in the experiment, split between the
arms by ``ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from scipy import stats

from feedrank.experiment.cuped import variance_factor as cuped_variance_factor
from feedrank.experiment.estimate import design_effect as estimate_design_effect
from feedrank.experiment.estimate import linearise
from feedrank.experiment.metrics import get_metric
from feedrank.experiment.params import check_open_unit, check_positive, check_share


@dataclass(frozen=True)
class Design:
    """Test settings. ``ratio`` is treatment users per control user (1.0 = equal split)."""

    alpha: float = 0.05
    power: float = 0.8
    alternative: Literal["two-sided", "one-sided"] = "two-sided"
    ratio: float = 1.0

    def validate(self) -> None:
        check_open_unit(self.alpha, "alpha")
        check_open_unit(self.power, "power")
        check_positive(self.ratio, "allocation ratio")
        if self.alternative not in ("two-sided", "one-sided"):
            raise ValueError(f"alternative must be 'two-sided' or 'one-sided', got {self.alternative!r}")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def z_alpha(self) -> float:
        return float(stats.norm.isf(self.alpha / 2 if self.alternative == "two-sided" else self.alpha))

    @property
    def z_power(self) -> float:
        return float(stats.norm.ppf(self.power))


@dataclass(frozen=True)
class MetricModel:
    """A metric as the power analysis sees it: control mean and per-user standard deviation.

    ``variance_factor`` is CUPED's ``1 - rho^2`` (1.0 without a covariate); ``design_effect`` is
    recorded for reporting (clustered over naive binomial variance), already included in ``sd``.
    ``sd_treatment`` is the per-user sd under the alternative; ``None`` assumes it equals ``sd``,
    the usual assumption (and statsmodels'). It matters for large multiplicative lifts: a CTR
    lifted 8% by scaling every user's propensity has ~8% more per-user variance, which costs
    about 4 points of power at a planned 80% if ignored.
    """

    name: str
    baseline: float
    sd: float
    variance_factor: float = 1.0
    design_effect: float = 1.0
    sd_treatment: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.baseline):
            raise ValueError(f"{self.name}: baseline must be finite, got {self.baseline!r}")
        if not (math.isfinite(self.sd) and self.sd > 0):
            raise ValueError(
                f"{self.name}: standard deviation must be positive (zero variance cannot be tested), got {self.sd!r}"
            )
        if self.sd_treatment is not None and not (math.isfinite(self.sd_treatment) and self.sd_treatment > 0):
            raise ValueError(f"{self.name}: treatment standard deviation must be positive, got {self.sd_treatment!r}")
        if not 0 < self.variance_factor <= 1:
            raise ValueError(f"{self.name}: CUPED variance factor must be in (0, 1], got {self.variance_factor!r}")

    @property
    def effective_sd(self) -> float:
        return self.sd * math.sqrt(self.variance_factor)

    def se_of_difference(self, n_control: float, n_treatment: float) -> float:
        """Standard error of treatment minus control means with these arm sizes (after CUPED)."""
        sd_t = self.sd if self.sd_treatment is None else self.sd_treatment
        return math.sqrt(self.variance_factor * (self.sd**2 / n_control + sd_t**2 / n_treatment))

    def absolute(self, relative_effect: float) -> float:
        """A relative effect (0.005 = +0.5%) in the metric's units."""
        check_positive(relative_effect, "minimum detectable effect")
        if self.baseline == 0:
            raise ValueError(f"{self.name}: baseline is 0, so a relative effect is undefined")
        return relative_effect * abs(self.baseline)


def proportion_metric(name: str, p: float, units_per_user: float = 1.0, design_effect: float = 1.0) -> MetricModel:
    """A proportion such as CTR when only its level is known.

    Per impression the variance is ``p (1 - p)``; a user with ``units_per_user`` impressions
    contributes ``p (1 - p) / units_per_user`` to the linearised variance if impressions were
    independent, times ``design_effect`` because they are not (estimate it from a log with
    ``estimate_metric(..., proportion=True)``).
    """
    check_open_unit(p, f"{name} baseline")
    check_positive(units_per_user, "impressions per user")
    if not (math.isfinite(design_effect) and design_effect > 0):
        raise ValueError(f"design effect must be positive, got {design_effect!r}")
    sd = math.sqrt(p * (1 - p) * design_effect / units_per_user)
    return MetricModel(name, p, sd, design_effect=design_effect)


def estimate_metric(
    name: str,
    numerator: np.ndarray,
    denominator: np.ndarray | None = None,
    pre_numerator: np.ndarray | None = None,
    pre_denominator: np.ndarray | None = None,
    proportion: bool = False,
) -> MetricModel:
    """Estimate a ``MetricModel`` from per-user sums of a historical (pre-experiment) log.

    ``denominator`` None means a per-user mean (time spent per user); given, a ratio (clicks /
    impressions) whose sd comes from the delta method. Pre-period arrays, aligned by user, give the
    CUPED variance factor. ``proportion=True`` also records the design effect.
    """
    ratio, lin = linearise(numerator, denominator)
    if lin.shape[-1] < 2:
        raise ValueError(f"{name}: need at least 2 users to estimate a variance")
    sd = float(lin.std(ddof=1))
    if sd == 0:
        raise ValueError(f"{name}: zero variance across users; the metric cannot be tested")
    factor = 1.0
    if pre_numerator is not None:
        _, pre_lin = linearise(pre_numerator, pre_denominator)
        factor = float(cuped_variance_factor(lin, pre_lin))
    deff = estimate_design_effect(numerator, denominator) if proportion else 1.0
    return MetricModel(name, float(ratio), sd, variance_factor=factor, design_effect=deff)


def estimate_from_users(users: pa.Table | Mapping[str, np.ndarray], name: str) -> MetricModel:
    """``estimate_metric`` for a named metric (``metrics.METRICS``) on a per-user table.

    Uses the ``pre_*`` columns for CUPED when the table has them; records the design effect for
    impression-level proportions (CTR, hide rate).
    """
    metric = get_metric(name)
    if metric.scale != 1.0:
        raise ValueError(f"{name}: power analysis is not supported for this statistic")
    cols = {c: np.asarray(users[c]) for c in (users.column_names if isinstance(users, pa.Table) else users)}
    missing = [c for c in metric.columns if c not in cols]
    if missing:
        raise ValueError(f"metric {name!r} needs column(s) {missing}, not in the per-user table")
    pre = [f"pre_{c}" for c in metric.columns]
    has_pre = all(c in cols for c in pre)
    return estimate_metric(
        name,
        cols[metric.numerator],
        cols.get(metric.denominator),
        cols[pre[0]] if has_pre else None,
        cols[pre[1]] if has_pre and metric.denominator else None,
        proportion=metric.denominator == "impressions",
    )


@dataclass(frozen=True)
class SampleSize:
    n_control: int
    n_treatment: int

    @property
    def total(self) -> int:
        return self.n_control + self.n_treatment


@dataclass(frozen=True)
class Effect:
    absolute: float
    relative: float


def sample_size(metric: MetricModel, mde: float, design: Design = Design()) -> SampleSize:
    """Users per arm to detect a relative lift ``mde`` (0.005 = +0.5%) with ``design.power``."""
    delta = metric.absolute(mde)
    # se_of_difference(1, ratio) is the se of a difference with one control user (and ratio treatment users)
    n_c = ((design.z_alpha + design.z_power) * metric.se_of_difference(1.0, design.ratio) / delta) ** 2
    return SampleSize(math.ceil(n_c), math.ceil(n_c * design.ratio))


def power(metric: MetricModel, mde: float, n_control: int, design: Design = Design()) -> float:
    """Probability of rejecting at a true relative lift ``mde`` with ``n_control`` control users.

    Both rejection tails count for a two-sided test, as in statsmodels' ``NormalIndPower``.
    """
    check_positive(n_control, "n_control")
    delta = metric.absolute(mde)
    shift = delta / metric.se_of_difference(n_control, n_control * design.ratio)
    p = stats.norm.sf(design.z_alpha - shift)
    if design.alternative == "two-sided":
        p += stats.norm.cdf(-design.z_alpha - shift)
    return float(p)


def minimum_detectable_effect(metric: MetricModel, n_total: float, design: Design = Design()) -> Effect:
    """The smallest true lift detected with ``design.power`` when ``n_total`` users are split by ratio."""
    check_positive(n_total, "number of users")
    n_c = n_total / (1 + design.ratio)
    n_t = n_total - n_c
    delta = (design.z_alpha + design.z_power) * metric.se_of_difference(n_c, n_t)
    relative = delta / abs(metric.baseline) if metric.baseline else math.inf
    return Effect(delta, relative)


def users_per_day(daily_users: float, traffic: float) -> float:
    check_positive(daily_users, "daily users")
    return daily_users * check_share(traffic)


def duration_days(n_total: int, daily_users: float, traffic: float) -> int:
    """Whole days until ``n_total`` users have entered at ``traffic`` share of ``daily_users``."""
    check_positive(n_total, "number of users")
    return math.ceil(n_total / users_per_day(daily_users, traffic))


def mde_for_duration(
    metric: MetricModel, days: float, daily_users: float, traffic: float, design: Design = Design()
) -> Effect:
    """The MDE reachable after ``days`` at ``traffic`` share of ``daily_users``."""
    check_positive(days, "days")
    return minimum_detectable_effect(metric, days * users_per_day(daily_users, traffic), design)
