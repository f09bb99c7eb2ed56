"""Saving, loading and publishing an item index as a directory with a manifest.

Layout of an index directory::

    INDEX_DIR/
      index.faiss        the FAISS index (faiss.write_index)
      item_ids.parquet   one string column ``item_id``: the catalogue id of each index position
      manifest.json      what the files are (sha256), which model made the vectors, how it was
                         built, its measured recall and how many fresh items were added since

A save writes everything into a hidden sibling folder, then swaps it in with two renames, so a
reader never sees a half-written index and a failed save leaves the previous index untouched.
(Between the two renames the directory is briefly absent; a loader that races a publish gets a
clear "not found" and retries.) ``publish`` adds the quality gate: it refuses, writing nothing,
when recall@k against exact search is below ``recall_floor``.

Example::

    manifest = build_and_publish(item_vectors, item_ids, "artifacts/index", IndexConfig(),
                                 model_version="two_tower@3", queries=user_vectors)
    index = load_index("artifacts/index")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrank.config import ConfigError, from_dict, to_dict
from feedrank.fsutil import sha256_file, staged_dir
from feedrank.index.build import ItemIndex, apply_search_params, build_index, check_ids
from feedrank.index.config import IndexConfig
from feedrank.index.recall import measure_recall, sample_queries

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.parquet"
MANIFEST_FILE = "manifest.json"

_FAISS_CLASSES = {"flat": faiss.IndexFlat, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.IndexIVFPQ, "hnsw": faiss.IndexHNSW}


class IndexFileError(ValueError):
    """An index directory is missing, incomplete or does not match its manifest."""


class RecallBelowFloorError(ValueError):
    """``publish`` refused an index whose measured recall is under the configured floor."""


@dataclass
class IndexManifest:
    """The ``manifest.json`` of an index directory (parsed strictly: unknown keys fail).

    ``config`` holds the kind and every build/search parameter; ``files`` maps file name to sha256.
    """

    format_version: int
    model_version: str
    dim: int
    count: int
    fresh_count: int
    built_at: str
    build_seconds: float
    saved_at: str
    recall: float | None
    recall_k: int | None
    recall_queries: int | None
    config: IndexConfig
    files: dict[str, str]

    @property
    def built_at_datetime(self) -> datetime:
        return datetime.fromisoformat(self.built_at)


@dataclass(frozen=True)
class RecallCheck:
    """A recall measurement recorded in the manifest: recall@``k`` over ``queries`` queries."""

    value: float
    k: int
    queries: int


def save_index(index: ItemIndex, directory: str | Path, recall: RecallCheck | None = None) -> IndexManifest:
    """Write ``index`` to ``directory`` atomically (replacing an index already there) and return its manifest."""
    directory = Path(directory)
    if directory.exists() and not (directory / MANIFEST_FILE).is_file() and any(directory.iterdir()):
        raise IndexFileError(f"refusing to replace {directory}: it is not an index directory (no {MANIFEST_FILE})")
    with staged_dir(directory) as tmp:
        faiss.write_index(index.faiss_index, str(tmp / INDEX_FILE))
        pq.write_table(pa.table({"item_id": pa.array(index.item_ids, pa.string())}), tmp / IDS_FILE)
        manifest = IndexManifest(
            format_version=FORMAT_VERSION,
            model_version=index.model_version,
            dim=index.dim,
            count=index.size,
            fresh_count=index.fresh_count,
            built_at=index.built_at.isoformat(),
            build_seconds=index.build_seconds,
            saved_at=datetime.now(timezone.utc).isoformat(),
            recall=None if recall is None else recall.value,
            recall_k=None if recall is None else recall.k,
            recall_queries=None if recall is None else recall.queries,
            config=index.cfg,
            files={name: sha256_file(tmp / name) for name in (INDEX_FILE, IDS_FILE)},
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(to_dict(manifest), indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> IndexManifest:
    """The manifest of an index directory, or ``IndexFileError`` naming what is wrong with it."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise IndexFileError(f"{path} not found: {directory} is not a saved index")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexFileError(f"{path}: not valid JSON: {exc}") from exc
    try:
        manifest = from_dict(IndexManifest, data, "manifest")
    except ConfigError as exc:
        raise IndexFileError(f"{path}: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise IndexFileError(f"{path}: format_version {manifest.format_version}, this code reads {FORMAT_VERSION}")
    return manifest


def load_index(directory: str | Path) -> ItemIndex:
    """Load a saved index, checking every file against the manifest (checksums, count, dim, kind)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name in (INDEX_FILE, IDS_FILE):
        path = directory / name
        if not path.is_file():
            raise IndexFileError(f"{path} is missing (listed in {MANIFEST_FILE})")
        if manifest.files.get(name) != sha256_file(path):
            raise IndexFileError(f"{path} does not match the sha256 in {MANIFEST_FILE} (changed or corrupt)")
    faiss_index = faiss.read_index(str(directory / INDEX_FILE))
    item_ids = pq.read_table(directory / IDS_FILE).column("item_id")  # Arrow: check_ids makes the one Python copy
    problems = [
        f"{what}: manifest says {expected}, files have {actual}"
        for what, expected, actual in (
            ("item count", manifest.count, faiss_index.ntotal),
            ("id count", manifest.count, len(item_ids)),
            ("dim", manifest.dim, faiss_index.d),
        )
        if expected != actual
    ]
    expected_class = faiss.IndexRefine if manifest.config.refine_k_factor else _FAISS_CLASSES[manifest.config.kind]
    if not isinstance(faiss_index, expected_class):
        problems.append(f"kind: manifest says {manifest.config.kind}, {INDEX_FILE} holds {type(faiss_index).__name__}")
    if problems:
        raise IndexFileError(f"{directory}: " + "; ".join(problems))
    apply_search_params(faiss_index, manifest.config)
    return ItemIndex(
        faiss_index=faiss_index,
        item_ids=check_ids(item_ids, manifest.count, f"{directory / IDS_FILE}"),
        cfg=manifest.config,
        model_version=manifest.model_version,
        built_at=manifest.built_at_datetime,
        build_seconds=manifest.build_seconds,
        fresh_count=manifest.fresh_count,
    )


def check_recall(index: ItemIndex, queries: np.ndarray, cfg: IndexConfig, vectors: np.ndarray | None = None) -> RecallCheck:
    """recall@``cfg.recall_k`` (capped at the catalogue size) on up to ``cfg.recall_sample`` queries.

    ``vectors`` are the raw indexed rows for the exact ground truth; None reads them back from the
    index (not possible for IVF-PQ, whose codes are lossy).
    """
    sample = sample_queries(queries, cfg.recall_sample, cfg.seed)
    k = min(cfg.recall_k, index.size)
    truth = index.vectors() if vectors is None else vectors
    return RecallCheck(measure_recall(index, truth, sample, k), k, sample.shape[0])


def publish(
    index: ItemIndex, directory: str | Path, cfg: IndexConfig, queries: np.ndarray, vectors: np.ndarray | None = None
) -> IndexManifest:
    """Save ``index`` to ``directory`` only if its recall on ``queries`` reaches ``cfg.recall_floor``.

    ``queries`` should be real user vectors (a sample of them is used); below the floor this raises
    ``RecallBelowFloorError`` and writes nothing, so the index already published there keeps serving.
    """
    recall = check_recall(index, queries, cfg, vectors)
    if recall.value < cfg.recall_floor:
        raise RecallBelowFloorError(
            f"recall@{recall.k} = {recall.value:.4f} on {recall.queries} queries is below the floor "
            f"{cfg.recall_floor} for this {cfg.kind} index; {directory} left unchanged "
            f"(raise nprobe/ef_search or build a flat index)"
        )
    return save_index(index, directory, recall)


def build_and_publish(
    vectors: np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    directory: str | Path,
    cfg: IndexConfig,
    model_version: str = "unknown",
    queries: np.ndarray | None = None,
) -> IndexManifest:
    """Build an index over a catalogue's vectors and publish it behind the recall gate.

    Without ``queries`` the gate uses the item vectors themselves as queries: a proxy for user
    vectors that lives in the same space, slightly optimistic because each item finds itself.
    """
    index = build_index(vectors, item_ids, cfg, model_version)
    return publish(index, directory, cfg, vectors if queries is None else queries, vectors)
