"""Dataset readers: each turns one source layout into a ``ReadResult`` in the canonical shape.

``read(fmt, path)`` dispatches by format name; ``feedrank.data.ingest.ingest`` writes the result as
a partitioned event log. See each module for its layout and the mapping choices it documents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from feedrank.data.readers.common import (
    BadInputError,
    NoRowsError,
    ReadResult,
    combine,
    denormalise,
    items_without_metadata,
)
from feedrank.data.readers.ebnerd import read_ebnerd
from feedrank.data.readers.mind import read_mind
from feedrank.data.readers.movielens import read_movielens
from feedrank.data.readers.tabular import ColumnMap, read_tabular

READERS: dict[str, Callable[..., ReadResult]] = {
    "mind": read_mind,
    "movielens": read_movielens,
    "ebnerd": read_ebnerd,
    "tabular": read_tabular,
}


def read(fmt: str, path: str | Path, skip_bad_rows: bool = False, columns: ColumnMap | None = None) -> ReadResult:
    """Read ``path`` in format ``fmt`` (one of ``READERS``); ``columns`` applies to ``tabular`` only."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(READERS)}")
    if columns is not None and fmt != "tabular":
        raise ValueError(f"a column mapping applies to the tabular format only, not {fmt!r}")
    if fmt == "tabular":
        return read_tabular(path, columns, skip_bad_rows=skip_bad_rows)
    return READERS[fmt](path, skip_bad_rows=skip_bad_rows)


def read_many(
    fmt: str, paths: list[str | Path], skip_bad_rows: bool = False, columns: ColumnMap | None = None
) -> ReadResult:
    """Read several sources of format ``fmt`` (MIND train and dev) and ``combine`` them.

    The same source given twice is refused: every row would be read twice and every day refused
    as duplicates. MIND request ids are prefixed by the folder's name; folders that share a name
    (``a/train``, ``b/train``) are named by the shortest path suffix that tells them apart.
    """
    resolved = [Path(p).resolve() for p in paths]
    first: dict[Path, str | Path] = {}
    for given, path in zip(paths, resolved):
        if path in first:
            raise ValueError(f"{given}: given twice (the same source as {first[path]}); "
                             "each source is read once, else every row would be a duplicate")  # fmt: skip
        first[path] = given
    if fmt == "mind":
        return combine([read_mind(p, split=name, skip_bad_rows=skip_bad_rows) for p, name in zip(paths, distinct_names(resolved))])
    return combine([read(fmt, p, skip_bad_rows=skip_bad_rows, columns=columns) for p in paths])


def distinct_names(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of each path that no other path shares: ``[a/train, b/train]``
    for ``/x/a/train`` and ``/y/b/train``, just ``[train, dev]`` for ``/x/train`` and ``/x/dev``."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise ValueError(f"paths are not distinct: {[str(p) for p in paths]}")


__all__ = [
    "READERS", "BadInputError", "ColumnMap", "NoRowsError", "ReadResult", "combine", "denormalise",
    "distinct_names", "items_without_metadata", "read", "read_ebnerd", "read_many", "read_mind", "read_movielens",
    "read_tabular",
]  # fmt: skip
