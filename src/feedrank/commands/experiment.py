"""`feedrank experiment` commands: ``plan`` (power + staged rollout), ``analyze`` (A/B readout) and
``ab`` (a simulated A/B test on the synthetic world).

Thin shells over ``feedrank.experiment``. Percent-like arguments (``--mde``, ``--traffic``,
``--cuped-r2``, ``--sequential-tau``, a proportion ``--baseline``) accept ``"0.5%"`` or
``0.005``; a bare number above 1 is refused as ambiguous. Bad input exits with status 2 and a
message naming the problem. ``--json`` prints the machine-readable result instead of text;
``--out FILE`` writes it to FILE as well.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from feedrank.config import ConfigError, load_yaml

if TYPE_CHECKING:
    import pyarrow as pa

    from feedrank.experiment.power import MetricModel
    from feedrank.experiment.rollout import RolloutConfig

#: The names of ``feedrank.experiment.metrics.METRICS``, spelled out so that ``--help`` can list
#: them without loading pyarrow; ``tests/test_cli_startup.py`` checks that the two agree.
METRIC_NAMES = ("ctr", "time_spent", "clicks_per_user", "hide_rate", "publisher_hhi")

experiment_app = typer.Typer(help="Plan and analyse online A/B experiments.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(experiment_app, name="experiment")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _emit(text: str, payload: dict, as_json: bool, out: Path | None) -> None:
    blob = json.dumps(payload, indent=2, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(blob + "\n")
    typer.echo(blob if as_json else text)


def _date(text: str | None, name: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=dt.timezone.utc)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a date (YYYY-MM-DD)") from None


def _load_config(path: Path | None) -> RolloutConfig:
    from feedrank.experiment.rollout import RolloutConfig

    return RolloutConfig() if path is None else load_yaml(RolloutConfig, path, section="rollout")


def _metric_from_args(
    name: str, baseline: str | None, sd: float | None, per_user: float | None, deff: float
) -> MetricModel:
    from feedrank.experiment.metrics import get_metric
    from feedrank.experiment.params import parse_fraction
    from feedrank.experiment.power import MetricModel, proportion_metric

    metric = get_metric(name)
    if baseline is None:
        raise ValueError("--baseline is required (or estimate it with --from-log)")
    is_proportion = metric.denominator == "impressions"
    level = parse_fraction(baseline, "--baseline") if is_proportion else float(baseline)
    if sd is not None:
        return MetricModel(name, level, sd, design_effect=deff)
    if not is_proportion:
        raise ValueError(f"--sd is required for the mean metric {name!r} (or estimate it with --from-log)")
    if per_user is None:
        raise ValueError(f"{name} without --sd needs --impressions-per-user (and ideally --design-effect)")
    return proportion_metric(name, level, per_user, deff)


@experiment_app.command("plan")
def plan_command(
    metric: str = typer.Option(..., help=f"Primary metric: {', '.join(METRIC_NAMES)}."),
    mde: str = typer.Option(..., help="Minimum detectable effect, relative to baseline: '0.5%' or 0.005."),
    daily_users: float = typer.Option(..., help="Distinct users newly eligible per day."),
    traffic: str = typer.Option(..., help="Share of users in the experiment (both arms): '5%' or 0.05."),
    baseline: Optional[str] = typer.Option(None, help="Control mean (a proportion may be '5%')."),
    sd: Optional[float] = typer.Option(None, help="Per-user standard deviation (delta-method sd for ratio metrics)."),
    impressions_per_user: Optional[float] = typer.Option(None, help="For a proportion without --sd."),
    design_effect: float = typer.Option(1.0, help="Clustered / binomial variance for a proportion without --sd."),
    from_log: Optional[Path] = typer.Option(None, help="Estimate baseline, sd (and design effect) from this log."),
    pre_end: Optional[str] = typer.Option(
        None, help="With --from-log: events before this date are the CUPED pre-period."
    ),
    cuped_r2: Optional[str] = typer.Option(None, help="Share of variance CUPED removes (rho^2): '30%' or 0.3."),
    alpha: float = typer.Option(0.05, help="Significance level."),
    power: float = typer.Option(0.8, help="Target power."),
    one_sided: bool = typer.Option(False, "--one-sided", help="One-sided test (treatment better)."),
    ratio: float = typer.Option(1.0, help="Treatment users per control user."),
    sequential: bool = typer.Option(False, "--sequential", help="Allow early success on always-valid p-values."),
    config: Optional[Path] = typer.Option(None, help="YAML with a 'rollout' section (stages, guardrails)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON plan here."),
) -> None:
    """Sample size, duration and the staged rollout plan for one primary metric."""
    from feedrank.experiment.metrics import user_table_from_log
    from feedrank.experiment.params import parse_fraction
    from feedrank.experiment.power import Design, estimate_from_users
    from feedrank.experiment.rollout import build_plan

    try:
        design = Design(alpha, power, "one-sided" if one_sided else "two-sided", ratio)
        if from_log is not None:
            model = estimate_from_users(user_table_from_log(from_log, _date(pre_end, "--pre-end")), metric)
        else:
            if pre_end is not None:
                raise ValueError("--pre-end needs --from-log")
            model = _metric_from_args(metric, baseline, sd, impressions_per_user, design_effect)
        if cuped_r2 is not None:
            r2 = parse_fraction(cuped_r2, "--cuped-r2")
            if not 0 <= r2 < 1:
                raise ValueError(f"--cuped-r2 must be in [0, 1), got {cuped_r2!r}")
            model = replace(model, variance_factor=1 - r2)
        rollout = _load_config(config)
        if sequential:
            rollout = replace(rollout, sequential=True)
        plan = build_plan(
            model, parse_fraction(mde, "--mde"), daily_users, parse_fraction(traffic, "--traffic"), design, rollout
        )
    except (ValueError, ConfigError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    _emit(plan.render_text(), plan.to_dict(), as_json, out)


def _read_assignment(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"assignment file not found: {path}")
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".csv":
        types = {"user_id": pa.string(), "arm": pa.string()}
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))
    raise ValueError(f"{path}: assignment file must be .parquet or .csv")


@experiment_app.command("analyze")
def analyze_command(
    log_dir: Path = typer.Argument(..., help="Canonical event log directory."),
    arms: str = typer.Option(..., help="Comma-separated arm names, e.g. control,treatment."),
    salt: Optional[str] = typer.Option(None, help="Assignment salt: arms are re-derived by hashing user ids."),
    assignment: Optional[Path] = typer.Option(None, help="Or a .parquet/.csv file with user_id,arm columns."),
    weights: Optional[str] = typer.Option(None, help="Planned split, e.g. 50,50 (default equal)."),
    control: Optional[str] = typer.Option(None, help="Control arm (default: the first of --arms)."),
    metrics: str = typer.Option("ctr,time_spent", help=f"Comma-separated, first is primary: {', '.join(METRIC_NAMES)}."),
    pre_end: Optional[str] = typer.Option(None, help="Events before this date (YYYY-MM-DD) are the CUPED pre-period."),
    alpha: float = typer.Option(0.05, help="Significance level."),
    sequential_tau: Optional[str] = typer.Option(None, help="Add always-valid p-values; effect scale, e.g. '2%'."),
    no_cuped: bool = typer.Option(False, "--no-cuped", help="Ignore pre-period covariates."),
    config: Optional[Path] = typer.Option(None, help="YAML with a 'rollout' section (guardrails)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    out: Optional[Path] = typer.Option(None, help="Also write the JSON result here."),
) -> None:
    """Analyse an A/B test on a canonical log: lifts, CIs, guardrails, SRM and a summary."""
    from feedrank.experiment.analyze import analyze
    from feedrank.experiment.metrics import user_table_from_log
    from feedrank.experiment.params import parse_fraction

    try:
        arm_names = [a.strip() for a in arms.split(",") if a.strip()]
        split = None
        if weights is not None:
            try:
                split = [float(w) for w in weights.split(",")]
            except ValueError:
                raise ValueError(f"--weights: {weights!r} is not a comma-separated list of numbers") from None
        if (salt is None) == (assignment is None):
            raise ValueError("give exactly one of --salt or --assignment")
        users = user_table_from_log(
            log_dir,
            pre_end=_date(pre_end, "--pre-end"),
            arms=arm_names,
            salt=salt,
            weights=split,
            assignment=None if assignment is None else _read_assignment(assignment),
        )
        result = analyze(
            users,
            arm_names,
            metrics=[m.strip() for m in metrics.split(",") if m.strip()],
            control=control,
            alpha=alpha,
            guardrails=_load_config(config).guardrails,
            weights=split,
            use_cuped=not no_cuped,
            sequential_tau=None if sequential_tau is None else parse_fraction(sequential_tau, "--sequential-tau"),
        )
    except (ValueError, ConfigError, FileNotFoundError) as exc:
        raise _fail(str(exc)) from None
    _emit(result.render_text(), result.to_dict(), as_json, out)
    if not result.srm.ok:
        typer.echo("warning: sample ratio mismatch; do not trust these results", err=True)


def _arm(text: str) -> tuple[str, tuple[str, str | None] | str]:
    """``NAME=BUNDLE[,RANKER]`` or ``NAME=oracle[:NOISE]`` -> (name, arm spec)."""
    from feedrank.experiment.simulate_ab import parse_oracle

    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise ValueError(f"--arm {text!r}: expected NAME=BUNDLE[,RANKER] or NAME=oracle[:NOISE]")
    if parse_oracle(spec) is not None:
        return name, spec
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"--arm {text!r}: expected NAME=BUNDLE[,RANKER]")
    return name, (parts[0], parts[1] if len(parts) == 2 else None)


@experiment_app.command("ab")
def ab_command(
    world: Path = typer.Option(..., help="Simulated world: its log directory (with truth/), from `feedrank simulate`."),
    arm: list[str] = typer.Option(
        ..., help="NAME=BUNDLE[,RANKER] or NAME=oracle[:NOISE]; repeat, the first is control."
    ),
    users: Optional[int] = typer.Option(None, help="Seeded sample of the world's users (default: config or all)."),
    days: Optional[int] = typer.Option(None, help="Simulated days (default: config or 1)."),
    salt: Optional[str] = typer.Option(None, help="Assignment salt (default: config or 'ab-sim')."),
    weights: Optional[str] = typer.Option(None, help="Planned split, e.g. 50,50 (default equal)."),
    seed: Optional[int] = typer.Option(None, help="Random seed of population, traffic and outcomes."),
    config: Optional[Path] = typer.Option(
        None, help="YAML with an 'ab' section (feedrank.experiment.simulate_ab.ABSimConfig)."
    ),
    out: Optional[Path] = typer.Option(None, help="Keep the experiment log, assignment and result.json here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    progress: bool = typer.Option(False, "--progress", help="Show a progress bar per arm."),
) -> None:
    """Simulated A/B test: arms served by real feed services, users played by the synthetic world."""
    from feedrank.experiment.simulate_ab import ABSimConfig, simulate_ab
    from feedrank.serving.pipeline import set_threads

    try:
        cfg = ABSimConfig() if config is None else load_yaml(ABSimConfig, config, section="ab")
        overrides = {"users": users, "days": days, "salt": salt, "seed": seed}
        if weights is not None:
            try:
                overrides["weights"] = [float(w) for w in weights.split(",")]
            except ValueError:
                raise ValueError(f"--weights: {weights!r} is not a comma-separated list of numbers") from None
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        arms = dict(_arm(a) for a in arm)
        if len(arms) != len(arm):
            raise ValueError(f"--arm: arm names must be distinct, got {[a.partition('=')[0] for a in arm]}")
        set_threads(cfg.serving.torch_threads)  # as each serving worker runs: one request at a time
        result = simulate_ab(world, arms, cfg, out_dir=out, progress=progress)
    except (ValueError, ConfigError, FileNotFoundError, FileExistsError, KeyError) as exc:
        raise _fail(str(exc)) from None
    _emit(result.render_text(), result.to_dict(), as_json, None)
    if not result.analysis.srm.ok:
        typer.echo("warning: sample ratio mismatch; do not trust these results", err=True)
