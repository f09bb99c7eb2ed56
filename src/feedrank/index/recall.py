"""How much an approximate index loses: recall@k against exact inner-product search.

recall@k = mean over queries of |ANN top-k ∩ exact top-k| / k. The exact top-k comes from a
brute-force scan of the same vectors (``faiss.knn``, no second copy of the catalogue), so the
number isolates what IVF/HNSW drop, independent of how good the embeddings are.
"""

from __future__ import annotations

import faiss
import numpy as np

from feedrank.index.build import ItemIndex, check_k, check_vectors


def sample_queries(queries: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most ``n`` rows of ``queries``, chosen without replacement by a seeded generator."""
    queries = check_vectors(queries, "queries")
    if queries.shape[0] <= n:
        return queries
    rows = np.sort(np.random.default_rng(seed).choice(queries.shape[0], size=n, replace=False))
    return queries[rows]


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact top-``k`` items by inner product, (n_queries, k)."""
    _, positions = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return positions


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
