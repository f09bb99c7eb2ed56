"""Online experiments: "is the new ranker better in production, and how long must the test run?"

Modules, one job each:

- ``params``: parsing ``"0.5%"``/``0.005`` and range checks.
- ``power``: sample size, MDE and duration (``Design``, ``MetricModel``).
- ``cuped``: variance reduction with a pre-period covariate.
- ``estimate``: two-arm comparison with delta-method variances (ratio metrics, relative lift) and CUPED.
- ``assignment``: salted-hash arm assignment and the sample-ratio-mismatch check.
- ``metrics``: metric definitions, guardrails, per-user sums from the event log.
- ``sequential``: always-valid p-values (mSPRT) for safe peeking.
- ``analyze``: the A/B analysis and its plain-language summary.
- ``rollout``: the staged plan (canary, experiment, ramp) with stopping rules.

Example::

    from feedrank.experiment import Design, build_plan, proportion_metric
    ctr = proportion_metric("ctr", 0.05, units_per_user=30, design_effect=2.0)
    print(build_plan(ctr, mde=0.02, daily_users=1e6, traffic=0.05).render_text())
"""

from feedrank.experiment.analyze import Analysis, analyze
from feedrank.experiment.assignment import assign, hash_unit, srm_check
from feedrank.experiment.metrics import METRICS, Guardrail, user_metrics, user_table_from_log
from feedrank.experiment.params import parse_fraction
from feedrank.experiment.power import (
    Design,
    MetricModel,
    duration_days,
    estimate_from_users,
    estimate_metric,
    mde_for_duration,
    minimum_detectable_effect,
    power,
    proportion_metric,
    sample_size,
)
from feedrank.experiment.rollout import RolloutConfig, RolloutPlan, build_plan
from feedrank.experiment.sequential import always_valid_p

__all__ = [
    "METRICS",
    "Analysis",
    "Design",
    "Guardrail",
    "MetricModel",
    "RolloutConfig",
    "RolloutPlan",
    "always_valid_p",
    "analyze",
    "assign",
    "build_plan",
    "duration_days",
    "estimate_from_users",
    "estimate_metric",
    "hash_unit",
    "mde_for_duration",
    "minimum_detectable_effect",
    "parse_fraction",
    "power",
    "proportion_metric",
    "sample_size",
    "srm_check",
    "user_metrics",
    "user_table_from_log",
]
