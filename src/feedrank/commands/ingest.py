"""`feedrank ingest FORMAT`, `feedrank validate` and `feedrank datasets download`: thin shells over
``feedrank.data.readers``, ``feedrank.data.ingest`` and ``feedrank.data.datasets``.

Each format is its own sub-command with its own help (expected files, format options):
``feedrank ingest mind --help``. Exit codes: 0 success; 1 the data was read but some day
partitions were refused (or a log is invalid); 2 the input could not be read (missing file, bad
row, bad mapping, the same source twice, failed download).

Example::

    feedrank datasets download movielens-100k --dest data/raw
    feedrank ingest movielens data/raw/ml-100k --out data/logs/ml-100k
    feedrank ingest mind data/raw/MINDsmall_train data/raw/MINDsmall_dev --out data/logs/mind-small
    feedrank ingest tabular events.csv --out data/logs/mine --map user_id=uid --map ts=event_time --dedupe
    feedrank validate data/logs/ml-100k
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from feedrank.data.datasets import DATASETS

if TYPE_CHECKING:
    from feedrank.data.readers import ColumnMap

DatasetName = Enum("DatasetName", {name: name for name in DATASETS}, type=str)

ingest_app = typer.Typer(
    help="Read a dataset and write it as a canonical, day-partitioned event log with a manifest "
    "(`feedrank ingest FORMAT --help`: the files each format expects).",
    no_args_is_help=True,
)

_OUT_HELP = "Log directory to write (created; days already there are replaced)."
_SKIP_HELP = "Skip and count malformed rows instead of stopping at the first."
_VALIDATE_HELP = ("Refuse day partitions that fail schema validation (default). --no-validate writes every day "
                  "unchecked: faster, but `feedrank validate` may then fail it; the manifest says validated: false.")  # fmt: skip
_DEDUPE_HELP = ("Keep the first of rows repeating (request_id, user_id, item_id, ts) and count the rest, "
                "instead of refusing their day.")  # fmt: skip

#: Per format: the help of its PATH argument and of the command (what the files must look like).
FORMATS: dict[str, tuple[str, str]] = {
    "mind": (
        "MIND split folder(s), e.g. MINDsmall_train MINDsmall_dev (combined into one log).",
        """Ingest MIND (Microsoft News Dataset) split folders.

        Each folder holds behaviors.tsv (impression_id, user_id, time as 11/15/2019 8:55:22 AM,
        history: space-separated news ids, impressions: N123-1 N456-0 tokens, 1 = clicked) and
        news.tsv (news_id, category, subcategory, title, abstract, url, title_entities,
        abstract_entities), tab-separated, no header. Titles and abstracts are kept (an empty
        abstract is null). Request ids are prefixed by the folder name
        (folders sharing a name by their distinct path suffix). News ids that news.tsv lacks are
        kept as items without metadata and counted. The test split (no click labels) is not
        supported.
        """,
    ),
    "movielens": (
        "MovieLens folder(s): 100K, 1M or RecBole atomic files (the layout is detected).",
        """Ingest MovieLens ratings (every rating is one clicked row, the rating kept).

        Layouts: 100K (u.data, u.item, u.user), 1M (ratings.dat, movies.dat, users.dat) or
        RecBole atomic files (<name>.inter with a typed header, plus <name>.item and <name>.user
        when present). `feedrank datasets download movielens-100k` fetches one.
        """,
    ),
    "ebnerd": (
        "EB-NeRD split folder(s), e.g. ebnerd_small/train ebnerd_small/validation.",
        """Ingest EB-NeRD (Ekstra Bladet) split folders.

        Each folder holds behaviors.parquet and history.parquet (official column names);
        articles.parquet sits in the folder or in its parent, as in the official zips; its
        subtitle, when present, is kept as the abstract. Timestamps without a zone are read as UTC.
        """,
    ),
}

_TABULAR_HELP = """Ingest your own CSV / TSV / Parquet event table(s) through a column mapping.

    Canonical columns: user_id, item_id, ts (required); request_id, position, clicked, dwell_s,
    shared, hidden, publisher, item_type, created_ts, title, abstract, category, age_bucket,
    country, rating, scroll_pct. Map each to your column with --map canonical=source (repeatable) or a
    YAML --map-file; an unmapped column is taken from a source column of the same name.
    Timestamps: unix seconds or ISO 8601 (no zone = UTC); booleans: true/false, 1/0, yes/no.
    Without request_id each (user, ts) pair is one request.
    """


def _paragraphs(text: str) -> str:
    """Help text with each paragraph on one line, so the terminal's width wraps it, not the source's."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _format_command(fmt: str, path_help: str, doc: str) -> Callable[..., None]:
    """The ``feedrank ingest <fmt>`` command: the options every format shares, and its own help."""

    def command(
        paths: list[Path] = typer.Argument(..., metavar="PATH...", help=path_help),
        out: Path = typer.Option(..., "--out", help=_OUT_HELP),
        skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help=_SKIP_HELP),
        dedupe: bool = typer.Option(False, "--dedupe", help=_DEDUPE_HELP),
        check: bool = typer.Option(True, "--validate/--no-validate", help=_VALIDATE_HELP),
    ) -> None:
        run_ingest(fmt, paths, out, skip_bad_rows=skip_bad_rows, dedupe=dedupe, check=check)

    command.__doc__ = _paragraphs(doc)
    command.__name__ = f"ingest_{fmt}"
    return command


