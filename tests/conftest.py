"""Fixtures for the whole suite."""

import random

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One torch thread for every test. The suite's tensors are tiny and CI has two shared cores,
    where intra-op threads only add contention (measured: ~3 ms vs ~300 ms per training step with
    2 threads under load). Session-wide, so module-scoped fixtures that train run single-threaded
    too; the serving tests' own ``set_threads(1)`` (its default) agrees with it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state (torch, numpy, random), whatever ran
    before it: a model built without an explicit generator gets the same weights on every run, so
    no result depends on test order or on luck."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
