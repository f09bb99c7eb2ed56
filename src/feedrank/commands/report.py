"""`feedrank report RUN_DIR`: write the HTML evaluation report of a run and print its path (thin
shell over ``feedrank.evaluate.report.write_report``; the run directory layout is documented
there). Bad input exits with status 2 and a message naming the file, column or key."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def report_command(
    run_dir: Path = typer.Argument(
        ..., help="Run directory with eval/predictions.parquet (optional: eval/metrics.json, train/*/metrics.jsonl)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", help="HTML file (default RUN_DIR/report.html); figures go to <name>_files/, numbers to <name>.json."
    ),
    resamples: int = typer.Option(500, "--resamples", help="Bootstrap resamples when eval/metrics.json is absent."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
) -> None:
    """Write a self-contained HTML report (metrics with intervals, comparisons, curves, calibration)."""
    from feedrank.evaluate.report import write_report

    try:
        path = write_report(run_dir, out, n_resamples=resamples, seed=seed, progress=True)
    except (FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add this command to the root app."""
    app.command("report")(report_command)
