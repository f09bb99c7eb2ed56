"""Download, verify and unpack the public datasets the readers understand.

``download("movielens-100k", dest)`` fetches each archive of the dataset into ``dest``, checks its
MD5 against the published value, and unpacks it (``dest/ml-100k/``, ``dest/MINDsmall_train/``, ...).
An archive already in ``dest`` (e.g. placed there by hand on a machine without network) is verified
and unpacked without any download. A host that cannot be reached fails fast (``timeout`` seconds)
with a ``DownloadError`` naming the URL and saying where to put the file by hand.

Checksums and where they come from:

- MovieLens: GroupLens publishes an ``.md5`` file next to each zip
  (``https://files.grouplens.org/datasets/movielens/ml-100k.zip.md5`` reads
  ``MD5 (ml-100k.zip) = 0e33842e24a9c977be4e0107933c0723``; likewise ``ml-1m.zip.md5``).
- MIND: Microsoft publishes no checksum for the MIND zips. The MD5 values below were recorded by
  third parties that downloaded the official files (the ``datarec`` library's MIND-small builder;
  the dev value also appears in an independent project's DVC lock file). They are checked like the
  others, and a mismatch says where the expected value came from.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from feedrank.fsutil import replace_dir
from feedrank.progress import progress as progress_bar

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A dataset archive could not be fetched, verified or unpacked; the message says what to do."""


@dataclass(frozen=True)
class Archive:
    """One downloadable file: its name (appended to the dataset's base URL) and expected MD5."""

    name: str
    md5: str | None
    md5_source: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    base_url: str
    archives: tuple[Archive, ...]
    ingest_format: str  # the `feedrank ingest` format that reads the unpacked files


_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_MIND = "https://mind201910small.blob.core.windows.net/release"
_MIND_MD5_SOURCE = "third-party record (datarec MIND-small builder); Microsoft publishes no checksum"

DATASETS: dict[str, DatasetSpec] = {
    "movielens-100k": DatasetSpec(
        "movielens-100k", _GROUPLENS,
        (Archive("ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", f"{_GROUPLENS}/ml-100k.zip.md5"),),
        "movielens",
    ),
    "movielens-1m": DatasetSpec(
        "movielens-1m", _GROUPLENS,
        (Archive("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", f"{_GROUPLENS}/ml-1m.zip.md5"),),
        "movielens",
    ),
    "mind-small": DatasetSpec(
        "mind-small", _MIND,
        (
            Archive("MINDsmall_train.zip", "8ab752c7d11564622d93132be05dcf6b", _MIND_MD5_SOURCE),
            Archive("MINDsmall_dev.zip", "e3bac5485be8fc7a9934e85e3b78615f", _MIND_MD5_SOURCE),
        ),
        "mind",
    ),
}  # fmt: skip


def download(
    dataset: str | DatasetSpec, dest: str | Path, base_url: str | None = None, timeout: float = 10.0, progress: bool = False
) -> list[Path]:
    """Fetch, verify and unpack every archive of ``dataset`` into ``dest``; returns the unpacked dirs.

    ``base_url`` replaces the official location (a mirror, or a local server in tests).
    """
    spec = DATASETS[dataset] if isinstance(dataset, str) and dataset in DATASETS else dataset
    if not isinstance(spec, DatasetSpec):
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = (base_url or spec.base_url).rstrip("/")
    unpacked = []
    for archive in spec.archives:
        target = dest / archive.name
        url = f"{base}/{archive.name}"
        if not target.is_file():
            _fetch(url, target, timeout, progress, how_to=_by_hand(spec, dest))
        _verify(target, archive)
        unpacked.append(_unpack(target, dest))
    return unpacked


def _by_hand(spec: DatasetSpec, dest: Path) -> str:
    names = ", ".join(a.name for a in spec.archives)
    return (
        f"To install by hand, download {names} on a machine with network access, copy the file(s) into "
        f"{dest}/ and run the same command again: it verifies and unpacks them without downloading "
        f"(or fetch from a mirror with --base-url). "
        f"Then: feedrank ingest {spec.ingest_format} <unpacked folder> --out <log dir>"
    )


def _fetch(url: str, target: Path, timeout: float, progress: bool, how_to: str) -> None:
    """Stream ``url`` into ``target`` through a ``.part`` file, so a broken transfer leaves nothing."""
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=size, desc=target.name, unit="B", unit_scale=True, enabled=progress) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"could not download {url}: {reason}. {how_to}") from exc
    part.replace(target)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, archive: Archive) -> None:
    """Compare the file's MD5 with the expected one; a mismatching file is moved aside, not kept."""
    if archive.md5 is None:
        return
    got = md5sum(path)
    if got != archive.md5:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        raise DownloadError(
            f"{path.name}: checksum mismatch: MD5 {got}, expected {archive.md5} (from {archive.md5_source}). "
            f"The file was moved to {bad}; it is corrupt or not the official archive. Delete it and retry."
        )


def _unpack(path: Path, dest: Path) -> Path:
    """Unzip ``path`` into ``dest/<stem>/`` (archives without a top folder get one); returns it.

    The archive is extracted whole into a hidden folder beside the target and swapped in with
    ``replace_dir``, so a corrupt archive or an interrupted extraction leaves an earlier unpacked copy intact.
    An archive with a top folder is unpacked with it and that folder is what gets swapped in,
    which is why this uses ``replace_dir`` rather than ``staged_dir``.
    """
    stem = path.name.removesuffix(".zip")
    root = dest.resolve()
    final = root / stem
    tmp = root / f".{stem}.unpacking-{uuid.uuid4().hex[:12]}"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            has_top = all(n == f"{stem}/" or n.startswith(f"{stem}/") for n in names)
            into = root if has_top else final
            for name in names:  # refuse entries that would escape their folder (zip slip)
                if not (into / name).resolve().is_relative_to(into):
                    raise DownloadError(f"{path}: unsafe path {name!r} in archive; not unpacked")
            zf.extractall(tmp)
        replace_dir(tmp / stem if has_top else tmp, final)
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{path}: not a valid zip archive ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
