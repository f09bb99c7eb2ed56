"""Shared fixtures for tests/data.

``rfx``: the dataset fixture writers of ``fixtures_readers.py`` (tiny files in the real MIND,
MovieLens, EB-NeRD formats). Test modules cannot import each other under importlib mode, so the
helper module is loaded from its path once and handed out as a fixture.
"""

import importlib.util
from pathlib import Path

import pytest


def _load_readers_fixtures():
    path = Path(__file__).with_name("fixtures_readers.py")
    spec = importlib.util.spec_from_file_location("fixtures_readers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rfx():
    return _load_readers_fixtures()