for _fmt, (_path_help, _doc) in FORMATS.items():
    ingest_app.command(_fmt)(_format_command(_fmt, _path_help, _doc))


@ingest_app.command("tabular", help=_paragraphs(_TABULAR_HELP))
def tabular_command(
    paths: list[Path] = typer.Argument(..., metavar="FILE...", help="Event table(s): .csv, .tsv or .parquet."),
    out: Path = typer.Option(..., "--out", help=_OUT_HELP),
    maps: list[str] = typer.Option([], "--map", help="canonical=source column, repeatable (user_id=uid)."),
    map_file: Path | None = typer.Option(None, "--map-file", help="YAML file with the column mapping."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help=_SKIP_HELP),
    dedupe: bool = typer.Option(False, "--dedupe", help=_DEDUPE_HELP),
    check: bool = typer.Option(True, "--validate/--no-validate", help=_VALIDATE_HELP),
) -> None:
    run_ingest("tabular", paths, out, skip_bad_rows=skip_bad_rows, dedupe=dedupe, check=check,
               columns=lambda: _column_map(maps, map_file))  # fmt: skip


def run_ingest(
    fmt: str,
    paths: list[Path],
    out: Path,
    skip_bad_rows: bool,
    dedupe: bool,
    check: bool,
    columns: Callable[[], ColumnMap | None] = lambda: None,
) -> None:
    """Read ``paths``, write the log, print what was done; exit 2 on unreadable input, 1 on refused days."""
    from feedrank.config import ConfigError
    from feedrank.data.ingest import DUPLICATE_KEY, ingest
    from feedrank.data.readers import read_many

    try:
        result = read_many(fmt, paths, skip_bad_rows=skip_bad_rows, columns=columns())
        done = ingest(result, out, validate=check, dedupe=dedupe, progress=True)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    r, m = done.run, done.manifest
    typer.echo(
        f"{r['rows_written']}/{r['rows_read']} rows, {r['users']} users, {r['items_in_events']} items, "
        f"{len(r['days_written'])} day(s) written, {r['skipped_rows']} bad row(s) skipped -> {out}"
    )
    if r["items_without_metadata"]:
        typer.echo(f"{r['items_without_metadata']} item(s) without metadata (in events, not in the catalogue; "
                   f"{r['rows_without_item_metadata']} rows), e.g. {', '.join(r['items_without_metadata_examples'])}")  # fmt: skip
    if dedupe:
        typer.echo(f"{r['duplicates_dropped']} duplicate row(s) dropped (same {', '.join(DUPLICATE_KEY)}; first kept)")
    if r["replaced_days"]:
        typer.echo(f"replaced existing day(s): {', '.join(r['replaced_days'])}")
    if not check:
        typer.echo(f"days written without validation: check them with `feedrank validate {out}`")
    for day, report in sorted(done.write.refused.items()):
        typer.echo(f"REFUSED day {day}: {report}", err=True)
    if any(v.rule.startswith("duplicate row") for report in done.write.refused.values() for v in report.violations):
        typer.echo("duplicate rows refuse their day: rerun with --dedupe to keep the first of each", err=True)
    typer.echo(f"log now: {len(m['days'])} day(s), {m['rows']} rows, {m['items_in_catalogue']} items in the catalogue")
    typer.echo(f"manifest: {done.manifest_path}")
    if not done.ok:
        raise typer.Exit(1)


def _column_map(maps: list[str], map_file: Path | None) -> ColumnMap | None:
    from feedrank.config import load_yaml
    from feedrank.data.readers import ColumnMap

    if not maps and map_file is None:
        return None
    if map_file is not None and maps:
        raise ValueError("give the column mapping with --map or --map-file, not both")
    return load_yaml(ColumnMap, map_file) if map_file is not None else ColumnMap.from_pairs(maps)


def validate_command(log_dir: Path = typer.Argument(..., help="Event log directory.")) -> None:
    """Validate every day partition of an event log; exit 1 when any is invalid."""
    from feedrank.data.ingest import validate_log

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
    from feedrank.data.datasets import DownloadError, download

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
    app.add_typer(ingest_app, name="ingest")
    app.command("validate")(validate_command)
    app.add_typer(datasets_app, name="datasets")
