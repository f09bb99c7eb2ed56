"""``release_pages``: the chunked passes over a memory-mapped catalogue do not leave it resident
beside FAISS's own copy, and never drop what a writable or copy-on-write map holds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from feedrank.index import IndexConfig, build_index
from feedrank.index.build import release_pages

STATUS = Path("/proc/self/status")
pytestmark = pytest.mark.skipif(not STATUS.is_file() or "RssFile" not in STATUS.read_text(),
                                reason="needs Linux's per-process file-backed RSS (RssFile)")


def rss_file_mb() -> float:
    """Resident file-backed pages of this process: where a memory map's pages are counted."""
    return int(re.search(r"RssFile:\s+(\d+)", STATUS.read_text()).group(1)) / 1024


@pytest.fixture(scope="module")
def mapped(tmp_path_factory, make_clustered):
    vectors = make_clustered(120_000, 128, seed=3)  # 61 MB
    path = tmp_path_factory.mktemp("pages") / "v.npy"
    np.save(path, vectors)
    return vectors, path


def test_a_read_only_map_is_released_and_still_reads_the_same(mapped):
    vectors, path = mapped
    view = np.load(path, mmap_mode="r")
    before = rss_file_mb()
    assert float(view.sum()) == pytest.approx(float(vectors.sum()), rel=1e-4)  # every page read
    assert rss_file_mb() - before > 50
    release_pages(view[: len(view) // 2])
    assert rss_file_mb() - before == pytest.approx(30, abs=10)  # only the released half went
    release_pages(view)
    assert rss_file_mb() - before < 8
    assert np.array_equal(view, vectors)  # read back from the page cache


def test_build_index_does_not_keep_the_map_resident(mapped):
    vectors, path = mapped
    before = rss_file_mb()
    index = build_index(np.load(path, mmap_mode="r"), [f"i{i}" for i in range(len(vectors))], IndexConfig(kind="flat"))
    assert rss_file_mb() - before < 12  # the flat index's own 61 MB copy is anonymous memory
    assert np.array_equal(index.vectors(), vectors)


def test_writable_and_copy_on_write_maps_are_left_alone(mapped, tmp_path):
    path = tmp_path / "w.npy"
    path.write_bytes(mapped[1].read_bytes())  # "r+" writes to the file: not the shared one
    for mode in ("c", "r+"):
        view = np.load(path, mmap_mode=mode)
        view[0, 0] = 42.0
        release_pages(view)
        assert view[0, 0] == 42.0, mode
