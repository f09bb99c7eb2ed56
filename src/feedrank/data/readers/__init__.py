"""Dataset readers: each turns one source layout into a ``ReadResult`` in the canonical shape.

``read(fmt, path)`` dispatches by format name; ``feedrank.data.ingest.ingest`` writes the result as
a partitioned event log. See each module for its layout and the mapping choices it documents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from feedrank.data.readers.common import BadInputError, NoRowsError, ReadResult, combine, denormalise
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


__all__ = [
    "READERS", "BadInputError", "ColumnMap", "NoRowsError", "ReadResult", "combine", "denormalise", "read",
    "read_ebnerd", "read_mind", "read_movielens", "read_tabular",
]  # fmt: skip
