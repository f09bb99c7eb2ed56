"""`feedrank train ...`: one sub-command per model task, each a thin shell over its library function.

Exit codes: 0 done; 2 the config or the data cannot be used (one-line message, no traceback);
75 (``PREEMPTED_EXIT_CODE``) stopped by SIGTERM after checkpointing: rerun with ``--resume``.

Example::

    feedrank train retrieval --config configs/demo.yaml --log runs/world_demo --out runs/demo

A new task (``ranking``) adds its function to ``train_app`` with ``@train_app.command("ranking")``;
``run_cli`` gives it the same error handling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from feedrank.config import ConfigError
from feedrank.features.build import FeatureBuildError, NotTrainableError
from feedrank.train.retrieval import Preempted, load_run_config, train_retrieval
from feedrank.train.trainer import PREEMPTED_EXIT_CODE

train_app = typer.Typer(
    help="Train a model on an event log; writes RUN_DIR/{features,train,eval,bundle}.", no_args_is_help=True
)

#: Errors a user can fix (config, data, paths): reported on one line, exit status 2.
USER_ERRORS = (ConfigError, NotTrainableError, FeatureBuildError, FileNotFoundError, FileExistsError)

T = TypeVar("T")


def run_cli(task: Callable[[], T], errors: tuple[type[Exception], ...] = USER_ERRORS) -> T:
    """Run ``task``; an error of ``errors`` exits 2 with ``error: <message>``, a preemption exits 75."""
    try:
        return task()
    except errors as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except Preempted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(PREEMPTED_EXIT_CODE) from exc


def metrics_table(title: str, models: dict[str, dict[str, dict]], ks: list[int]) -> Table:
    """Model-by-metric table of a ``metrics.json`` document's ``models`` section."""
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


@train_app.command("retrieval")
def retrieval_command(
    config: Path = typer.Option(..., "--config", help="Run config YAML (e.g. configs/demo.yaml)."),
    log: Path = typer.Option(..., "--log", help="Event log directory (feedrank simulate / ingest output)."),
    out: Path = typer.Option(..., "--out", help="Run directory: features/, train/, eval/, bundle/ go here."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in RUN_DIR/train."),
) -> None:
    """Train the two-tower retrieval model, evaluate it against popularity, and save a bundle."""
    cfg = run_cli(lambda: load_run_config(config))
    bundle = run_cli(lambda: train_retrieval(log, out, cfg, resume=resume))
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
    console.print(f"trained {train.get('step', '?')} steps, final loss {train.get('loss', float('nan')):.4f}")
    console.print(f"bundle {bundle.path} (version {bundle.version[:12]})")


def register(app: typer.Typer) -> None:
    """Add the ``train`` group to the root app."""
    app.add_typer(train_app, name="train")
