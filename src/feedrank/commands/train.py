"""`feedrank train ...`: one sub-command per model task, each a thin shell over its library function.

Exit codes: 0 done; 2 the config or the data cannot be used (one-line message, no traceback);
75 (``PREEMPTED_EXIT_CODE``) stopped by SIGTERM after checkpointing: rerun with ``--resume``.

Example::

    feedrank train retrieval --config configs/demo.yaml --log runs/world_demo --out runs/demo
    feedrank train ranking --config configs/ranking_demo.yaml --log runs/world_demo --out runs/demo \
        --two-tower runs/demo/bundle

A new task adds its function to ``train_app`` with ``@train_app.command(...)``; ``run_cli`` gives it
the same error handling. Like every command module, this one imports torch and pyarrow only inside
the commands, so that ``feedrank --help`` does not load them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import typer

if TYPE_CHECKING:
    from rich.table import Table

train_app = typer.Typer(
    help="Train a model on an event log; writes RUN_DIR/{features,train/<task>,eval} and its bundle "
    "(RUN_DIR/bundle for retrieval, RUN_DIR/ranker for ranking).",
    no_args_is_help=True,
)

T = TypeVar("T")


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can fix (config, data, paths): reported on one line, exit status 2."""
    from feedrank.config import ConfigError
    from feedrank.features.build import FeatureBuildError, NotTrainableError

    return (ConfigError, NotTrainableError, FeatureBuildError, FileNotFoundError, FileExistsError)


def run_cli(task: Callable[[], T], also: tuple[type[Exception], ...] = ()) -> T:
    """Run ``task``; a user error (``user_errors()`` or ``also``) exits 2 with ``error: <message>``,
    a preemption exits 75."""
    try:
        return task()
    except (*user_errors(), *also) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:
        # Only a loaded trainer can be preempted; importing it here would load torch for nothing.
        task_module = sys.modules.get("feedrank.train.task")
        if task_module is None or not isinstance(exc, task_module.Preempted):
            raise
        from feedrank.train.trainer import PREEMPTED_EXIT_CODE

        typer.echo(str(exc), err=True)
        raise typer.Exit(PREEMPTED_EXIT_CODE) from exc


