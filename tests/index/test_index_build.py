"""Building and searching ItemIndex: exact answers, ANN quality, incremental add, input checks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from feedrank.config import ConfigError, from_dict
from feedrank.index import IndexConfig, IndexInputError, build_index, measure_recall

KINDS = ["flat", "ivf", "hnsw"]


def test_flat_search_matches_hand_computed_inner_products():
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    index = build_index(vectors, ["a", "b", "c", "d"], IndexConfig(kind="flat"), model_version="m1")
    scores, positions = index.search(np.array([[0.8, 0.6]], dtype=np.float32), k=3)
    # q.a = 0.8, q.b = 0.6, q.c = 0.48 + 0.48 = 0.96, q.d = -0.8
    np.testing.assert_array_equal(positions, [[2, 0, 1]])
    np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], rtol=1e-6)
    assert list(index.item_ids[positions[0]]) == ["c", "a", "b"]
    assert (index.size, index.dim, index.model_version, index.fresh_count) == (4, 2, "m1", 0)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_finds_nearly_all_exact_neighbours(kind, catalogue, user_queries):
    vectors, ids = catalogue
    index = build_index(vectors, ids, IndexConfig(kind=kind, nprobe=32, ef_search=128))
    assert index.faiss_index.metric_type == faiss.METRIC_INNER_PRODUCT
    recall = measure_recall(index, vectors, user_queries, k=50)
    assert recall == 1.0 if kind == "flat" else recall >= 0.9
    np.testing.assert_array_equal(index.vectors(), vectors)  # raw vectors stay recoverable


def test_ivf_list_count_is_four_root_n_unless_set(catalogue):
    vectors, ids = catalogue
    assert build_index(vectors, ids, IndexConfig(kind="ivf")).faiss_index.nlist == 179  # round(4 * sqrt(2000))
    assert build_index(vectors, ids, IndexConfig(kind="ivf", nlist=30, nprobe=100)).faiss_index.nprobe == 30
    with pytest.raises(IndexInputError, match="nlist=5000 is more than the 2000 items"):
        build_index(vectors, ids, IndexConfig(kind="ivf", nlist=5000))


def test_tune_sets_the_search_knob_without_rebuilding(catalogue):
    vectors, ids = catalogue
    ivf = build_index(vectors, ids, IndexConfig(kind="ivf", nprobe=4))
    ivf.tune(nprobe=12)
    assert ivf.faiss_index.nprobe == 12 and ivf.cfg.nprobe == 12
    hnsw = build_index(vectors, ids, IndexConfig(kind="hnsw", ef_search=32))
    hnsw.tune(ef_search=200)
    assert hnsw.faiss_index.hnsw.efSearch == 200 and hnsw.cfg.ef_search == 200
    with pytest.raises(ValueError, match="ef_search must be >= 1"):
        hnsw.tune(ef_search=0)


def test_ivf_pads_short_answers_with_minus_one_and_minus_inf(catalogue):
    vectors, ids = catalogue
    index = build_index(vectors[:100], ids[:100], IndexConfig(kind="ivf", nlist=50, nprobe=1))
    scores, positions = index.search(vectors[:5], k=60)  # one list of ~2 items cannot fill 60 slots
    missing = positions == -1
    assert missing.any()
    assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_added_items_are_searchable_and_counted_fresh(kind, catalogue):
    vectors, ids = catalogue
    index = build_index(vectors[:1500], ids[:1500], IndexConfig(kind=kind, nprobe=179, ef_search=64))
    index.add(vectors[1500:], ids[1500:])
    assert (index.size, index.fresh_count) == (2000, 500)
    _, positions = index.search(vectors[1990:], k=1)
    np.testing.assert_array_equal(positions[:, 0], np.arange(1990, 2000))
    assert list(index.item_ids[positions[:, 0]]) == [f"i{i}" for i in range(1990, 2000)]


def test_add_refuses_known_or_repeated_ids_and_changes_nothing(catalogue):
    vectors, ids = catalogue
    index = build_index(vectors[:100], ids[:100], IndexConfig(kind="flat"))
    with pytest.raises(IndexInputError, match="1 id\\(s\\) are already in the index, e.g. 'i5'"):
        index.add(vectors[100:102], ["new", "i5"])
    with pytest.raises(IndexInputError, match="duplicated id"):
        index.add(vectors[100:102], ["new", "new"])
    with pytest.raises(IndexInputError, match="vectors have dim 8, the index has dim 16"):
        index.add(vectors[100:102, :8], ["x", "y"])
    assert (index.size, len(index.item_ids), index.fresh_count) == (100, 100, 0)


def _nan_at(row: int) -> np.ndarray:
    x = np.ones((4, 3), dtype=np.float32)
    x[row, 1] = np.nan
    return x


@pytest.mark.parametrize(
    ("vectors", "ids", "message"),
    [
        (_nan_at(2), ["a", "b", "c", "d"], "1 row\\(s\\) with NaN or inf, first at row 2"),
        (np.full((2, 3), np.inf, dtype=np.float32), ["a", "b"], "2 row\\(s\\) with NaN or inf, first at row 0"),
        (np.zeros((0, 3), dtype=np.float32), [], "vectors is empty"),
        (np.ones(3, dtype=np.float32), ["a"], "must be a 2-D \\(n, dim\\) array, got shape \\(3,\\)"),
        (np.ones((2, 3), dtype=np.int64), ["a", "b"], "must hold floats, got dtype int64"),
        (np.ones((3, 3), dtype=np.float32), ["a", "b", "a"], "1 duplicated id\\(s\\), e.g. 'a'"),
        (np.ones((3, 3), dtype=np.float32), ["a", "b"], "item_ids has shape \\(2,\\), expected \\(3,\\)"),
        (np.ones((2, 3), dtype=np.float32), ["a", 7], "item_ids\\[1\\] is 7, item ids must be strings"),
        (np.ones((2, 3), dtype=np.float32), [None, "b"], "item_ids\\[0\\] is None, item ids must be strings"),
        (np.ones((3, 3), dtype=np.float32), ["a", "", ""], "item_ids\\[1\\] is an empty string \\(2 in all\\)"),
    ],
)
def test_bad_catalogues_are_refused_with_the_reason(vectors, ids, message):
    with pytest.raises(IndexInputError, match=message):
        build_index(vectors, ids, IndexConfig(kind="flat"))


@pytest.mark.parametrize(
    ("queries", "k", "message"),
    [
        (np.ones((1, 16), dtype=np.float32), 0, "k=0 is out of range: the index holds 2000 item\\(s\\)"),
        (np.ones((1, 16), dtype=np.float32), 2001, "k=2001 is out of range"),
        (np.ones((1, 16), dtype=np.float32), True, "k must be an int, got bool"),
        (np.ones((1, 15), dtype=np.float32), 5, "queries have dim 15, the index has dim 16"),
        (np.ones(16, dtype=np.float32), 5, "queries must be a 2-D"),
        (np.full((2, 16), np.nan, dtype=np.float32), 5, "queries has 2 row\\(s\\) with NaN"),
    ],
)
def test_bad_searches_are_refused_with_the_reason(catalogue, queries, k, message):
    vectors, ids = catalogue
    index = build_index(vectors, ids, IndexConfig(kind="flat"))
    with pytest.raises(IndexInputError, match=message):
        index.search(queries, k)


def test_float64_input_is_accepted_as_float32(catalogue):
    vectors, ids = catalogue
    index = build_index(vectors.astype(np.float64), ids, IndexConfig(kind="flat"))
    _, positions = index.search(vectors[:3].astype(np.float64), k=1)
    np.testing.assert_array_equal(positions[:, 0], [0, 1, 2])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "lsh"}, "index.kind: expected one of ['flat', 'ivf', 'ivfpq', 'hnsw']"),
        ({"nprobes": 8}, "unknown key(s) 'nprobes'"),
        ({"recall_floor": 1.5}, "recall_floor must be in [0, 1]"),
        ({"nlist": 0}, "nlist must be >= 1"),
        ({"rebuild": {"max_fresh_share": 2}}, "max_fresh_share must be in [0, 1]"),
        ({"rebuild": {"max_age": 3}}, "index.rebuild: unknown key(s) 'max_age'"),
    ],
)
def test_index_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(IndexConfig, data, "index")
    assert message in str(info.value)
