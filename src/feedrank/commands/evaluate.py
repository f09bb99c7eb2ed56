"""`feedrank evaluate ...`: offline evaluation of saved bundles (thin shells over
``feedrank.evaluate``). Exit codes: 0 done; 2 unusable input (one-line message).

Example::

    feedrank evaluate retrieval runs/demo/bundle --log runs/world_demo --k 10,50,100
    feedrank evaluate ranking runs/demo/ranker --against runs/prod/ranker
    feedrank evaluate weights --config-a a.yaml --config-b b.yaml --log runs/world_demo --out runs/weights
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from feedrank.commands.train import metrics_table, ranking_tables, run_cli

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


def slices_table(doc: dict, metric: str):
    """Each slice's ``metric`` per model and, with an oracle, the model's share of its lift."""
    from rich.table import Table

    table = Table(title=f"slices: {metric} [CI] and share of the oracle's lift over random")
    for column in ("slice", "share", "model", metric, "share of oracle lift"):
        table.add_column(column, justify="left" if column in ("slice", "model") else "right")
    for part in doc.get("slices", []):
        for model, cells in part["models"].items():
            lift = part["lift_share"].get(model, {}).get(metric)
            table.add_row(part["slice"], f"{part['share']:.0%}", model, _cell_text(cells.get(metric)), _cell_text(lift, 3))
    return table


def _cell_text(cell: dict | None, digits: int = 4) -> str:
    if cell is None or cell.get("value") is None:
        return "-"
    ci = cell.get("ci")
    return f"{cell['value']:.{digits}f}" + ("" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


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
    """Full-catalogue top-k of the bundle's model against popularity, random (and the world's oracle,
    when the log has truth/) on the log's holdout impressions, with bootstrap intervals over users."""
    from rich.console import Console

    from feedrank.bundle import BundleError, load_bundle
    from feedrank.evaluate.retrieval import evaluate_bundle

    ks = parse_ks(k) if k is not None else None
    # A bad bundle, an unparsable cut or an empty holdout (ValueError) is the user's to fix.
    result = run_cli(
        lambda: evaluate_bundle(load_bundle(bundle_dir), log, split_at=split_at, ks=ks, out_dir=out, max_users=max_users),
        also=(BundleError, ValueError),
    )
    doc = result.metrics_file()
    console = Console()
    console.print(metrics_table(f"{bundle_dir} on {log} from {result.split_at}", doc["models"], result.ks))
    console.print(ranking_tables(doc)[1])
    console.print(slices_table(doc, f"recall@{result.ks[0]}"))
    c = result.counts
    console.print(f"users evaluated {c['n_users_evaluated']}/{c['n_users']} (OOV users {c['n_oov_users']}); "
                  f"items ranked {c['n_items_ranked']}; relevant pairs {c['n_relevant']} (dropped: "
                  f"{c['n_relevant_oov']} OOV, {c['n_oov_items']} distinct OOV items; {c['n_relevant_seen']} already clicked)")


@evaluate_app.command("ranking")
def ranking_command(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Ranker bundle folder (RUN_DIR/ranker)."),
    log: Optional[Path] = typer.Option(None, "--log", help="Event log directory (default: the one it was trained on)."),
    against: Optional[Path] = typer.Option(
        None, "--against", help="Production bundle (ranker or two-tower): is BUNDLE better than it, per metric?"
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory for eval/ (default: the folder holding BUNDLE)."),
) -> None:
    """Rank the holdout impressions (MIND protocol) against random, popularity, recency and two-tower
    baselines (and the world's oracle, when the log has truth/), overall and by slice."""
    from rich.console import Console

    from feedrank.bundle import BundleError, load_bundle
    from feedrank.evaluate import ranking

    result = run_cli(
        lambda: ranking.evaluate_bundle(load_bundle(bundle_dir), log, out,
                                        against=None if against is None else load_bundle(against), progress=True),
        also=(BundleError, ValueError),
    )  # fmt: skip
    console = Console()
    doc = result.evaluation.metrics_file()
    for table in ranking_tables(doc):
        console.print(table)
    console.print(slices_table(doc, "auc"))
    h = doc["holdout"]
    console.print(f"{h['impressions']} impressions in {h['requests']} requests from {h['split_at']} "
                  f"({h['requests_without_click']} without a click); OOV rows: {h['rows_oov_user']} user, "
                  f"{h['rows_oov_item']} item; duplicates dropped: {h['duplicate_rows_dropped']}")  # fmt: skip
    console.print(f"predictions and metrics: {(out or Path(bundle_dir).parent) / 'eval'}")


@evaluate_app.command("weights")
def weights_command(
    config_a: Path = typer.Option(..., "--config-a", help="Ranking run config A (the current weighting)."),
    config_b: Path = typer.Option(..., "--config-b", help="Ranking run config B (the proposed weighting)."),
    log: Path = typer.Option(..., "--log", help="Event log directory."),
    out: Path = typer.Option(Path("runs/weights"), "--out", help="Folder for the two runs (a/, b/) and weights.json."),
    two_tower: Optional[Path] = typer.Option(None, "--two-tower", help="Two-tower bundle feeding both rankers."),
) -> None:
    """Train the ranker under two label weightings and compare them on the holdout (paired bootstrap)."""
    from rich.console import Console
    from rich.table import Table

    from feedrank.bundle import BundleError
    from feedrank.train.ranking import compare_label_weightings, load_ranking_config

    cfg_a, cfg_b = run_cli(lambda: (load_ranking_config(config_a), load_ranking_config(config_b)))
    result = run_cli(lambda: compare_label_weightings(cfg_a, cfg_b, log, out, two_tower_bundle=two_tower),
                     also=(BundleError, ValueError))  # fmt: skip
    table = Table(title=f"B ({config_b}) against A ({config_a}) on the holdout: delta = B - A [95% CI]")
    for column in ("metric", "A", "B", "delta [CI]", "p"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for c in result.comparisons:
        table.add_row(c.metric, f"{c.value_a:.4f}", f"{c.value_b:.4f}",
                      f"{c.delta:+.4f} [{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]", f"{c.p_value:.3f}")  # fmt: skip
    console = Console()
    console.print(table)
    for name, why in result.skipped.items():
        console.print(f"{name}: not measured ({why})")
    console.print(f"details: {out / 'weights.json'}")


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` group to the root app."""
    app.add_typer(evaluate_app, name="evaluate")
