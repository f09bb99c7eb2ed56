"""`feedrank ingest` commands (placeholder being filled in)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
