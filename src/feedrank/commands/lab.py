"""`feedrank lab NAME|all`: run labs into one folder and rebuild its page (thin shell over
``feedrank.labs.run_all``; the labs and their output are documented there and in docs/labs.md).

Exit codes: 0 done; 2 bad input (unknown lab, missing log, ``--device cuda`` without a GPU), one
line, no traceback. Importing this module is cheap: torch and the labs load only when a lab runs.

Example::

    feedrank lab attention --out runs/labs --quick
    feedrank lab all --out runs/labs                 # every lab, then runs/labs/index.html
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def lab_command(
    names: List[str] = typer.Argument(..., help="Lab names (attention, checkpointing, precision, compile, ddp, "
                                                "profile, quantize) or 'all'."),  # fmt: skip
    out: Path = typer.Option(Path("runs/labs"), "--out", help="Labs folder: OUT/<lab>/result.json, plots, OUT/index.html."),
    quick: bool = typer.Option(False, "--quick", help="Smaller world and sizes (every lab in about 3 minutes on 2 cores)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda runs each lab's CUDA-specific part)."),
    log: Optional[Path] = typer.Option(None, "--log", help="A canonical event log to measure on (default: the demo world)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, the models and the data order."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch intra-op threads (default: one per "
                                          "core; 1 on a machine other jobs share)."),  # fmt: skip
) -> None:
    """Run labs (measured PyTorch tradeoffs on feedrank's models), print their tables, write the page."""
    try:
        _check_device(device)
        if log is not None and not log.is_dir():
            raise ValueError(f"--log {log}: no such log directory")
        from feedrank.labs import load_lab, resolve, run_all

        labs = resolve(names)
        for name in labs:
            load_lab(name)  # an unknown or missing lab fails here, before any lab runs
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    results = run_all(out, labs, log=log, device=device, quick=quick, seed=seed, threads=threads)
    for result in results:
        typer.echo(f"{result.name}: {result.elapsed_s:.1f} s -> {out / result.name}")
    typer.echo(str(out / "index.html"))


def _check_device(device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")


def register(app: typer.Typer) -> None:
    """Add ``feedrank lab`` to the root app."""
    app.command("lab")(lab_command)
