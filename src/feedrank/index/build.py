"""Build and search the FAISS item index that serves retrieval candidates.

The index stores item vectors under FAISS's own sequential ids (0..n-1, in the order added), and an
``item_ids`` array maps those positions back to catalogue ids; that is simpler than
``IndexIDMap2`` (FAISS ids must be int64 while catalogue ids are strings) and keeps ``search``
returning plain positions that index straight into any per-item array the caller holds.

Example::

    cfg = IndexConfig(kind="hnsw")
    index = build_index(item_vectors, item_ids, cfg, model_version="two_tower@3")
    scores, positions = index.search(user_vectors, k=100)
    candidates = index.item_ids[positions]        # (n_users, 100) catalogue ids

``search`` may release the GIL and is safe to call from several threads at once; ``add`` is not safe
concurrently with ``search`` (serving should add under a write lock or swap in a new index).
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.index.config import IndexConfig


class IndexInputError(ValueError):
    """Vectors, ids, queries or ``k`` handed to the index are unusable (the message says which and why)."""


def check_vectors(vectors: np.ndarray, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, d) array, or ``IndexInputError`` naming the problem.

    FAISS silently returns garbage neighbours for NaN/inf rows and crashes on a wrong dimension, so
    both are refused here with the first offending row.
    """
    array = np.asarray(vectors)
    if array.ndim != 2:
        raise IndexInputError(f"{name} must be a 2-D (n, dim) array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise IndexInputError(f"{name} is empty (0 rows)")
    if not np.issubdtype(array.dtype, np.floating):
        raise IndexInputError(f"{name} must hold floats, got dtype {array.dtype}")
    if dim is not None and array.shape[1] != dim:
        raise IndexInputError(f"{name} have dim {array.shape[1]}, the index has dim {dim}")
    array = np.ascontiguousarray(array, dtype=np.float32)  # a float32 memmap passes through uncopied
    bad_rows = []
    for begin in range(0, array.shape[0], CHECK_CHUNK):
        chunk = array[begin : begin + CHECK_CHUNK]
        bad_rows.append(begin + np.flatnonzero(~np.isfinite(chunk).all(axis=1)))
        release_pages(chunk)
    bad = np.concatenate(bad_rows)
    if bad.size:
        raise IndexInputError(f"{name} has {bad.size} row(s) with NaN or inf, first at row {bad[0]}")
    return array


CHECK_CHUNK = 1 << 20  # rows per finiteness check: a (chunk, dim) bool mask, not one for all 10M rows


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of ``array`` from this process's resident memory, if it is a C-contiguous view of
    a read-only memory map (``np.load(path, mmap_mode="r")``); otherwise do nothing.

    A pass over a memory-mapped catalogue leaves every page it read resident: file-backed and
    reclaimable, but counted in RSS beside the copy FAISS keeps of the same rows (2.4 GiB each at
    10M x 64). The chunked passes (the finiteness check, ``add``, the exact search) release each chunk
    behind them (``MADV_DONTNEED``: the page cache keeps the data, a later read maps it back), so the
    process holds one copy of the vectors. Writable and copy-on-write maps are left alone: dropping
    their pages could drop changes.
    """
    mm = array.base
    while mm is not None and not isinstance(mm, mmap.mmap):
        mm = getattr(mm, "base", None)
    if mm is None or not array.flags.c_contiguous or not hasattr(mm, "madvise"):
        return
    with memoryview(mm) as view:
        if not view.readonly:
            return
        start = array.ctypes.data - np.frombuffer(view, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, (start + array.nbytes) // page * page  # whole pages inside the rows
    if hi > lo:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def check_ids(item_ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray, n: int, name: str = "item_ids") -> np.ndarray:
    """``item_ids`` as an object array of ``n`` unique strings, or ``IndexInputError``.

    Arrow string arrays (what ``feedrank index build`` and ``load_index`` read, chunk by chunk) are
    checked in Arrow and turned into Python strings once: the returned array is the only copy of
    the ids as Python objects (~65 B an id), the Arrow input ~13 B an id.
    """
    if isinstance(item_ids, (pa.Array, pa.ChunkedArray)):
        if not (pa.types.is_string(item_ids.type) or pa.types.is_large_string(item_ids.type)):
            raise IndexInputError(f"{name} is an Arrow {item_ids.type} array, item ids must be strings")
        if len(item_ids) != n:
            raise IndexInputError(f"{name} has shape ({len(item_ids)},), expected ({n},) to match the vectors")
        strings, ids = item_ids, None
    else:
        ids = np.asarray(item_ids, dtype=object)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise IndexInputError(f"{name} has shape {ids.shape}, expected ({n},) to match the vectors")
        try:
            strings = pa.array(ids, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            strings = None
    if strings is None or strings.null_count:
        if ids is None:
            first = int(np.flatnonzero(strings.is_null().to_numpy(zero_copy_only=False))[0])
            raise IndexInputError(f"{name}[{first}] is None, item ids must be strings")
        first = next(i for i, v in enumerate(ids) if not isinstance(v, str))  # only on the error path
        raise IndexInputError(f"{name}[{first}] is {ids[first]!r}, item ids must be strings")
    empty = pc.equal(pc.utf8_length(strings), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        raise IndexInputError(f"{name}[{int(np.flatnonzero(empty)[0])}] is an empty string ({int(empty.sum())} in all)")
    counts = pc.value_counts(strings)
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dups):
        raise IndexInputError(f"{name} has {len(dups)} duplicated id(s), e.g. {_examples(dups.to_pylist())}")
    return strings.to_numpy(zero_copy_only=False)  # plain str objects, whatever string-likes came in


def _examples(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(str(i)) for i in ids[:n])


def check_k(k: int, n: int) -> None:
    """A top-k request must ask for at least one and at most all of the ``n`` indexed items."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise IndexInputError(f"k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= n:
        raise IndexInputError(f"k={k} is out of range: the index holds {n} item(s), so 1 <= k <= {n}")


@dataclass
class ItemIndex:
    """A FAISS index over item vectors plus the catalogue ids of its rows and how it was built.

    ``fresh_count`` counts items ``add``-ed after the build: they are searchable but were not part
    of the IVF training or the initial HNSW graph, which is what the rebuild policy watches.
    """

    faiss_index: faiss.Index
    item_ids: np.ndarray
    cfg: IndexConfig
    model_version: str
    built_at: datetime
    build_seconds: float
    fresh_count: int = 0

    @property
    def dim(self) -> int:
        return int(self.faiss_index.d)

    @property
    def size(self) -> int:
        return int(self.faiss_index.ntotal)

    def __len__(self) -> int:
        return self.size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query row: ``(scores, positions)``, both (n_queries, k), best first.

        Scores are inner products (float32); positions index ``item_ids``. An approximate index can
        find fewer than ``k`` items for a query (IVF with a small ``nprobe`` probing near-empty
        lists): those slots hold position -1 and score -inf.
        """
        queries = check_vectors(queries, "queries", self.dim)
        check_k(k, self.size)
        scores, positions = self.faiss_index.search(queries, int(k))
        scores[positions < 0] = -np.inf
        return scores, positions

    def add(self, vectors: np.ndarray, item_ids: Sequence[str] | np.ndarray) -> None:
        """Append fresh items (searchable at once, without retraining); ids must be new."""
        vectors = check_vectors(vectors, "vectors", self.dim)
        ids = check_ids(item_ids, vectors.shape[0])
        known = pc.is_in(pa.array(ids, pa.string()), value_set=pa.array(self.item_ids, pa.string())).to_numpy(zero_copy_only=False)
        if known.any():
            raise IndexInputError(
                f"{int(known.sum())} id(s) are already in the index, e.g. {_examples(ids[known])}"
            )
        self.faiss_index.add(vectors)
        self.item_ids = np.concatenate([self.item_ids, ids])
        self.fresh_count += len(ids)

    def vectors(self) -> np.ndarray:
        """All indexed vectors, (size, dim) float32, in position order.

        Exact for flat, IVF-Flat and HNSW-Flat (they store raw vectors), so recall can be re-measured
        from a saved index alone. IVF-PQ keeps only lossy codes: exact search over their decoding
        would grade the index against itself, so it refuses and the caller passes the raw vectors.
        """
        if isinstance(self.faiss_index, faiss.IndexIVFPQ):  # a refined one keeps raw rows: reconstruct reads them
            raise IndexInputError("an ivfpq index keeps only lossy codes; pass the raw item vectors to measure recall")
        if isinstance(self.faiss_index, faiss.IndexIVF):
            self.faiss_index.make_direct_map()  # IVF keeps vectors per list; map ids to their slots
        return self.faiss_index.reconstruct_n(0, self.size)

    def tune(
        self, *, nprobe: int | None = None, ef_search: int | None = None, refine_k_factor: int | None = None
    ) -> None:
        """Change a search-time knob (IVF ``nprobe``, HNSW ``ef_search``, the IVF-PQ re-rank depth
        ``refine_k_factor`` of an index built with one) without rebuilding."""
        if refine_k_factor is not None and not (refine_k_factor >= 1 and self.cfg.refine_k_factor):
            raise IndexInputError(
                f"refine_k_factor={refine_k_factor}: only an ivfpq index built with a re-rank can change its depth (to >= 1)"
            )
        self.cfg = replace(
            self.cfg,
            nprobe=self.cfg.nprobe if nprobe is None else nprobe,
            ef_search=self.cfg.ef_search if ef_search is None else ef_search,
            refine_k_factor=self.cfg.refine_k_factor if refine_k_factor is None else refine_k_factor,
        )
        self.cfg.validate()
        apply_search_params(self.faiss_index, self.cfg)


def apply_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    """Set the search-time knobs of ``cfg`` on a FAISS index (they are not all kept in its file)."""
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = float(cfg.refine_k_factor)
        index = faiss.downcast_index(index.base_index)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(cfg.nprobe, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search


ADD_CHUNK = 262_144  # rows per FAISS ``add``: bounds the float32 copy and the assignment buffers


def _empty_faiss_index(cfg: IndexConfig, n: int, dim: int) -> faiss.Index:
    cfg.check_dim(dim)
    if cfg.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if cfg.kind in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(dim)
        if cfg.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, cfg.lists_for(n), faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, cfg.lists_for(n), cfg.pq_m, cfg.pq_nbits, faiss.METRIC_INNER_PRODUCT)
            # FAISS's default polysemous training reorders codes for a Hamming-filtered search that is
            # never enabled here: skip that training pass
            index.do_polysemous_training = False
        index.cp.max_points_per_centroid = cfg.ivf_train_per_list
        index.cp.seed = cfg.seed
        if cfg.refine_k_factor:
            return faiss.IndexRefineFlat(index)  # the wrapper keeps a reference to ``index``
        return index
    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF:
    return faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index


def _training_sample(vectors: np.ndarray, index: faiss.Index, cfg: IndexConfig) -> np.ndarray:
    """A seeded sample big enough for the IVF k-means (``ivf_train_per_list`` a list) and, for IVF-PQ,
    the 2**nbits-centroid sub-quantizers (FAISS wants ~39 points a centroid); all rows if fewer."""
    need = _ivf_of(index).nlist * cfg.ivf_train_per_list
    if cfg.kind == "ivfpq":
        need = max(need, 64 * 2**cfg.pq_nbits)
    if vectors.shape[0] <= need:
        return vectors
    rows = np.sort(np.random.default_rng(cfg.seed).choice(vectors.shape[0], size=need, replace=False))
    sample = vectors[rows]  # a copy: the rows' pages can go
    release_pages(vectors)
    return sample


def build_index(
    vectors: np.ndarray,
    item_ids: Sequence[str] | np.ndarray,
    cfg: IndexConfig,
    model_version: str = "unknown",
) -> ItemIndex:
    """Build the ``cfg.kind`` index over ``vectors`` (n, d) whose rows are the items ``item_ids``.

    ``model_version`` names the model that produced the vectors; it travels into the manifest so a
    server never queries an index with user vectors from a different model.
    """
    vectors = check_vectors(vectors)
    ids = check_ids(item_ids, vectors.shape[0])
    start = time.perf_counter()
    try:
        index = _empty_faiss_index(cfg, *vectors.shape)
    except ValueError as exc:
        raise IndexInputError(str(exc)) from exc
    if not index.is_trained:
        index.train(_training_sample(vectors, index, cfg))
    for begin in range(0, vectors.shape[0], ADD_CHUNK):
        chunk = vectors[begin : begin + ADD_CHUNK]
        index.add(chunk)  # FAISS copies or encodes the rows
        release_pages(chunk)
    apply_search_params(index, cfg)
    return ItemIndex(
        faiss_index=index,
        item_ids=ids,
        cfg=cfg,
        model_version=model_version,
        built_at=datetime.now(timezone.utc),
        build_seconds=time.perf_counter() - start,
    )
