"""Fixtures shared by the training-task tests (retrieval and ranking)."""

import pytest

from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny simulated log (300 users, 150 items, 4 days), built once per test module."""
    out = tmp_path_factory.mktemp("world")
    simulate(WorldConfig(users=300, items=150, days=4, seed=1), out)
    return out
