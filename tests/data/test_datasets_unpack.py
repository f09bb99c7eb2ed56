"""Unpacking a dataset archive replaces an earlier copy whole, or leaves it untouched on failure."""

import zipfile

import pytest

from feedrank.data.datasets import DownloadError, _unpack


def _zip(path, entries: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return path


@pytest.mark.parametrize("top", ["ml-100k/", ""])
def test_a_second_unpack_replaces_the_folder_whole(tmp_path, top):
    first = _unpack(_zip(tmp_path / "ml-100k.zip", {f"{top}u.data": "old", f"{top}stale": "x"}), tmp_path)
    assert first == (tmp_path / "ml-100k").resolve() and (first / "stale").is_file()
    again = _unpack(_zip(tmp_path / "ml-100k.zip", {f"{top}u.data": "new"}), tmp_path)
    assert again == first and sorted(p.name for p in again.iterdir()) == ["u.data"]
    assert (again / "u.data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "ml-100k.zip"]  # no hidden leftovers


def test_a_corrupt_archive_keeps_the_earlier_copy(tmp_path):
    archive = _zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": "old"})
    _unpack(archive, tmp_path)
    _zip(archive, {"ml-100k/u.data": "new data " * 50})
    raw = archive.read_bytes()
    at = raw.index(b"new data")  # corrupt the stored member: its CRC check fails while extracting
    archive.write_bytes(raw[:at] + b"X" + raw[at + 1 :])
    with pytest.raises(DownloadError, match="ml-100k.zip: not a valid zip archive"):
        _unpack(archive, tmp_path)
    assert (tmp_path / "ml-100k" / "u.data").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml-100k", "ml-100k.zip"]
