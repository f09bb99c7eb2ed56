"""Atomic filesystem writes: the one implementation every artifact writer uses.

Every artifact feedrank writes (a log day, a feature build, a bundle, an index, a checkpoint, a
metrics file, a serving-log file) follows the same rule: write it completely under a hidden name
beside its final place, then rename it into place, so a reader sees the old artifact or the new
one, never half of one, and a failed write leaves the old one untouched. Hidden (leading ".")
names matter: pyarrow datasets, ``list_days`` and ``log_hash`` skip them, so an in-flight write
is invisible to readers.

- ``staged_file(final, durable)``: a temporary path for one file, ``os.replace``'d onto ``final``.
  ``durable`` adds the fsyncs (file, then directory) that make the rename survive a power cut.
- ``staged_dir(final)``: a temporary folder that replaces the folder ``final`` (``replace_dir``).
- ``replace_dir(tmp, final)``: the folder swap itself. A folder cannot be renamed over a
  non-empty one, so the old folder is renamed aside first (``final`` is briefly absent: a reader
  racing the swap gets "not found", never a mix) and restored if the second rename fails.

Example::

    with staged_dir(Path("runs/features")) as tmp:
        (tmp / "manifest.json").write_text("{}")   # an exception here leaves runs/features as it was
    with staged_file(Path("ckpt/ckpt_000000100.pt"), durable=True) as tmp:
        torch.save(payload, tmp)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_file(final: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``final``; on a clean exit move it onto ``final``.

    The temporary name is ``.<final name>.<random>.tmp`` (unique per call, so concurrent writers
    never share one). On an exception the temporary file is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(final.parent)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a new hidden folder beside ``final``; on a clean exit it replaces ``final`` (``replace_dir``).

    On an exception the temporary folder is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the fully written folder ``tmp`` to ``final`` (same filesystem), replacing what was there.

    An old ``final`` is renamed aside, then ``tmp`` renamed in, then the old one deleted; if the
    second rename fails the old folder is put back. Deleting the old folder is best effort: the
    new one is already in place, and a leftover hidden ``.<name>.old-*`` folder harms no reader.
    """
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (artifact files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
