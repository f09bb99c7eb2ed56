"""`feedrank evaluate ...`: offline evaluation of saved bundles (thin shells over
``feedrank.evaluate``). Exit codes: 0 done; 2 unusable input (one-line message).

Example::

    feedrank evaluate retrieval runs/demo/bundle --log runs/world_demo --k 10,50,100
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from feedrank.bundle import BundleError, load_bundle
from feedrank.commands.train import USER_ERRORS, metrics_table, run_cli
from feedrank.evaluate.retrieval import evaluate_bundle

evaluate_app = typer.Typer(help="Evaluate a saved model bundle on a log.", no_args_is_help=True)


def parse_ks(text: str) -> list[int]:
    """``"10,50,100"`` -> ``[10, 50, 100]``; anything else is a ``BadParameter`` naming the value."""
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise typer.BadParameter(f"expected comma-separated integers >= 1, got {text!r}")
    return ks


@evaluate_app.command("retrieval")
def retrieval_command(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder (RUN_DIR/bundle)."),
    log: Path = typer.Option(..., "--log", help="Event log directory."),
    split_at: Optional[str] = typer.Option(
        None, "--split-at", help="Evaluation cut, ISO-8601 (default: the run's features.split_at)."
    ),
    k: Optional[str] = typer.Option(None, "--k", help="Comma-separated cut-offs (default: the run's eval.ks)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for metrics.json (default: eval/ beside the bundle)."),
    max_users: Optional[int] = typer.Option(None, "--max-users", help="Evaluate a random sample of this many users."),
) -> None:
    """Full-catalogue top-k of the bundle's model against popularity on the log's holdout."""
    ks = parse_ks(k) if k is not None else None
    # A bad bundle, an unparsable cut or an empty holdout (ValueError) is the user's to fix.
    result = run_cli(
        lambda: evaluate_bundle(load_bundle(bundle_dir), log, split_at=split_at, ks=ks, out_dir=out, max_users=max_users),
        errors=(*USER_ERRORS, BundleError, ValueError),
    )
    doc = result.metrics_file()
    console = Console()
    console.print(metrics_table(f"{bundle_dir} on {log} from {result.split_at}", doc["models"], result.ks))
    c = result.counts
    console.print(f"users evaluated {c['n_users_evaluated']}/{c['n_users']} (OOV users {c['n_oov_users']}); "
                  f"items ranked {c['n_items_ranked']}; relevant pairs {c['n_relevant']} (dropped: "
                  f"{c['n_relevant_oov']} OOV, {c['n_oov_items']} distinct OOV items; {c['n_relevant_seen']} already clicked)")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` group to the root app."""
    app.add_typer(evaluate_app, name="evaluate")
