"""How much an approximate index loses: recall@k against exact inner-product search.

recall@k = mean over queries of |ANN top-k ∩ exact top-k| / k. The exact top-k comes from a
brute-force scan of the same vectors (``faiss.knn``, no second copy of the catalogue), so the
number isolates what IVF/HNSW drop, independent of how good the embeddings are.
"""

from __future__ import annotations

import faiss
import numpy as np

from feedrank.index.build import ItemIndex, check_k, check_vectors, release_pages


def sample_queries(queries: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows of ``queries``, chosen without replacement by a seeded generator."""
    queries = check_vectors(queries, "queries")
    if queries.shape[0] <= n:
        return queries
    rows = np.sort(np.random.default_rng(seed).choice(queries.shape[0], size=n, replace=False))
    return queries[rows]


EXACT_CHUNK = 1 << 20  # catalogue rows scanned per exact-search block


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = EXACT_CHUNK) -> np.ndarray:
    """Positions of the exact top-``k`` items by inner product, (n_queries, k), best first.

    Brute force over ``chunk``-row blocks of ``vectors`` (``faiss.knn``: a BLAS matmul and a heap
    per block), keeping a running top-k, so a memory-mapped 10M-row catalogue is paged through once
    (each block's pages released behind it: ``release_pages``) and never copied whole; scores tie-break to the lower position, as one unchunked scan does.
    """
    n = vectors.shape[0]
    best_scores = np.empty((queries.shape[0], 0), dtype=np.float32)
    best = np.empty((queries.shape[0], 0), dtype=np.int64)
    for begin in range(0, n, chunk):
        block = np.ascontiguousarray(vectors[begin : begin + chunk], dtype=np.float32)
        scores, positions = faiss.knn(queries, block, min(k, block.shape[0]), metric=faiss.METRIC_INNER_PRODUCT)
        release_pages(block)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_positions = np.concatenate([best, positions + begin], axis=1)
        order = np.lexsort((all_positions, -all_scores), axis=1)[:, :k]  # by score, then by position
        best_scores = np.take_along_axis(all_scores, order, axis=1)
        best = np.take_along_axis(all_positions, order, axis=1)
    return best


def overlap_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` that also appears in the same row of ``found``.

    Positions are unique within a row, so sorting both rows and counting matches with one
    vectorised ``isin`` per row-offset is exact; -1 (not found) never matches a true position.
    """
    n_queries, k = truth.shape
    offset = np.arange(n_queries, dtype=np.int64)[:, None] * (int(max(found.max(), truth.max())) + 2)
    hits = np.isin(found + offset + 1, truth + offset + 1).sum()  # +1 keeps -1 distinct per row
    return float(hits) / (n_queries * k)


def measure_recall(index: ItemIndex, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """recall@``k`` of ``index.search`` against exact search over ``vectors`` (the indexed rows)."""
    vectors = check_vectors(vectors, "vectors", index.dim)
    if vectors.shape[0] != index.size:
        raise ValueError(f"vectors has {vectors.shape[0]} rows, the index holds {index.size} items")
    queries = check_vectors(queries, "queries", index.dim)
    check_k(k, index.size)
    _, found = index.search(queries, k)
    return overlap_at_k(found, exact_top_k(vectors, queries, k))
