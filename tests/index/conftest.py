"""Fixtures for tests/index: a small clustered catalogue (uniform random vectors are a pathological
ANN case; real embeddings cluster by topic) and its item ids, and a typer app with the
`feedrank index` group registered (the CLI tests)."""

from __future__ import annotations

import numpy as np
import pytest
import typer

from feedrank.commands import index as index_commands


def clustered(n: int, dim: int, seed: int, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="session")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """2,000 unit vectors of dim 16 in 20 topics, ids 'i0'..'i1999'."""
    vectors = clustered(2000, 16, seed=0)
    return vectors, np.array([f"i{i}" for i in range(len(vectors))], dtype=object)


@pytest.fixture(scope="session")
def user_queries() -> np.ndarray:
    return clustered(300, 16, seed=1)


@pytest.fixture(scope="session")
def make_clustered():
    """``clustered`` itself, for tests that need their own sizes (conftest is not importable)."""
    return clustered


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """Keeps the test app a group."""

    index_commands.register(root)
    return root
