"""Dataset download: no-network failure, checksum mismatch, unpacking (local servers only)."""

import functools
import hashlib
import http.server
import socket
import threading
import zipfile

import pytest
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.data.datasets import DATASETS, Archive, DatasetSpec, DownloadError, download


@pytest.fixture
def closed_port_url():
    """An address on this machine where nothing listens: connecting is refused at once.

    The port stays bound (never listening) for the whole test, so no other process on the machine
    can start listening on it meanwhile, as it could on a port picked and then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _zip(path, entries: dict[str, str]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in entries.items():
            zf.writestr(name, text)
    return hashlib.md5(path.read_bytes()).hexdigest()


def _spec(name: str, md5: str | None) -> DatasetSpec:
    return DatasetSpec("test", "http://unused.invalid", (Archive(name, md5, "test fixture"),), "movielens")


@pytest.fixture
def served(tmp_path):
    """A local HTTP server over tmp_path/www on 127.0.0.1; yields (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_official_specs_have_published_checksums():
    assert DATASETS["movielens-100k"].archives[0].md5 == "0e33842e24a9c977be4e0107933c0723"
    assert DATASETS["movielens-1m"].archives[0].md5 == "c4d9eecfca2ab87c1945afe126590906"
    assert [a.name for a in DATASETS["mind-small"].archives] == ["MINDsmall_train.zip", "MINDsmall_dev.zip"]


def test_unreachable_host_fails_fast_with_instructions(tmp_path, closed_port_url):
    base = closed_port_url
    with pytest.raises(DownloadError) as exc:
        download("movielens-100k", tmp_path / "d", base_url=base, timeout=2)
    message = str(exc.value)
    assert f"could not download {base}/ml-100k.zip" in message
    assert "copy the file(s) into" in message and str(tmp_path / "d") in message
    assert list((tmp_path / "d").iterdir()) == []  # no partial file left behind


def test_download_verify_unpack_over_http(tmp_path, served):
    www, base = served
    md5 = _zip(www / "ml-100k.zip", {"ml-100k/u.data": "1\t2\t3\t4\n", "ml-100k/README": "hi"})
    folders = download(_spec("ml-100k.zip", md5), tmp_path / "d", base_url=base)
    assert folders == [(tmp_path / "d" / "ml-100k").resolve()]
    assert (folders[0] / "u.data").read_text() == "1\t2\t3\t4\n"
    # An archive without a top folder (like MIND's) is unpacked into a folder named after it.
    md5 = _zip(www / "MINDsmall_dev.zip", {"behaviors.tsv": "x", "news.tsv": "y"})
    folders = download(_spec("MINDsmall_dev.zip", md5), tmp_path / "d", base_url=base)
    assert (folders[0] / "news.tsv").read_text() == "y" and folders[0].name == "MINDsmall_dev"


def test_checksum_mismatch_from_file_url(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _zip(src / "ml-1m.zip", {"ml-1m/ratings.dat": "1::2::3::4\n"})
    with pytest.raises(DownloadError, match="ml-1m.zip: checksum mismatch: MD5 .* expected 0+ \\(from test fixture\\)"):
        download(_spec("ml-1m.zip", "0" * 32), tmp_path / "d", base_url=src.as_uri())
    assert (tmp_path / "d" / "ml-1m.zip.bad").is_file()
    assert not (tmp_path / "d" / "ml-1m.zip").exists() and not (tmp_path / "d" / "ml-1m").exists()


def test_archive_placed_by_hand_needs_no_network(tmp_path, closed_port_url):
    dest = tmp_path / "d"
    dest.mkdir()
    md5 = _zip(dest / "ml-100k.zip", {"ml-100k/u.data": "1\t2\t3\t4\n"})
    folders = download(_spec("ml-100k.zip", md5), dest, base_url=closed_port_url)
    assert (folders[0] / "u.data").is_file()


def test_bad_zip_and_zip_slip_refused(tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(DownloadError, match="not a valid zip"):
        download(_spec("x.zip", None), dest)
    md5 = _zip(dest / "y.zip", {"../evil.txt": "boom"})
    with pytest.raises(DownloadError, match="unsafe path '../evil.txt'"):
        download(_spec("y.zip", md5), dest)
    assert not (tmp_path / "evil.txt").exists()


def test_cli_download_unreachable_exit_2(tmp_path, closed_port_url):
    base = closed_port_url
    res = CliRunner().invoke(app, ["datasets", "download", "movielens-1m", "--dest", str(tmp_path), "--base-url", base, "--timeout", "2"])
    assert res.exit_code == 2 and f"{base}/ml-1m.zip" in res.output
    res = CliRunner().invoke(app, ["datasets", "download", "imagenet", "--dest", str(tmp_path)])
    assert res.exit_code != 0
