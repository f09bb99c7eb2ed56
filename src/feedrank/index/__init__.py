"""Approximate nearest-neighbour item index (FAISS): build, search, recall gate, save/load, rebuild policy.

``build_and_publish`` is the whole offline job (embed the catalogue elsewhere, hand the vectors
here); serving calls ``load_index`` then ``ItemIndex.search``.
"""

from feedrank.index.build import IndexInputError, ItemIndex, build_index
from feedrank.index.config import IndexConfig, RebuildPolicy
from feedrank.index.policy import needs_rebuild
from feedrank.index.recall import measure_recall
from feedrank.index.store import (
    IndexFileError,
    IndexManifest,
    RecallBelowFloorError,
    build_and_publish,
    check_recall,
    load_index,
    publish,
    read_manifest,
    save_index,
)

__all__ = [
    "IndexConfig",
    "IndexFileError",
    "IndexInputError",
    "IndexManifest",
    "ItemIndex",
    "RebuildPolicy",
    "RecallBelowFloorError",
    "build_and_publish",
    "build_index",
    "check_recall",
    "load_index",
    "measure_recall",
    "needs_rebuild",
    "publish",
    "read_manifest",
    "save_index",
]
