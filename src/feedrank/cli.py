"""The ``feedrank`` command line: one typer app; command groups live in ``feedrank.commands``.

Every group module is cheap to import (its heavy imports, torch, pyarrow, FastAPI, live inside
the command functions), so ``feedrank --help`` and light commands start fast, and so does each
``feedrank serve --workers N`` worker, which re-imports this module when it is spawned.
``tests/test_cli_startup.py`` checks that importing this module pulls in none of them.

A new group is one more name in ``COMMAND_GROUPS``: a module ``feedrank.commands.<name>`` with a
``register(app)`` function.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_GROUPS = (
    "simulate",
    "ingest",
    "features",
    "train",
    "evaluate",
    "report",
    "index",
    "serve",
    "experiment",
    "demo",
    "lab",
)

app = typer.Typer(
    name="feedrank",
    help="feedrank: simulate or ingest feed logs, train, evaluate, index, serve, experiment and measure (labs).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Keeps ``feedrank`` a command group even while only one command is registered."""


for _name in COMMAND_GROUPS:
    importlib.import_module(f"feedrank.commands.{_name}").register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
