"""A/B analysis: per-metric lifts with confidence intervals, guardrail verdicts, SRM, a summary.

``analyze`` takes an in-memory per-user table (a ``pyarrow.Table`` or a mapping of column name to
array; see ``feedrank.experiment.metrics`` for the columns) so that the log CLI and a simulated
A/B call the same function; ``feedrank.experiment.metrics.user_table_from_log`` builds that
table from a canonical log.

Per metric and treatment arm: control and treatment values, absolute and relative lift, two-sided
confidence intervals (delta method for ratio metrics and for the relative lift), the p-value, and
CUPED-adjusted numbers when ``pre_*`` columns are present. Guardrails are one-sided harm tests
(see ``Guardrail``). The SRM check runs first and its verdict is part of every summary, because a
mismatch invalidates every other number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from scipy import stats

from feedrank.experiment.assignment import SRMCheck, assign, srm_check
from feedrank.experiment.estimate import ArmComparison, compare_arms
from feedrank.experiment.metrics import DEFAULT_GUARDRAILS, METRICS, Guardrail, Metric, get_metric
from feedrank.experiment.params import check_open_unit, check_positive
from feedrank.experiment.sequential import always_valid_p

Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class MetricResult:
    metric: str
    label: str
    arm: str
    control: float
    treatment: float
    abs_lift: float
    abs_ci: tuple[float, float]
    rel_lift: float
    rel_ci: tuple[float, float]
    p_value: float
    significant: bool
    cuped: bool
    variance_factor: float
    always_valid_p: float | None = None


@dataclass(frozen=True)
class GuardrailResult:
    metric: str
    label: str
    arm: str
    verdict: Literal["ok", "breached", "not evaluated"]
    max_harm: float
    rel_change: float | None = None
    harm_p_value: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Analysis:
    arms: list[str]
    control: str
    alpha: float
    users: dict[str, int]
    srm: SRMCheck
    metrics: list[MetricResult]
    guardrails: list[GuardrailResult] = field(default_factory=list)

    def summary(self) -> list[str]:
        """One plain-language sentence per treatment arm, on the first (primary) metric."""
        sentences = []
        for arm in self.arms:
            if arm == self.control:
                continue
            primary = next(r for r in self.metrics if r.arm == arm)
            sentences.append(
                f"{_effect_clause(primary, self.alpha)}; {self._guardrail_clause(arm)}; {self._srm_clause()}."
            )
        return sentences

    def _guardrail_clause(self, arm: str) -> str:
        rows = [g for g in self.guardrails if g.arm == arm]
        breached = [g for g in rows if g.verdict == "breached"]
        unchecked = [g.metric for g in rows if g.verdict == "not evaluated"]
        if breached:
            text = "guardrail breached: " + ", ".join(
                f"{g.label} {_pct(g.rel_change, signed=True)} (limit {_pct(g.max_harm, signed=True)})" for g in breached
            )
        else:
            text = "no guardrail breached"
        if unchecked:
            text += f" ({len(unchecked)} not evaluated: {', '.join(unchecked)})"
        return text

    def _srm_clause(self) -> str:
        if self.srm.ok:
            return "sample ratio OK"
        return f"SAMPLE RATIO MISMATCH (p={self.srm.p_value:.2g}): results are not trustworthy"

    def to_dict(self) -> dict:
        return {
            "arms": self.arms,
            "control": self.control,
            "alpha": self.alpha,
            "users": self.users,
            "srm": self.srm.to_dict(),
            "metrics": [asdict(r) for r in self.metrics],
            "guardrails": [asdict(g) for g in self.guardrails],
            "summary": self.summary(),
        }

    def render_text(self) -> str:
        level = f"{100 * (1 - self.alpha):g}%"
        lines = ["Users: " + ", ".join(f"{a}={n:,}" for a, n in self.users.items()), ""]
        header = (
            f"{'metric':<32}{'arm':<12}{'control':>12}{'treatment':>12}{'lift':>9}  {level + ' CI':<20}{'p':>8}  notes"
        )
        lines += [header, "-" * len(header)]
        for r in self.metrics:
            notes = []
            if r.cuped:
                notes.append(f"CUPED, variance x{r.variance_factor:.2f}")
            if r.always_valid_p is not None:
                notes.append(f"always-valid p={_p(r.always_valid_p)}")
            ci = f"{_pct(r.rel_ci[0], signed=True)} .. {_pct(r.rel_ci[1], signed=True)}"
            lines.append(
                f"{r.label:<32}{r.arm:<12}{r.control:>12.5g}{r.treatment:>12.5g}{_pct(r.rel_lift, signed=True):>9}  "
                f"{ci:<20}{_p(r.p_value):>8}  {'; '.join(notes)}"
            )
        if self.guardrails:
            lines += ["", "Guardrails (one-sided harm tests):"]
            for g in self.guardrails:
                detail = (
                    f"change {_pct(g.rel_change, signed=True)}, limit {_pct(g.max_harm, signed=True)}, "
                    f"p(harm)={_p(g.harm_p_value)}"
                    if g.rel_change is not None
                    else g.note
                )
                lines.append(f"  {g.label:<32}{g.arm:<12}{g.verdict.upper():<15}{detail}")
        s = self.srm
        lines += [
            "",
            f"Sample ratio: observed {s.observed}, expected {[round(e) for e in s.expected]}, "
            f"chi2={s.chi2:.2f}, p={s.p_value:.3g} -> {'OK' if s.ok else 'MISMATCH'}",
            "",
            *self.summary(),
        ]
        return "\n".join(lines)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if signed else f"{100 * abs(x):.1f}%"


def _p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _effect_clause(r: MetricResult, alpha: float) -> str:
    level = f"{100 * (1 - alpha):g}%"
    ci = f"{level} CI {_pct(r.rel_ci[0], signed=True)} to {_pct(r.rel_ci[1], signed=True)}"
    p = _p(r.p_value)
    p_text = f"p{p}" if p.startswith("<") else f"p={p}"
    who = r.arm[:1].upper() + r.arm[1:]
    if not r.significant:
        return f"{who} did not significantly change {r.label} ({_pct(r.rel_lift, signed=True)}, {ci}, {p_text})"
    verb = "raised" if r.rel_lift > 0 else "lowered"
    return f"{who} {verb} {r.label} by {_pct(r.rel_lift)} ({ci}, {p_text})"


def _as_columns(users: pa.Table | Mapping[str, Sequence]) -> Columns:
    if isinstance(users, pa.Table):
        cols = {name: users[name].to_numpy() for name in users.column_names}
    elif isinstance(users, Mapping):
        cols = {name: np.asarray(values) for name, values in users.items()}
    else:
        raise TypeError(f"expected a pyarrow.Table or a mapping of columns, got {type(users).__name__}")
    lengths = {name: len(v) for name, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    return cols


def _pair(
    cols: Columns, mask: np.ndarray, numerator: str, denominator: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    return cols[numerator][mask], (None if denominator is None else cols[denominator][mask])


def _compare(
    cols: Columns, metric: Metric, control: np.ndarray, treatment: np.ndarray, use_cuped: bool
) -> ArmComparison:
    missing = [c for c in metric.columns if c not in cols]
    if missing:
        raise ValueError(f"metric {metric.name!r} needs column(s) {missing}, not in the per-user table")
    pre = [f"pre_{c}" for c in metric.columns]
    have_pre = use_cuped and all(c in cols for c in pre)
    pre_den = pre[1] if metric.denominator is not None else None
    return compare_arms(
        _pair(cols, control, metric.numerator, metric.denominator),
        _pair(cols, treatment, metric.numerator, metric.denominator),
        _pair(cols, control, pre[0], pre_den) if have_pre else None,
        _pair(cols, treatment, pre[0], pre_den) if have_pre else None,
        scale=metric.scale,
        name=metric.name,
    )


def analyze(
    users: pa.Table | Mapping[str, Sequence],
    arms: Sequence[str],
    metrics: Sequence[str] = ("ctr", "time_spent"),
    control: str | None = None,
    alpha: float = 0.05,
    guardrails: Sequence[Guardrail] = DEFAULT_GUARDRAILS,
    weights: Sequence[float] | None = None,
    salt: str | None = None,
    use_cuped: bool = True,
    sequential_tau: float | None = None,
) -> Analysis:
    """Analyse an experiment from a per-user table.

    The arm of each user comes from an ``arm`` column, or, when absent, from hashing ``user_id``
    with ``salt`` (same rule as ``assign``). ``control`` defaults to ``arms[0]``; every other arm
    is compared to it. ``weights`` are the planned split, used by the SRM check. With
    ``sequential_tau`` (relative, e.g. 0.02 = effects of about 2%), each metric also gets an
    always-valid mSPRT p-value, valid however often the analysis is re-run.
    """
    check_open_unit(alpha, "alpha")
    if sequential_tau is not None:
        check_positive(sequential_tau, "sequential_tau")
    for g in guardrails:
        g.validate()
    cols = _as_columns(users)
    arms = list(arms)
    control = arms[0] if control is None else control
    if control not in arms:
        raise ValueError(f"control arm {control!r} is not one of the arms {arms}")
    if "arm" in cols:
        arm_of_user = cols["arm"].astype(str)
    elif salt is not None:
        if "user_id" not in cols:
            raise ValueError("cannot derive arms: the table has neither an 'arm' nor a 'user_id' column")
        arm_of_user = assign(cols["user_id"], salt, arms, weights).astype(str)
    else:
        raise ValueError("the table has no 'arm' column; pass salt= to assign arms from user_id")
    unknown = sorted({str(a) for a in np.unique(arm_of_user)} - set(arms))
    if unknown:
        raise ValueError(f"the table has users in arm(s) {unknown} not among the arms {arms}")
    masks = {a: arm_of_user == a for a in arms}
    counts = {a: int(m.sum()) for a, m in masks.items()}
    empty = [a for a, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"arm(s) {empty} have no users in the table (arms present: {[a for a in arms if counts[a]]})")
    srm = srm_check([counts[a] for a in arms], arms, weights)
    metric_defs = [get_metric(m) for m in metrics]
    if not metric_defs:
        raise ValueError("no metrics to analyse")

    results: list[MetricResult] = []
    checks: list[GuardrailResult] = []
    for arm in (a for a in arms if a != control):
        for metric in metric_defs:
            cmp = _compare(cols, metric, masks[control], masks[arm], use_cuped)
            results.append(_metric_result(metric, arm, cmp, alpha, sequential_tau))
        checks += [_guardrail_result(g, arm, cols, masks[control], masks[arm], use_cuped) for g in guardrails]
    return Analysis(arms, control, alpha, counts, srm, results, checks)


def _metric_result(metric: Metric, arm: str, cmp: ArmComparison, alpha: float, tau: float | None) -> MetricResult:
    lo, hi = cmp.abs_ci(alpha)
    rlo, rhi = cmp.rel_ci(alpha)
    p = float(cmp.p_value())
    avp = None
    if tau is not None:
        avp = float(always_valid_p(cmp.abs_lift, cmp.abs_se**2, tau * abs(float(cmp.control)))[-1])
    return MetricResult(
        metric=metric.name,
        label=metric.label,
        arm=arm,
        control=float(cmp.control),
        treatment=float(cmp.treatment),
        abs_lift=float(cmp.abs_lift),
        abs_ci=(float(lo), float(hi)),
        rel_lift=float(cmp.rel_lift),
        rel_ci=(float(rlo), float(rhi)),
        p_value=p,
        significant=p < alpha,
        cuped=cmp.cuped,
        variance_factor=float(cmp.variance_factor),
        always_valid_p=avp,
    )


def _guardrail_result(
    g: Guardrail, arm: str, cols: Columns, control: np.ndarray, treatment: np.ndarray, use_cuped: bool
) -> GuardrailResult:
    if g.metric not in METRICS:
        return GuardrailResult(
            g.metric,
            g.label,
            arm,
            "not evaluated",
            g.max_harm,
            note="not in the event log; read from serving monitoring",
        )
    metric = METRICS[g.metric]
    try:
        cmp = _compare(cols, metric, control, treatment, use_cuped)
    except ValueError as exc:
        # A guardrail that cannot be measured (no hides at all) must not sink the analysis.
        return GuardrailResult(g.metric, g.label, arm, "not evaluated", g.max_harm, note=str(exc))
    change = float(cmp.rel_lift)
    harm = change if not metric.higher_is_better else -change
    p = float(stats.norm.sf((harm - g.max_harm) / float(cmp.rel_se)))
    verdict = "breached" if p < g.alpha else "ok"
    return GuardrailResult(g.metric, g.label, arm, verdict, g.max_harm, change, p)
