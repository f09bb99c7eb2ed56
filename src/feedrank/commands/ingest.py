"""`feedrank ingest`, `feedrank validate` and `feedrank datasets download`: thin shells over
``feedrank.data.readers``, ``feedrank.data.ingest`` and ``feedrank.data.datasets``.

Exit codes: 0 success; 1 the data was read but some day partitions were refused (or a log is
invalid); 2 the input could not be read (missing file, bad row, bad mapping, failed download).

Example::

    feedrank datasets download movielens-100k --dest data/raw
    feedrank ingest movielens data/raw/ml-100k --out data/logs/ml-100k
    feedrank ingest mind data/raw/MINDsmall_train data/raw/MINDsmall_dev --out data/logs/mind-small
    feedrank ingest tabular events.csv --out data/logs/mine --map user_id=uid --map ts=event_time
    feedrank validate data/logs/ml-100k
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from feedrank.config import ConfigError, load_yaml
from feedrank.data.datasets import DATASETS, DownloadError, download
from feedrank.data.ingest import ingest, validate_log
from feedrank.data.readers import READERS, ColumnMap, combine, read

Format = Enum("Format", {name: name for name in READERS}, type=str)
DatasetName = Enum("DatasetName", {name: name for name in DATASETS}, type=str)

_INPUT_ERRORS = (ValueError, FileNotFoundError, ConfigError, DownloadError)


def ingest_command(
    fmt: Format = typer.Argument(..., metavar="FORMAT", help="Source format."),
    paths: list[Path] = typer.Argument(
        ..., metavar="PATH...", help="Dataset folder(s) (tabular: file(s)); several are combined (MIND train + dev)."
    ),
    out: Path = typer.Option(..., "--out", help="Log directory to write (created; days already there are replaced)."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip and count malformed rows instead of stopping at the first."
    ),
    maps: list[str] = typer.Option([], "--map", help="tabular: canonical=source column, repeatable (user_id=uid)."),
    map_file: Path | None = typer.Option(None, "--map-file", help="tabular: YAML file with the column mapping."),
    check: bool = typer.Option(True, "--validate/--no-validate", help="Refuse day partitions that fail schema validation."),
) -> None:
    """Read a dataset and write it as a canonical, day-partitioned event log with a manifest."""
    try:
        columns = _column_map(fmt.value, maps, map_file)
        result = combine([read(fmt.value, p, skip_bad_rows=skip_bad_rows, columns=columns) for p in paths])
        done = ingest(result, out, validate=check, progress=True)
    except _INPUT_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    m = done.manifest
    typer.echo(
        f"{m['rows_written']}/{m['rows_read']} rows, {m['users']} users, {m['items_in_events']} items "
        f"({m['items_in_catalogue']} in catalogue), {len(m['days'])} day(s) written, "
        f"{m['skipped_rows']} bad row(s) skipped -> {out}"
    )
    if m["replaced_days"]:
        typer.echo(f"replaced existing day(s): {', '.join(m['replaced_days'])}")
    for day, report in sorted(done.write.refused.items()):
        typer.echo(f"REFUSED day {day}: {report}", err=True)
    typer.echo(f"manifest: {done.manifest_path}")
    if not done.ok:
        raise typer.Exit(1)


def _column_map(fmt: str, maps: list[str], map_file: Path | None) -> ColumnMap | None:
    if not maps and map_file is None:
        return None
    if fmt != "tabular":
        raise ValueError("--map/--map-file apply to the tabular format only")
    if map_file is not None and maps:
        raise ValueError("give the column mapping with --map or --map-file, not both")
    return load_yaml(ColumnMap, map_file) if map_file is not None else ColumnMap.from_pairs(maps)


def validate_command(log_dir: Path = typer.Argument(..., help="Event log directory.")) -> None:
    """Validate every day partition of an event log; exit 1 when any is invalid."""
    try:
        reports = validate_log(log_dir)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for day, report in reports.items():
        typer.echo(f"{day}: {report}")
    bad = [day for day, report in reports.items() if not report.ok]
    typer.echo(f"{len(reports) - len(bad)}/{len(reports)} day(s) valid")
    if bad:
        raise typer.Exit(1)


datasets_app = typer.Typer(help="Public datasets: download, verify, unpack.", no_args_is_help=True)


@datasets_app.command("download")
def download_command(
    name: DatasetName = typer.Argument(..., help="Dataset to fetch."),
    dest: Path = typer.Option(..., "--dest", help="Folder for the archives and the unpacked files."),
    base_url: str | None = typer.Option(None, "--base-url", help="Mirror to fetch from instead of the official location."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the server before giving up."),
) -> None:
    """Download NAME's official archive(s), check the checksum, unpack into DEST."""
    try:
        folders = download(name.value, dest, base_url=base_url, timeout=timeout, progress=True)
    except DownloadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for folder in folders:
        typer.echo(f"unpacked {folder}")
    typer.echo(f"next: feedrank ingest {DATASETS[name.value].ingest_format} {' '.join(map(str, folders))} --out <log dir>")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.command("ingest")(ingest_command)
    app.command("validate")(validate_command)
    app.add_typer(datasets_app, name="datasets")