def metrics_table(title: str, models: dict[str, dict[str, dict]], ks: list[int]) -> Table:
    """Model-by-metric table of a ``metrics.json`` document's ``models`` section."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    for metric in ("recall", "ndcg", "mrr", "hit", "precision"):
        for k in ks:
            key = f"{metric}@{k}"
            cells = [models[name].get(key, {}).get("value") for name in models]
            table.add_row(key, *("-" if v is None else f"{v:.4f}" for v in cells))
    return table


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None or cell.get("value") is None:
        return "-"
    ci = cell.get("ci")
    return f"{cell['value']:.4f}" + ("" if ci is None else f" [{ci[0]:.4f}, {ci[1]:.4f}]")


def ranking_tables(doc: dict[str, Any]) -> tuple[Table, Table]:
    """(metric by model, comparisons) of a ranking ``metrics.json`` document, values with their CIs."""
    from rich.table import Table

    models = doc["models"]
    table = Table(title="holdout impressions: value [95% CI]")
    table.add_column("metric")
    for name in models:
        table.add_column(name, justify="right")
    for metric in dict.fromkeys(k for cells in models.values() for k in cells):
        table.add_row(metric, *(_cell(models[name].get(metric)) for name in models))
    comparisons = Table(title="comparisons: delta = b - a [CI], paired bootstrap")
    for column in ("b vs a", "metric", "delta [CI]", "p", "b better?"):
        comparisons.add_column(column, justify="left" if column in ("b vs a", "metric") else "right",
                               no_wrap=column == "b vs a")  # the model pair stays readable (and greppable)
    lower_is_better = {"log_loss", "ne", "ece"}
    for c in doc["comparisons"]:
        lo, hi = c["ci"] if c["ci"] is not None else (float("nan"), float("nan"))
        better = hi < 0 if c["metric"] in lower_is_better else lo > 0
        comparisons.add_row(f"{c['b']} vs {c['a']}", c["metric"], _cell({"value": c["delta"], "ci": c["ci"]}),
                            "-" if c["p"] is None else f"{c['p']:.3f}", "yes" if better else "no")  # fmt: skip
    return table, comparisons


@train_app.command("ranking")
def ranking_command(
    config: Path = typer.Option(..., "--config", help="Ranking run config YAML (e.g. configs/ranking_demo.yaml)."),
    log: Path = typer.Option(..., "--log", help="Event log directory (feedrank simulate / ingest output)."),
    out: Path = typer.Option(..., "--out", help="Run directory: features/, train/ranking/, eval/, ranker/ go here."),
    two_tower: Optional[Path] = typer.Option(
        None, "--two-tower", help="Two-tower bundle whose frozen vectors feed the ranker (and whose features it shares)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in RUN_DIR/train/ranking."),
) -> None:
    """Train the multi-task ranker, evaluate it against the baselines on the holdout, and save a bundle."""
    from rich.console import Console

    from feedrank.bundle import BundleError
    from feedrank.train.ranking import load_ranking_config, train_ranking

    cfg = run_cli(lambda: load_ranking_config(config))
    bundle = run_cli(lambda: train_ranking(log, out, cfg, two_tower_bundle=two_tower, resume=resume),
                     also=(BundleError, ValueError))  # fmt: skip
    if bundle is None:  # a non-zero torchrun rank: rank 0 reports
        return
    console = Console()
    evaluation = bundle.metrics.get("eval")
    if evaluation is not None:
        for table in ranking_tables(evaluation):
            console.print(table)
    else:
        console.print("no evaluation: the run has no test split with clicks (set features.split_at)")
    train = bundle.metrics.get("train", {})
    console.print(f"trained {train.get('step', '?')} steps, final loss {train.get('loss', float('nan')):.4f}")
    console.print(f"bundle {bundle.path} (version {bundle.version[:12]})")


@train_app.command("retrieval")
def retrieval_command(
    config: Path = typer.Option(..., "--config", help="Run config YAML (e.g. configs/demo.yaml)."),
    log: Path = typer.Option(..., "--log", help="Event log directory (feedrank simulate / ingest output)."),
    out: Path = typer.Option(..., "--out", help="Run directory: features/, train/, eval/, bundle/ go here."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in RUN_DIR/train."),
    valid_log: Optional[Path] = typer.Option(
        None, "--valid-log", help="Validation engagements in their own log: a blend's weights are chosen on them."
    ),
) -> None:
    """Train the retrieval model (retrieval.kind: two_tower, ease, covisit or blend), evaluate it, save a bundle."""
    from rich.console import Console

    from feedrank.evaluate.retrieval import holdout_from_logs
    from feedrank.train.retrieval import load_run_config, scoring_history_len, train_retrieval

    cfg = run_cli(lambda: load_run_config(config))
    valid = None if valid_log is None else run_cli(lambda: holdout_from_logs(log, valid_log, scoring_history_len(cfg)),
                                                   also=(ValueError,))  # fmt: skip
    bundle = run_cli(lambda: train_retrieval(log, out, cfg, resume=resume, valid=valid))
    if bundle is None:  # a non-zero torchrun rank: rank 0 reports
        return
    console = Console()
    evaluation = bundle.metrics.get("eval")
    if evaluation is not None:
        console.print(metrics_table(f"holdout from {cfg.features.split_at} (full catalogue)", evaluation["models"],
                                    evaluation["holdout"]["ks"]))  # fmt: skip
        h = evaluation["holdout"]
        console.print(f"users evaluated {h['n_users_evaluated']}/{h['n_users']} (OOV users {h['n_oov_users']}); "
                      f"relevant pairs {h['n_relevant']} (dropped: {h['n_relevant_oov']} OOV item, "
                      f"{h['n_relevant_seen']} already clicked)")  # fmt: skip
    else:
        console.print("no evaluation: the run has no test split (set features.split_at)")
    train = bundle.metrics.get("train", {})
    if bundle.kind == "blend":
        chosen = train["selection"]
        console.print(f"blend of {', '.join(cfg.blend.parts)}: weights {chosen['weights']} ({chosen['selected_by']}); "
                      f"parts and selection took {train['seconds']:.1f} s")  # fmt: skip
    elif bundle.kind == "item2item":
        console.print(f"{cfg.retrieval.kind} fitted in {train['fit_seconds']:.2f} s on {train['engagements']} "
                      f"engagements ({train['neighbours']} neighbours kept)")  # fmt: skip
    else:
        console.print(f"trained {train.get('step', '?')} steps, final loss {train.get('loss', float('nan')):.4f}")
    console.print(f"bundle {bundle.path} (version {bundle.version[:12]})")


def register(app: typer.Typer) -> None:
    """Add the ``train`` group to the root app."""
    app.add_typer(train_app, name="train")
