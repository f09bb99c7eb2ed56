"""`feedrank simulate`: write a synthetic feed log with its ground truth (thin shell over
``feedrank.data.simulate.simulate``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from feedrank.data.simulate import SimulationSummary


def simulate_command(
    out: Path = typer.Option(..., "--out", help="Output directory for the log, truth/ and summary.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="WorldConfig YAML (e.g. configs/world_demo.yaml)."),
    users: Optional[int] = typer.Option(None, "--users", help="Override the number of users."),
    items: Optional[int] = typer.Option(None, "--items", help="Override the number of items."),
    days: Optional[int] = typer.Option(None, "--days", help="Override the number of days."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the random seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a simulation already in --out."),
) -> None:
    """Simulate a news-feed world and stream its event log to --out."""
    from rich.console import Console

    from feedrank.config import ConfigError, from_dict, load_yaml, to_dict
    from feedrank.data.simulate import SUMMARY_FILE, simulate
    from feedrank.data.world import WorldConfig

    console = Console(stderr=True)
    overrides = {k: v for k, v in dict(users=users, items=items, days=days, seed=seed).items() if v is not None}
    try:
        cfg = load_yaml(WorldConfig, config) if config is not None else WorldConfig()
        cfg = from_dict(WorldConfig, {**to_dict(cfg), **overrides})
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    try:
        summary = simulate(cfg, out, overwrite=overwrite, progress=True)
    except (FileExistsError, NotADirectoryError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    Console().print(summary_table(summary, out / SUMMARY_FILE))


def summary_table(summary: SimulationSummary, path: Path) -> Table:
    """The simulation summary as a two-column table (``path``: where summary.json was written)."""
    from rich.table import Table

    table = Table(title=f"simulated log ({path})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("users", f"{summary.users:,}"),
        ("items", f"{summary.items:,}"),
        ("days", f"{summary.days}"),
        ("requests", f"{summary.requests:,}"),
        ("events", f"{summary.events:,}"),
        ("CTR", f"{summary.ctr:.4f}"),
        ("mean dwell of clicks (s)", f"{summary.mean_dwell_s:.1f}"),
        ("share rate", f"{summary.share_rate:.4f}"),
        ("hide rate", f"{summary.hide_rate:.4f}"),
        ("seconds", f"{summary.seconds:.2f}"),
        ("events/s", f"{summary.events_per_s:,.0f}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("simulate")(simulate_command)
