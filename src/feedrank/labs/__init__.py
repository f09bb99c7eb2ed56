"""The labs: measured PyTorch tradeoffs on feedrank's own models and data (``feedrank lab``).

Each lab is a module ``feedrank.labs.<name>`` with ``NAME``, ``TITLE`` and ``run(ctx) -> LabResult``
(the contract is ``feedrank.labs.base``). This package is the registry: the labs in the order the
page shows them, imported only when run (a lab pulls in what it measures: the trainer, the serving
pipeline, torch.compile), and ``run_lab`` / ``run_all``, which time each lab, write its
``result.json``, print its tables and rebuild ``OUT/index.html``.

A name outside the registry, or a registered lab whose module is missing, is an error naming the
known labs: ``all`` resolves every module before it runs any, and never skips one.

Example::

    from feedrank.labs import run_all
    results = run_all(Path("runs/labs"), quick=True)      # every lab, then runs/labs/index.html
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from feedrank.labs.base import LabContext, LabResult, Table, write_result

LABS: tuple[str, ...] = ("attention", "checkpointing", "precision", "compile", "ddp", "profile", "quantize")


class UnknownLabError(ValueError):
    """A lab name that is not registered, or whose module does not exist."""


def load_lab(name: str) -> ModuleType:
    """The module of lab ``name``, checked to follow the contract (``NAME``, ``TITLE``, ``run``)."""
    if name not in LABS:
        raise UnknownLabError(f"unknown lab {name!r}; known: {', '.join(LABS)}")
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the lab exists but something it imports does not: that error is the useful one
        raise UnknownLabError(f"unknown lab {name!r}: {module_name} does not exist; known: {', '.join(LABS)}") from exc
    missing = [attr for attr in ("NAME", "TITLE", "run") if not hasattr(module, attr)]
    if missing or module.NAME != name:
        raise UnknownLabError(f"{module_name} does not follow the lab contract (NAME == {name!r}, TITLE, run): "
                              f"missing {missing or ['a matching NAME']}")  # fmt: skip
    return module


def resolve(names: Sequence[str]) -> list[str]:
    """Lab names from the command line: ``all`` is every registered lab, in order; duplicates dropped."""
    expanded = [lab for name in names for lab in (LABS if name == "all" else (name,))]
    return list(dict.fromkeys(expanded))


def print_result(result: LabResult, console=None) -> None:
    """The lab's tables and summary on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console()
    console.rule(f"{result.name}: {result.title}")
    for table in result.tables:
        rich = RichTable(title=table.title)
        for column in table.columns:
            rich.add_column(str(column))
        for row in table.rows:
            rich.add_row(*(format_cell(cell) for cell in row))
        console.print(rich)
    console.print(result.summary)


def format_cell(value: object) -> str:
    """A table cell as text: floats to 4 significant digits, the rest as str."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def run_lab(name: str, ctx: LabContext, console=None) -> LabResult:
    """Run one lab: time it, check its plots exist, write ``result.json``, print, rebuild the page."""
    from feedrank.labs.page import build_page

    module = load_lab(name)
    if ctx.name != name:
        raise ValueError(f"the context is for lab {ctx.name!r}, not {name!r}")
    start = time.perf_counter()
    result: LabResult = module.run(ctx)
    result.elapsed_s = round(time.perf_counter() - start, 2)
    result.device, result.quick = ctx.device, ctx.quick
    if result.name != name:
        raise ValueError(f"lab {name!r} returned a result named {result.name!r}")
    absent = [plot for plot in result.plots if not (ctx.out / plot).is_file()]
    if absent:
        raise ValueError(f"lab {name!r} names plots it did not write to {ctx.out}: {absent}")
    write_result(ctx, result)
    print_result(result, console)
    build_page(ctx.root)
    return result


def run_all(
    root: Path,
    names: Sequence[str] = ("all",),
    *,
    log: Path | None = None,
    device: str = "cpu",
    quick: bool = False,
    seed: int = 0,
    tiny: bool = False,
    threads: int | None = None,
    console=None,
) -> list[LabResult]:
    """Run ``names`` (``all`` = every lab) into ``root``; every module is loaded before any lab runs,
    so a missing one fails at once rather than after the others. The first failing lab stops the run.

    ``threads``: torch intra-op threads for the run (None: torch's default, one per core). On a
    machine other jobs share, 1 gives honest timings: spinning OpenMP threads that wait for a
    descheduled peer inflated a 4-layer encoder step 100x on a loaded 2-core machine."""
    labs = resolve(names)
    for name in labs:
        load_lab(name)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    results = []
    for name in labs:
        ctx = LabContext(root=Path(root), name=name, log=log, device=device, quick=quick, seed=seed, tiny=tiny)
        results.append(run_lab(name, ctx, console))
    return results


__all__ = ["LABS", "LabContext", "LabResult", "Table", "UnknownLabError", "load_lab", "resolve", "run_all", "run_lab"]
