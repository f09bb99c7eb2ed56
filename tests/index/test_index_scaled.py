"""The 10M-item path scaled down: vectors written chunk by chunk to a memory-mapped ``.npy``, the
blocked exact search and chunked input checks that read it, and the IVF-PQ + re-rank configuration
of ``benchmarks/index_recall_speed.py --n 10000000`` held to the default 0.95 recall@100 floor
through ``feedrank index build``, and refused by the gate without the re-rank."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from feedrank.index import IndexConfig, build_index, load_index, read_manifest
from feedrank.index import build as build_module
from feedrank.index.build import IndexInputError, check_vectors
from feedrank.index.recall import exact_top_k
from feedrank.index.store import RecallBelowFloorError, publish

N, DIM = 15_000, 64
runner = CliRunner()


@pytest.fixture(scope="module")
def memmapped(tmp_path_factory, make_clustered) -> np.ndarray:
    """N x DIM float32 vectors written 7,000 rows at a time into a .npy, read back memory-mapped."""
    path = tmp_path_factory.mktemp("vecs") / "vecs.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, DIM))
    for begin in range(0, N, 7_000):
        out[begin : begin + 7_000] = make_clustered(min(7_000, N - begin), DIM, seed=10, clusters=40)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def test_blocked_exact_search_equals_one_scan(make_clustered) -> None:
    vectors, queries = make_clustered(5_000, 16, seed=0), make_clustered(40, 16, seed=1)
    whole = exact_top_k(vectors, queries, 50, chunk=10**9)
    assert np.array_equal(exact_top_k(vectors, queries, 50, chunk=777), whole)
    scores = queries @ vectors.T
    assert np.allclose(np.take_along_axis(scores, whole, 1), -np.sort(-scores, axis=1)[:, :50], atol=1e-5)


def test_blocked_exact_search_breaks_ties_to_the_lower_position() -> None:
    vectors = np.ones((10, 4), dtype=np.float32)  # every item scores the same
    assert exact_top_k(vectors, np.ones((2, 4), dtype=np.float32), 4, chunk=3).tolist() == [[0, 1, 2, 3]] * 2


def test_memmap_is_checked_in_chunks_without_a_copy(memmapped, monkeypatch) -> None:
    monkeypatch.setattr(build_module, "CHECK_CHUNK", 4_096)
    assert np.shares_memory(check_vectors(memmapped), memmapped)  # float32 C-order: used in place
    bad = np.array(memmapped)
    bad[[10_001, 12_000], 3] = np.nan  # past the first chunks
    with pytest.raises(IndexInputError, match="2 row\\(s\\) with NaN or inf, first at row 10001"):
        check_vectors(bad)


def test_refine_depth_is_a_search_knob(memmapped) -> None:
    ids = np.array([f"i{i}" for i in range(5_000)], dtype=object)
    index = build_index(memmapped[:5_000], ids, IndexConfig(kind="ivfpq", nlist=16, pq_m=8, pq_nbits=4, refine_k_factor=2))
    index.tune(refine_k_factor=16)
    assert index.cfg.refine_k_factor == 16 and index.faiss_index.k_factor == 16
    plain = build_index(memmapped[:2_000], ids[:2_000], IndexConfig(kind="ivfpq", nlist=8, pq_m=8, pq_nbits=4))
    with pytest.raises(IndexInputError, match="only an ivfpq index built with a re-rank"):
        plain.tune(refine_k_factor=4)


@pytest.mark.slow
def test_cli_build_holds_the_default_floor_at_a_scaled_down_size(app, memmapped, tmp_path) -> None:
    """The 10M benchmark's settings (nlist 4 sqrt(n), 16 B PQ codes, nprobe 64, re-rank x8) at N items:
    ``feedrank index build`` publishes with recall@100 >= 0.95 against exact search; re-ranking only the
    k PQ candidates themselves (depth 1: plain PQ's recall) falls under the floor and is refused."""
    (tmp_path / "ids.txt").write_text("\n".join(f"i{i}" for i in range(N)) + "\n")
    (tmp_path / "index.yaml").write_text("index: {kind: ivfpq, nprobe: 64, pq_m: 16, refine_k_factor: 8, recall_sample: 300}\n")
    out = tmp_path / "idx"
    result = runner.invoke(app, ["index", "build", str(memmapped.filename), "--ids", str(tmp_path / "ids.txt"),
                                 "--out", str(out), "--config", str(tmp_path / "index.yaml")])  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.recall_k == 100 and manifest.recall >= 0.95 and manifest.count == N
    index = load_index(out)
    index.tune(refine_k_factor=1)
    with pytest.raises(RecallBelowFloorError, match="below the floor 0.95"):
        publish(index, tmp_path / "shallow", index.cfg, np.asarray(memmapped), memmapped)
    assert not (tmp_path / "shallow").exists()
