"""The package layers, enforced: a lower layer never imports a higher one.

docs/architecture.md draws the layers; this test reads every module's imports (with ``ast``, so
nothing is imported) and fails naming the module and the import that crosses a line, e.g.
``evaluate/ranking.py imports feedrank.train.task``. Imports inside functions count too: a lazy
import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "feedrank"

#: package -> the feedrank packages it must never import.
#: (``data`` may read ``features``: its collator packs the feature build's example schema.)
FORBIDDEN: dict[str, set[str]] = {
    "data": {"models", "train", "evaluate", "index", "serving", "experiment", "labs", "commands"},
    "features": {"models", "train", "evaluate", "index", "serving", "experiment", "labs", "commands"},
    "models": {"train", "evaluate", "index", "serving", "experiment", "labs", "commands"},
    "index": {"train", "evaluate", "serving", "experiment", "labs", "commands"},
    "evaluate": {"train", "serving", "experiment", "labs", "commands"},
    "serving": {"train", "evaluate", "experiment", "labs", "commands"},
    "train": {"serving", "experiment", "labs", "commands"},
}


def imported_packages(path: Path) -> set[str]:
    """The ``feedrank.<package>`` names a module imports, absolute or relative."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                names.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module:
                names.add(node.module)
    return {n.split(".")[1] for n in names if n.startswith("feedrank.") and n.count(".") >= 1}


def test_the_package_map_names_every_layer_checked():
    assert set(FORBIDDEN) <= {p.name for p in PACKAGE.iterdir() if p.is_dir()}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_lower_layer_never_imports_a_higher_one(layer):
    crossings = [f"{path.relative_to(PACKAGE)} imports feedrank.{package}"
                 for path in sorted((PACKAGE / layer).rglob("*.py"))
                 for package in sorted(imported_packages(path) & FORBIDDEN[layer])]  # fmt: skip
    assert not crossings, "\n".join(crossings)
