"""`feedrank demo`: the end-to-end pipeline on the embedded synthetic world, no download needed.

Each stage is a library call that the other commands also make; the demo only chains them and
prints what a newcomer should look at: the world it simulated, how retrieval and ranking compare
with their baselines, where the report is, and a few real requests to the running service.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from feedrank.commands.simulate import summary_table
from feedrank.commands.train import metrics_table, ranking_tables, run_cli

CONFIGS = Path("configs")


def demo_command(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (replaced by a new demo)."),
    world: Path = typer.Option(CONFIGS / "world_demo.yaml", "--world", help="WorldConfig YAML of the synthetic world."),
    retrieval: Path = typer.Option(CONFIGS / "demo.yaml", "--retrieval", help="Two-tower run config YAML."),
    ranking: Path = typer.Option(CONFIGS / "ranking_demo.yaml", "--ranking", help="Ranker run config YAML."),
) -> None:
    """Simulate the demo world, train retrieval and ranking, write the report, and query the service."""
    from rich.console import Console

    from feedrank.config import load_yaml
    from feedrank.data.simulate import SUMMARY_FILE, simulate
    from feedrank.data.world import WorldConfig
    from feedrank.serving.demo import demo_requests
    from feedrank.train.ranking import load_ranking_config, run_pipeline
    from feedrank.train.retrieval import load_run_config

    console = Console()
    retrieval_cfg, ranking_cfg = run_cli(lambda: (load_run_config(retrieval), load_ranking_config(ranking)))
    log_dir = out / "log"
    if out.exists() and any(out.iterdir()):
        # A demo is a fresh run (stale checkpoints would be resumed from), but only an earlier
        # demo's folder is ever removed: a mistyped --out must not delete someone's data.
        if not (log_dir / SUMMARY_FILE).is_file():
            typer.echo(f"error: {out} exists and is not a feedrank demo run; choose another --out", err=True)
            raise typer.Exit(2)
        shutil.rmtree(out)

    console.rule("1/3 simulate the synthetic feed world")
    summary = simulate(load_yaml(WorldConfig, world), log_dir, progress=True)
    console.print(summary_table(summary, log_dir / SUMMARY_FILE))

    console.rule("2/3 train retrieval and ranking, evaluate against baselines, write the report")
    result = run_cli(lambda: run_pipeline(log_dir, out, retrieval_cfg, ranking_cfg))
    retrieval_eval, ranking_eval = result.two_tower.metrics["eval"], result.ranker.metrics["eval"]
    console.print(metrics_table(f"retrieval, full catalogue ({result.two_tower.path})", retrieval_eval["models"],
                                retrieval_eval["holdout"]["ks"]))
    console.print(*ranking_tables(ranking_eval))
    console.print(f"report: {result.report}")

    console.rule("3/3 serve: a warm user, a cold user, an event, the warm user again")
    console.print(demo_requests(result.two_tower.path, result.ranker.path, log_dir, workdir=out / "serving"))


def register(app: typer.Typer) -> None:
    """Add ``feedrank demo`` to the root app."""
    app.command("demo")(demo_command)
