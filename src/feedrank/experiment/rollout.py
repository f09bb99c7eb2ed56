"""The staged rollout plan: canary, powered experiment, ramp; guardrails and stopping rules.

The plan answers "how long must the test run" with the power analysis and wraps it in the stages
a production launch goes through:

1. **canary**: a tiny share (0.1%) for a day. Not powered for any effect; it catches crashes,
   serving errors, latency regressions and absurd metric values before many users see them.
2. **experiment**: ``traffic`` share split between the arms for the computed number of days,
   rounded up to whole weeks (weekday and weekend users behave differently; a test that covers
   four weekdays and no weekend estimates a different population).
3. **ramp**: after a positive decision, 25% -> 50% -> 100%, watching guardrails at each step
   (some harms, such as load on publishers or caches, only appear at scale).

Stopping rules: stop for harm at any look when a guardrail's one-sided test fails; stop and debug
on a sample ratio mismatch; declare success only at the planned horizon, unless sequential
testing (always-valid p-values, ``feedrank.experiment.sequential``) is switched on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from feedrank.experiment.assignment import SRM_THRESHOLD
from feedrank.experiment.metrics import DEFAULT_GUARDRAILS, Guardrail
from feedrank.experiment.params import check_positive, check_share
from feedrank.experiment.power import (
    Design,
    Effect,
    MetricModel,
    SampleSize,
    duration_days,
    mde_for_duration,
    sample_size,
)


@dataclass
class RolloutConfig:
    """Stage and guardrail settings (YAML section ``rollout``; see configs/experiment_demo.yaml).

    Validated by ``from_dict``/``load_yaml`` (errors carry the key path) and again by ``build_plan``.
    """

    canary_traffic: float = 0.001
    canary_hours: float = 24.0
    ramp: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    ramp_hours: float = 24.0
    whole_weeks: bool = True
    max_days: int = 56
    mde_report_days: list[int] = field(default_factory=lambda: [7, 14, 21, 28])
    sequential: bool = False
    guardrails: list[Guardrail] = field(default_factory=lambda: list(DEFAULT_GUARDRAILS))

    def validate(self) -> None:
        check_share(self.canary_traffic, "canary_traffic")
        check_positive(self.canary_hours, "canary_hours")
        check_positive(self.ramp_hours, "ramp_hours")
        check_positive(self.max_days, "max_days")
        if not self.ramp:
            raise ValueError("ramp: needs at least one stage (the last one is normally 100%)")
        for i, share in enumerate(self.ramp):
            check_share(share, f"ramp[{i}]")
        if any(b <= a for a, b in zip(self.ramp, self.ramp[1:], strict=False)):
            raise ValueError(f"ramp: shares must increase, got {self.ramp}")
        for d in self.mde_report_days:
            check_positive(d, "mde_report_days")
        for g in self.guardrails:
            g.validate()


@dataclass(frozen=True)
class Stage:
    name: str
    traffic: float
    hours: float
    purpose: str
    watch: list[str]
    exit: str


@dataclass(frozen=True)
class StopRule:
    kind: Literal["harm", "srm", "success", "horizon"]
    rule: str


@dataclass(frozen=True)
class RolloutPlan:
    metric: MetricModel
    design: Design
    mde: Effect
    sample: SampleSize
    daily_users: float
    traffic: float
    days_needed: int
    days: int
    mde_by_days: dict[int, Effect]
    stages: list[Stage]
    guardrails: list[Guardrail]
    stopping_rules: list[StopRule]
    warnings: list[str]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sample"]["total"] = self.sample.total
        out["metric"]["effective_sd"] = self.metric.effective_sd
        return out

    def render_text(self) -> str:
        m, d, s = self.metric, self.design, self.sample
        arm_t = self.traffic * d.ratio / (1 + d.ratio)
        lines = [
            f"Metric: {m.name}  baseline {m.baseline:.6g}  sd/user {m.sd:.6g}"
            + (f"  CUPED variance x{m.variance_factor:.2f}" if m.variance_factor < 1 else "")
            + (f"  design effect {m.design_effect:.2f}" if m.design_effect != 1 else ""),
            f"Test: {d.alternative}, alpha {d.alpha:g}, power {d.power:g}, "
            f"allocation treatment:control = {d.ratio:g}:1",
            f"MDE: {100 * self.mde.relative:.2f}% relative = {self.mde.absolute:.6g} absolute",
            f"Sample: {s.n_control:,} control + {s.n_treatment:,} treatment = {s.total:,} users",
            f"Traffic: {100 * self.traffic:g}% of {self.daily_users:,.0f} daily users "
            f"= {self.daily_users * self.traffic:,.0f} users/day "
            f"-> {self.days_needed} days needed, {self.days} planned",
            "MDE by duration: " + ", ".join(f"{k}d {100 * e.relative:.2f}%" for k, e in self.mde_by_days.items()),
            "",
            "Stages:",
        ]
        for i, st in enumerate(self.stages, 1):
            dur = f"{st.hours / 24:g} days" if st.hours >= 48 else f"{st.hours:g} h"
            share = f"{100 * st.traffic:g}%"
            if st.name == "experiment":
                share += f" ({100 * (st.traffic - arm_t):g}% control, {100 * arm_t:g}% treatment)"
            lines += [
                f"  {i}. {st.name:<11} {share} for {dur}: {st.purpose}",
                f"     watch: {', '.join(st.watch)}",
                f"     exit:  {st.exit}",
            ]
        lines += ["", "Guardrails (stop for harm if the one-sided test fails):"]
        lines += [
            f"  - {g.label}: may worsen by at most {100 * g.max_harm:g}% (alpha {g.alpha:g})" for g in self.guardrails
        ]
        lines += ["", "Stopping rules:"]
        lines += [f"  - [{r.kind}] {r.rule}" for r in self.stopping_rules]
        if self.warnings:
            lines += ["", "Warnings:"] + [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)


def build_plan(
    metric: MetricModel,
    mde: float,
    daily_users: float,
    traffic: float,
    design: Design = Design(),
    config: RolloutConfig | None = None,
) -> RolloutPlan:
    """The staged plan to detect a relative lift ``mde`` on ``metric`` at ``traffic`` share."""
    config = RolloutConfig() if config is None else config
    config.validate()
    check_share(traffic, "traffic")
    sample = sample_size(metric, mde, design)
    needed = duration_days(sample.total, daily_users, traffic)
    days = 7 * math.ceil(needed / 7) if config.whole_weeks else needed
    warnings = []
    if days > config.max_days:
        warnings.append(
            f"needs {days} days (> {config.max_days}): raise traffic, accept a larger MDE, or reduce variance (CUPED)"
        )
    if config.canary_traffic >= traffic:
        warnings.append(f"canary share {config.canary_traffic:g} is not below the experiment share {traffic:g}")
    watch_ops = [g.label for g in config.guardrails]
    stages = [
        Stage(
            "canary",
            config.canary_traffic,
            config.canary_hours,
            "catch crashes and broken serving before many users see them (not powered for effects)",
            ["serving errors", *watch_ops, f"{metric.name} sanity (same order of magnitude as control)"],
            "no serving-error or latency regression, no guardrail breach, metric values plausible",
        ),
        Stage(
            "experiment",
            traffic,
            24.0 * days,
            f"powered test: {100 * design.power:g}% power for a {100 * mde:g}% lift in {metric.name}",
            [metric.name, *watch_ops, "sample ratio (SRM)"],
            "decision at day {days}{seq}".format(
                days=days, seq=" or earlier on an always-valid p < alpha" if config.sequential else ""
            ),
        ),
    ]
    stages += [
        Stage(
            f"ramp {100 * share:g}%",
            share,
            config.ramp_hours,
            "confirm at scale after a positive decision" if share < 1 else "full launch",
            watch_ops,
            "no guardrail breach" if share < 1 else "experiment closed; keep a small holdback if effects may drift",
        )
        for share in config.ramp
        if share > traffic
    ]
    rules = [
        *[
            StopRule(
                "harm",
                f"stop at any look if {g.label} is worse by more than {100 * g.max_harm:g}% "
                f"(one-sided p < {g.alpha:g})",
            )
            for g in config.guardrails
        ],
        StopRule("srm", f"stop and debug assignment/logging if the sample-ratio chi-square p < {SRM_THRESHOLD:g}"),
        StopRule(
            "success",
            f"ship if the always-valid (mSPRT) p-value of {metric.name} < {design.alpha:g} at any daily look"
            if config.sequential
            else f"decide only at day {days}: ship if {metric.name} p < {design.alpha:g} and no guardrail breached "
            "(peeking at the fixed-horizon p-value inflates false positives)",
        ),
        StopRule(
            "horizon",
            f"at day {days} without significance: do not ship; any true effect is likely below the {100 * mde:g}% MDE",
        ),
    ]
    return RolloutPlan(
        metric=metric,
        design=design,
        mde=Effect(metric.absolute(mde), mde),
        sample=sample,
        daily_users=daily_users,
        traffic=traffic,
        days_needed=needed,
        days=days,
        mde_by_days={d: mde_for_duration(metric, d, daily_users, traffic, design) for d in config.mde_report_days},
        stages=stages,
        guardrails=list(config.guardrails),
        stopping_rules=rules,
        warnings=warnings,
    )
