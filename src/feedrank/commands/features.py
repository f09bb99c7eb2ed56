"""`feedrank features build LOG OUT --config YAML`: a thin shell over ``feedrank.features.build_features``.

The config may be a whole run config (its ``features`` section is read) or a file holding only
``FeatureConfig`` keys. Exit codes: 0 built; 2 unusable config or log (one-line message).

Example::

    feedrank features build runs/world_demo runs/demo/features --config configs/demo.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

import typer

from feedrank.commands.train import run_cli

if TYPE_CHECKING:
    from feedrank.features.build import FeatureConfig

features_app = typer.Typer(help="Point-in-time training examples from an event log.", no_args_is_help=True)


def load_feature_config(path: Path | None) -> FeatureConfig:
    """``FeatureConfig`` from a run config's ``features`` section, or from a features-only file."""
    import yaml

    from feedrank.config import load_yaml
    from feedrank.features.build import FeatureConfig

    if path is None:
        return FeatureConfig()
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    has_section = isinstance(data, dict) and "features" in data
    return load_yaml(FeatureConfig, path, section="features" if has_section else None)


@features_app.command("build")
def build_command(
    log: Path = typer.Argument(..., metavar="LOG", help="Event log directory."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output folder (replaced atomically when the build succeeds)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML with a 'features' section (or only feature keys)."),
    chunk_rows: Optional[int] = typer.Option(None, "--chunk-rows", min=1, help="Rows processed at once (memory only; the output is the same)."),
) -> None:
    """Build examples, vocabularies and manifest.json for LOG into OUT."""
    import yaml

    from feedrank.features.build import build_features

    sized = {} if chunk_rows is None else {"chunk_rows": chunk_rows}
    result = run_cli(lambda: build_features(log, out, load_feature_config(config), progress=True, **sized),
                     also=(yaml.YAMLError,))
    m = result.manifest
    for split, stats in m["splits"].items():
        oov = ", ".join(f"{k} {v}" for k, v in stats["oov"].items() if v)
        typer.echo(f"{split}: {stats['rows']:,} rows, {stats['clicks']:,} clicks" + (f"; OOV: {oov}" if oov else ""))
    typer.echo("vocabularies: " + ", ".join(f"{k} {v:,}" for k, v in m["vocab_sizes"].items()))
    typer.echo(f"features: {out} (content {m['content_hash'][:12]}, {sum(result.seconds.values()):.1f} s)")


def register(app: typer.Typer) -> None:
    """Add the ``features`` group to the root app."""
    app.add_typer(features_app, name="features")
