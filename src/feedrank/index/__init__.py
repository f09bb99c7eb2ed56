"""Approximate nearest-neighbour item index (FAISS): build, search, recall gate, save/load, rebuild policy.

``build_and_publish`` is the whole offline job (embed the catalogue elsewhere, hand the vectors
here); serving calls ``load_index`` then ``ItemIndex.search``. The names below are imported on
first use, so ``feedrank.index.config`` (the typed settings, which the CLI needs for ``--help``)
loads without FAISS.
"""

from feedrank._lazy import lazy_exports

_EXPORTS = {
    "IndexConfig": "config",
    "RebuildPolicy": "config",
    "IndexInputError": "build",
    "ItemIndex": "build",
    "build_index": "build",
    "needs_rebuild": "policy",
    "measure_recall": "recall",
    "IndexFileError": "store",
    "IndexManifest": "store",
    "RecallBelowFloorError": "store",
    "build_and_publish": "store",
    "check_recall": "store",
    "load_index": "store",
    "publish": "store",
    "read_manifest": "store",
    "save_index": "store",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
