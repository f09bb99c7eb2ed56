"""`feedrank index build|check`: thin shells over ``feedrank.index``.

Exit codes: 0 done (build: published; check: recall above the floor and no rebuild due); 1 action
needed (build: the recall gate refused the index, nothing written; check: recall below the floor or
a rebuild is due); 2 the input could not be used (missing file, bad vectors or ids, bad config).

Example::

    feedrank index build item_vecs.npy --ids item_ids.txt --kind hnsw --out artifacts/index \\
        --model-version two_tower@3 --queries user_vecs.npy
    feedrank index check artifacts/index --queries 500
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional, get_args

import typer

from feedrank.config import ConfigError, load_yaml, to_dict
from feedrank.index.config import IndexConfig, IndexKind

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

Kind = Enum("Kind", {k: k for k in get_args(IndexKind)}, type=str)

index_app = typer.Typer(help="Build, publish and check the FAISS item index.", no_args_is_help=True)

_INPUT_ERRORS = (ValueError, OSError, ConfigError)


def register(app: typer.Typer) -> None:
    """Add this group's commands to the root app."""
    app.add_typer(index_app, name="index")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def read_vectors(path: Path) -> np.ndarray:
    """A ``.npy`` array of vectors, memory-mapped (shape and values are checked by the index itself).

    Memory-mapped so a 10M-row file is paged in by FAISS's chunked ``add`` instead of read whole;
    a float32 file is used in place, other dtypes are converted (a full copy) by the index.
    """
    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a readable .npy array: {exc}") from exc


ID_CHUNK = 1 << 20  # ids read (and checked) a million at a time


def read_item_ids(path: Path, chunk_rows: int | None = None) -> pa.ChunkedArray:
    """Item ids from a ``.txt`` file (one per line) or a ``.parquet`` file (string column ``item_id``).

    Read ``chunk_rows`` (default ``ID_CHUNK``) at a time into one Arrow string array (~13 B an id
    at 10M), never a list of Python strings: the index turns it into its own array of ids once
    (``check_ids``), so a 10M-item build holds one copy of the ids as Python objects, not two.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunk_rows = chunk_rows or ID_CHUNK
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".txt":
        return pa.chunked_array(_txt_id_chunks(path, chunk_rows), pa.string())
    if path.suffix == ".parquet":
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        if "item_id" not in names:
            raise ValueError(f"{path}: no column 'item_id' (columns: {', '.join(names)})")
        kind = file.schema_arrow.field("item_id").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: column item_id is {kind}, item ids must be strings")
        chunks, start = [], 0
        for batch in file.iter_batches(batch_size=chunk_rows, columns=["item_id"]):
            column = batch.column(0)
            if column.null_count:
                first = start + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"{path}: item_id has null(s), first at row {first}")
            chunks.append(column)
            start += len(column)
        return pa.chunked_array(chunks, kind)
    raise ValueError(f"{path}: item ids must be a .txt or .parquet file")


def _txt_id_chunks(path: Path, chunk_rows: int) -> list[pa.Array]:
    """The lines of ``path`` as Arrow string arrays of ``chunk_rows`` lines; a blank line is an error."""
    import pyarrow as pa

    chunks, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line[:-1] if line.endswith("\n") else line
            if not line.strip():
                raise ValueError(f"{path}: line {number} is blank; one item id per line")
            lines.append(line)
            if len(lines) == chunk_rows:
                chunks.append(pa.array(lines, pa.string()))
                lines = []
    if lines or not chunks:
        chunks.append(pa.array(lines, pa.string()))
    return chunks


@index_app.command("build")
def build_command(
    vectors: Path = typer.Argument(..., metavar="VECTORS.npy", help="Item vectors, (n, dim) float32, one row per item."),
    ids: Path = typer.Option(..., "--ids", help="Item ids in row order: .txt (one per line) or .parquet (column item_id)."),
    out: Path = typer.Option(..., "--out", help="Index directory to publish to (replaced atomically)."),
    kind: Optional[Kind] = typer.Option(None, "--kind", help="flat | ivf | ivfpq | hnsw (overrides the config)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with an 'index' section (IndexConfig)."),
    model_version: str = typer.Option("unknown", "--model-version", help="The model that made the vectors."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="User vectors .npy for the recall gate (default: the item vectors)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Build an index over item vectors and publish it if its recall reaches the floor."""
    from feedrank.index.store import RecallBelowFloorError, build_and_publish

    try:
        cfg = IndexConfig() if config is None else load_yaml(IndexConfig, config, section="index")
        cfg = cfg if kind is None else replace(cfg, kind=kind.value)
        manifest = build_and_publish(
            read_vectors(vectors),
            read_item_ids(ids),
            out,
            cfg,
            model_version=model_version,
            queries=None if queries is None else read_vectors(queries),
        )
    except RecallBelowFloorError as exc:
        raise _fail(str(exc), code=1) from exc
    except _INPUT_ERRORS as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(to_dict(manifest), indent=2))
    else:
        typer.echo(
            f"published {manifest.config.kind} index of {manifest.count:,} items (dim {manifest.dim}) -> {out}: "
            f"recall@{manifest.recall_k} {manifest.recall:.4f} on {manifest.recall_queries} queries, "
            f"built in {manifest.build_seconds:.1f} s"
        )


@index_app.command("check")
def check_command(
    directory: Path = typer.Argument(..., metavar="DIR", help="A published index directory."),
    queries: int = typer.Option(1000, "--queries", min=1, help="How many queries to measure recall on."),
    query_vectors: Optional[Path] = typer.Option(None, "--query-vectors", help="User vectors .npy to sample queries from (default: the item vectors)."),
    fresh: Optional[int] = typer.Option(None, "--fresh", min=0, help="Items new since the build (default: those already added to the index)."),
    model_version: Optional[str] = typer.Option(None, "--model-version", help="The model now serving; a different one forces a rebuild."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Load an index, verify its files, re-measure recall and say whether it needs a rebuild."""
    from feedrank.index.policy import needs_rebuild
    from feedrank.index.store import check_recall, load_index, read_manifest

    try:
        manifest = read_manifest(directory)
        index = load_index(directory)
        cfg = replace(manifest.config, recall_sample=queries)
        sample = index.vectors() if query_vectors is None else read_vectors(query_vectors)
        recall = check_recall(index, sample, cfg)
        n_fresh = manifest.fresh_count if fresh is None else fresh
        rebuild, reason = needs_rebuild(manifest, datetime.now(timezone.utc), n_fresh, cfg.rebuild, model_version)
    except _INPUT_ERRORS as exc:
        raise _fail(str(exc)) from exc
    low = recall.value < cfg.recall_floor
    if as_json:
        result = {"manifest": to_dict(manifest), "recall": to_dict(recall), "recall_ok": not low,
                  "rebuild": rebuild, "reason": reason}
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"{directory}: {cfg.kind} index, {manifest.count:,} items (dim {manifest.dim}, "
            f"{manifest.fresh_count} fresh), model {manifest.model_version!r}, built {manifest.built_at}"
        )
        typer.echo(f"params: {json.dumps({k: v for k, v in to_dict(cfg).items() if k != 'rebuild'})}")
        typer.echo(
            f"recall@{recall.k}: {recall.value:.4f} on {recall.queries} queries "
            f"(at publish: {manifest.recall}; floor {cfg.recall_floor}){'  BELOW FLOOR' if low else ''}"
        )
        typer.echo(f"rebuild: {'YES' if rebuild else 'no'} - {reason}")
    if low or rebuild:
        raise typer.Exit(1)
