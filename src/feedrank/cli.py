"""The ``feedrank`` command line: one typer app; command groups live in ``feedrank.commands``."""

from __future__ import annotations

import typer

from feedrank.commands import demo, evaluate, experiment, features, index, ingest, lab, report, serve, simulate, train

app = typer.Typer(
    name="feedrank",
    help="feedrank: simulate or ingest feed logs, train, evaluate, index, serve and experiment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Keeps ``feedrank`` a command group even while only one command is registered."""


for group in (simulate, ingest, features, train, evaluate, report, index, serve, experiment, demo, lab):
    group.register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
