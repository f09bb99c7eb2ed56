"""recall@k: the overlap count against hand-computed answers, and the query sampler."""

from __future__ import annotations

import numpy as np
import pytest

from feedrank.index import IndexConfig, build_index, measure_recall
from feedrank.index.recall import exact_top_k, overlap_at_k, sample_queries


def test_overlap_counts_shared_positions_per_row():
    found = np.array([[0, 1, 2], [3, 4, -1]])
    truth = np.array([[0, 2, 5], [3, 4, 5]])
    assert overlap_at_k(found, truth) == pytest.approx(4 / 6)
    # the same positions in another row do not count: row 0 finds 3, 4, 5 which belong to row 1
    assert overlap_at_k(np.array([[3, 4, 5], [0, 1, 2]]), truth) == pytest.approx(1 / 6)


def test_exact_top_k_is_the_inner_product_order():
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    np.testing.assert_array_equal(exact_top_k(vectors, np.array([[0, 1]], dtype=np.float32), 3), [[1, 2, 0]])


def test_low_nprobe_loses_recall_and_flat_loses_none(catalogue, user_queries):
    vectors, ids = catalogue
    assert measure_recall(build_index(vectors, ids, IndexConfig(kind="flat")), vectors, user_queries, 20) == 1.0
    ivf = build_index(vectors, ids, IndexConfig(kind="ivf", nlist=100, nprobe=1))
    low = measure_recall(ivf, vectors, user_queries, 20)
    ivf.tune(nprobe=100)  # probing every list is exhaustive
    assert low < 0.9 and measure_recall(ivf, vectors, user_queries, 20) == 1.0


def test_measure_recall_needs_the_indexed_vectors(catalogue, user_queries):
    vectors, ids = catalogue
    index = build_index(vectors[:100], ids[:100], IndexConfig(kind="flat"))
    with pytest.raises(ValueError, match="vectors has 2000 rows, the index holds 100 items"):
        measure_recall(index, vectors, user_queries, 10)


def test_sample_queries_is_seeded_and_capped(user_queries):
    a, b = sample_queries(user_queries, 50, seed=3), sample_queries(user_queries, 50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 16)
    assert sample_queries(user_queries, 1000).shape == (300, 16)
