"""Package attributes imported on first use (PEP 562), so that importing a light submodule such as
``feedrank.index.config`` does not run the package's heavy imports (FAISS, pyarrow, scipy).

Example (in a package ``__init__.py``)::

    _EXPORTS = {"IndexConfig": "config", "build_index": "build"}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
    __all__ = sorted(_EXPORTS)

``from feedrank.index import build_index`` then imports ``feedrank.index.build`` at that moment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: name -> the submodule (relative) defining it."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
