"""IVF-PQ at a scaled-down size: the recall gate holds against the raw vectors, an impossible floor is
refused naming recall and floor, and a bad pq_m is refused at the boundary."""

from __future__ import annotations

import numpy as np
import pytest

from feedrank.index import IndexConfig, build_index
from feedrank.index.build import IndexInputError
from feedrank.index.store import RecallBelowFloorError, build_and_publish, check_recall, load_index

N, DIM = 20_000, 32
CFG = IndexConfig(kind="ivfpq", nlist=64, nprobe=32, pq_m=16, pq_nbits=8, recall_k=10, recall_sample=200, recall_floor=0.5)


@pytest.fixture(scope="module")
def items(make_clustered) -> tuple[np.ndarray, np.ndarray]:
    return make_clustered(N, DIM, seed=3), np.array([f"i{i}" for i in range(N)], dtype=object)


def test_ivfpq_passes_floor_and_round_trips(items, make_clustered, tmp_path) -> None:
    vectors, ids = items
    manifest = build_and_publish(vectors, ids, tmp_path / "idx", CFG, queries=make_clustered(300, DIM, seed=4))
    assert manifest.recall >= CFG.recall_floor
    loaded = load_index(tmp_path / "idx")
    assert loaded.size == N and loaded.faiss_index.code_size == 16  # 16 bytes an item, not 128
    again = check_recall(loaded, make_clustered(300, DIM, seed=4), CFG, vectors)
    assert again.value == pytest.approx(manifest.recall, abs=1e-6)


def test_impossible_floor_refused_naming_recall_and_floor(items, tmp_path) -> None:
    vectors, ids = items
    cfg = IndexConfig(kind="ivfpq", nlist=64, nprobe=1, pq_m=4, pq_nbits=4, recall_k=10, recall_sample=100, recall_floor=0.999)
    with pytest.raises(RecallBelowFloorError, match=r"recall@10 = 0\.\d+ .* below the floor 0\.999"):
        build_and_publish(vectors, ids, tmp_path / "idx", cfg)
    assert not (tmp_path / "idx").exists()


def test_pq_m_must_divide_dim(items) -> None:
    vectors, ids = items
    with pytest.raises(IndexInputError, match="dim=32 is not a multiple of pq_m=5"):
        build_index(vectors[:500], ids[:500], IndexConfig(kind="ivfpq", nlist=4, pq_m=5))


def test_ivfpq_vectors_refuse_lossy_ground_truth(items) -> None:
    vectors, ids = items
    index = build_index(vectors[:2000], ids[:2000], IndexConfig(kind="ivfpq", nlist=8, pq_m=8, pq_nbits=4))
    with pytest.raises(IndexInputError, match="lossy codes"):
        index.vectors()


def test_refine_passes_a_floor_plain_pq_fails(items, make_clustered, tmp_path) -> None:
    """Re-ranking the PQ shortlist on raw vectors lifts recall over a floor coarse PQ codes miss."""
    vectors, ids = items
    queries = make_clustered(300, DIM, seed=4)
    coarse = dict(kind="ivfpq", nlist=64, nprobe=32, pq_m=8, pq_nbits=8, recall_k=10, recall_sample=200, recall_floor=0.9)
    with pytest.raises(RecallBelowFloorError):
        build_and_publish(vectors, ids, tmp_path / "plain", IndexConfig(**coarse), queries=queries)
    refined = IndexConfig(**coarse, refine_k_factor=8)
    manifest = build_and_publish(vectors, ids, tmp_path / "refined", refined, queries=queries)
    assert manifest.recall >= 0.9
    loaded = load_index(tmp_path / "refined")
    assert check_recall(loaded, queries, refined, vectors).value == pytest.approx(manifest.recall, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "ivf", "refine_k_factor": 4}, "refine_k_factor re-ranks PQ codes and needs kind ivfpq, got kind ivf"),
        ({"kind": "ivfpq", "refine_k_factor": -1}, "refine_k_factor must be >= 0"),
    ],
)
def test_bad_refine_config_refused(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        IndexConfig(**overrides).validate()
