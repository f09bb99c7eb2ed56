"""Saving, loading and publishing: round trips, manifest checks, and the recall gate that keeps the
previously published index intact."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from feedrank.index import (
    IndexConfig,
    IndexFileError,
    RecallBelowFloorError,
    build_and_publish,
    build_index,
    load_index,
    publish,
    read_manifest,
    save_index,
)
from feedrank.index.store import RecallCheck


def _siblings(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir())


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, catalogue, user_queries, kind):
    vectors, ids = catalogue
    index = build_index(vectors, ids, IndexConfig(kind=kind, nprobe=7, ef_search=33), model_version="tt@2")
    index.add(-vectors[:3], ["fresh0", "fresh1", "fresh2"])
    manifest = save_index(index, tmp_path / "idx", RecallCheck(0.97, 100, 300))
    loaded = load_index(tmp_path / "idx")
    assert (loaded.size, loaded.dim, loaded.fresh_count, loaded.model_version) == (2003, 16, 3, "tt@2")
    assert loaded.cfg == index.cfg and loaded.built_at == index.built_at
    assert list(loaded.item_ids[-3:]) == ["fresh0", "fresh1", "fresh2"]
    for got, want in zip(loaded.search(user_queries, 10), index.search(user_queries, 10)):
        np.testing.assert_array_equal(got, want)
    if kind == "ivf":
        assert loaded.faiss_index.nprobe == 7
    if kind == "hnsw":
        assert loaded.faiss_index.hnsw.efSearch == 33
    on_disk = read_manifest(tmp_path / "idx")
    assert on_disk == manifest
    assert (on_disk.count, on_disk.fresh_count, on_disk.recall, on_disk.recall_k, on_disk.config.kind) == (2003, 3, 0.97, 100, kind)
    assert _siblings(tmp_path / "idx") == ["idx"]  # no temporary folders left behind


def test_save_replaces_an_existing_index_and_refuses_other_folders(tmp_path, catalogue):
    vectors, ids = catalogue
    save_index(build_index(vectors[:10], ids[:10], IndexConfig(kind="flat")), tmp_path / "idx")
    save_index(build_index(vectors[:20], ids[:20], IndexConfig(kind="flat")), tmp_path / "idx")
    assert load_index(tmp_path / "idx").size == 20
    assert _siblings(tmp_path / "idx") == ["idx"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(IndexFileError, match="refusing to replace .*notes: it is not an index directory"):
        save_index(build_index(vectors[:10], ids[:10], IndexConfig(kind="flat")), tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_a_save_that_fails_midway_keeps_the_old_index(tmp_path, catalogue, monkeypatch):
    vectors, ids = catalogue
    save_index(build_index(vectors[:10], ids[:10], IndexConfig(kind="flat")), tmp_path / "idx")

    def disk_full(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_index(build_index(vectors[:20], ids[:20], IndexConfig(kind="flat")), tmp_path / "idx")
    assert load_index(tmp_path / "idx").size == 10
    assert _siblings(tmp_path / "idx") == ["idx"]


@pytest.fixture
def saved(tmp_path, catalogue) -> Path:
    vectors, ids = catalogue
    save_index(build_index(vectors[:50], ids[:50], IndexConfig(kind="flat")), tmp_path / "idx")
    return tmp_path / "idx"


def _edit_manifest(directory: Path, **changes) -> None:
    path = directory / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_load_names_a_missing_directory_or_manifest(tmp_path):
    with pytest.raises(IndexFileError, match="manifest.json not found: .*nowhere is not a saved index"):
        load_index(tmp_path / "nowhere")


def test_load_names_a_missing_file(saved):
    (saved / "item_ids.parquet").unlink()
    with pytest.raises(IndexFileError, match="item_ids.parquet is missing"):
        load_index(saved)


def test_load_detects_a_changed_file(saved):
    with (saved / "index.faiss").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(IndexFileError, match="index.faiss does not match the sha256"):
        load_index(saved)


def test_load_detects_a_manifest_that_disagrees_with_the_files(saved):
    _edit_manifest(saved, count=51, dim=8)
    with pytest.raises(IndexFileError, match="item count: manifest says 51, files have 50; .*dim: manifest says 8, files have 16"):
        load_index(saved)


def test_load_detects_a_wrong_kind(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    _edit_manifest(saved, config=manifest["config"] | {"kind": "hnsw"})
    with pytest.raises(IndexFileError, match="kind: manifest says hnsw, index.faiss holds IndexFlatIP"):
        load_index(saved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "format_version 2, this code reads 1"),
        ({"colour": "red"}, "manifest: unknown key\\(s\\) 'colour'"),
        ({"count": "fifty"}, "manifest.count: expected int"),
    ],
)
def test_load_refuses_a_bad_manifest(saved, changes, message):
    _edit_manifest(saved, **changes)
    with pytest.raises(IndexFileError, match=message):
        load_index(saved)


def test_load_refuses_a_manifest_that_is_not_json(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="manifest.json: not valid JSON"):
        load_index(saved)


def test_publish_records_the_measured_recall(tmp_path, catalogue, user_queries):
    vectors, ids = catalogue
    cfg = IndexConfig(kind="hnsw", ef_search=64, recall_k=20, recall_sample=100, recall_floor=0.9)
    manifest = publish(build_index(vectors, ids, cfg, "tt@1"), tmp_path / "idx", cfg, user_queries)
    assert manifest.recall_k == 20 and manifest.recall_queries == 100  # sampled down from 300 queries
    assert 0.9 <= manifest.recall <= 1.0
    assert read_manifest(tmp_path / "idx").recall == manifest.recall


def test_publish_refuses_a_low_recall_index_and_keeps_the_published_one(tmp_path, catalogue, user_queries):
    vectors, ids = catalogue
    good = IndexConfig(kind="flat")
    build_and_publish(vectors, ids, tmp_path / "idx", good, model_version="tt@1", queries=user_queries)
    before = (tmp_path / "idx" / "manifest.json").read_text()
    bad = IndexConfig(kind="ivf", nlist=100, nprobe=1, recall_floor=0.95)
    with pytest.raises(RecallBelowFloorError, match=r"recall@100 = 0\.\d+ on 300 queries is below the floor 0.95 .* left unchanged"):
        build_and_publish(vectors, ids, tmp_path / "idx", bad, model_version="tt@2", queries=user_queries)
    assert (tmp_path / "idx" / "manifest.json").read_text() == before
    assert load_index(tmp_path / "idx").model_version == "tt@1"
    assert _siblings(tmp_path / "idx") == ["idx"]
    with pytest.raises(RecallBelowFloorError):
        build_and_publish(vectors, ids, tmp_path / "never", bad, queries=user_queries)
    assert not (tmp_path / "never").exists()


def test_recall_k_is_capped_at_the_catalogue_size(tmp_path, catalogue):
    vectors, ids = catalogue
    manifest = build_and_publish(vectors[:30], ids[:30], tmp_path / "idx", IndexConfig(kind="flat"))
    assert (manifest.recall, manifest.recall_k, manifest.recall_queries) == (1.0, 30, 30)
