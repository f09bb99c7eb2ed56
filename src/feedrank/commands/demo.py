"""`feedrank demo`: the end-to-end pipeline on the embedded synthetic world, no download needed.

Each stage is a library call that the other commands also make; the demo only chains them and
prints what a newcomer should look at.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from feedrank.commands.simulate import summary_table
from feedrank.config import load_yaml
from feedrank.data.simulate import SUMMARY_FILE, simulate
from feedrank.data.world import WorldConfig

DEFAULT_WORLD = Path("configs/world_demo.yaml")


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (replaced by a new demo)."),
    world: Path = typer.Option(DEFAULT_WORLD, "--world", help="WorldConfig YAML of the synthetic world."),
) -> None:
    """Simulate the demo world and print its summary."""
    console = Console()
    console.rule("1/1 simulate the synthetic feed world")
    log_dir = out / "log"
    summary = simulate(load_yaml(WorldConfig, world), log_dir, overwrite=True, progress=True)
    console.print(summary_table(summary, log_dir / SUMMARY_FILE))


def register(app: typer.Typer) -> None:
    """Add ``feedrank demo`` to the root app."""
    app.command("demo")(demo_command)
