"""feedrank.fsutil: staged files and folders replace their target whole or not at all."""

import hashlib
import os

import pytest

from feedrank import fsutil
from feedrank.fsutil import fsync_path, replace_dir, sha256_file, staged_dir, staged_file


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("durable", [False, True])
def test_staged_file_creates_parents_replaces_and_leaves_no_temp(tmp_path, durable):
    final = tmp_path / "a" / "b" / "metrics.json"
    with staged_file(final, durable=durable) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".metrics.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("one")
    with staged_file(final, durable=durable) as tmp:
        tmp.write_text("two")
    assert final.read_text() == "two"
    assert _hidden(final.parent) == []


def test_staged_file_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    final = tmp_path / "part.parquet"
    final.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_file(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert final.read_text() == "old"
    assert _hidden(tmp_path) == []


def test_staged_file_names_are_unique_per_call(tmp_path):
    final = tmp_path / "x"
    with staged_file(final) as a, staged_file(final) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert final.read_text() == "a"  # the outer context exits last and wins


def test_staged_dir_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "old.txt").write_text("1")
    with staged_dir(final) as tmp:
        assert tmp.name.startswith(".out.tmp-")
        (tmp / "new.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert _hidden(tmp_path) == []


def test_staged_dir_failure_keeps_the_old_folder_and_removes_the_temp(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "keep.txt").write_text("kept")
    with pytest.raises(ValueError, match="bad chunk"):
        with staged_dir(final) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise ValueError("bad chunk")
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert _hidden(tmp_path) == []


def test_replace_dir_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "index", tmp_path / ".index.tmp"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    tmp.mkdir()
    real_rename = os.rename

    def rename(src, dst):
        if str(src) == str(tmp):
            raise OSError("cross-device link")
        real_rename(src, dst)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        replace_dir(tmp, final)
    assert (final / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.tmp", "index"]  # no .old-* left behind


def test_replace_dir_into_a_missing_target(tmp_path):
    tmp = tmp_path / ".new"
    tmp.mkdir()
    (tmp / "f").write_text("x")
    replace_dir(tmp, tmp_path / "final")
    assert (tmp_path / "final" / "f").read_text() == "x" and not tmp.exists()


def test_sha256_file_and_fsync_path(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    big.write_bytes(b"z" * ((1 << 20) + 7))  # more than one read block
    assert sha256_file(big) == hashlib.sha256(b"z" * ((1 << 20) + 7)).hexdigest()
    fsync_path(path)
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")
