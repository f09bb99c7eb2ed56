"""The chunked (streaming) feature build and catalogue give exactly what the in-memory ones gave.

``data/streaming_expected.json`` was recorded by ``streaming_world.py`` with main's in-memory build
(b22fa92, before the build streamed): every file's sha256 in the manifest, and every column of the
``split`` build. Chunk sizes down to 1 row put chunk boundaries inside every request and day, so
ties, histories longer than a chunk and items first seen mid-log all cross a boundary.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from feedrank.config import from_dict
from feedrank.data.log import read_events
from feedrank.features import FeatureConfig, build_features

_spec = importlib.util.spec_from_file_location("streaming_world", Path(__file__).with_name("streaming_world.py"))
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)
EXPECTED = json.loads(world.EXPECTED.read_text())


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    return world.write_world(tmp_path_factory.mktemp("world") / "log")


@pytest.mark.parametrize("name", list(world.CONFIGS))
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1_000_000])
def test_chunked_build_equals_the_in_memory_build(log, tmp_path, name, chunk_rows) -> None:
    cfg = from_dict(FeatureConfig, world.CONFIGS[name], "features")
    result = build_features(log, tmp_path / "out", cfg, progress=False, chunk_rows=chunk_rows)
    want = EXPECTED[name]
    if name == world.ROWS_OF:  # column by column first: a failure names the column
        got = world.split_rows(tmp_path / "out")
        assert got.keys() == want["rows"].keys()
        for split, columns in want["rows"].items():
            for column, values in columns.items():
                assert got[split][column] == values, (split, column)
    assert world.comparable(result.manifest) == want["manifest"]  # every file's bytes, vocabularies, counts


def test_catalogue_read_batch_by_batch_equals_the_whole_table(log, tmp_path) -> None:
    from feedrank.bundle import build_catalogue

    build_features(log, tmp_path / world.ROWS_OF, from_dict(FeatureConfig, world.CONFIGS[world.ROWS_OF], "features"),
                   progress=False)  # fmt: skip
    assert world.catalogue_rows(world.training_catalogue_of(log, tmp_path / world.ROWS_OF)) == EXPECTED["catalogue"]
    # build_catalogue folds batches in log order: a table, or its batches of 5 rows, give one catalogue
    from feedrank.features.vocab import Vocabularies

    vocabs = Vocabularies.load(tmp_path / world.ROWS_OF / "vocab")
    end = from_dict(FeatureConfig, world.CONFIGS[world.ROWS_OF], "features").split_at
    events = read_events(log, end=_ts(end))
    assert build_catalogue(events.to_batches(max_chunksize=5), vocabs).equals(build_catalogue(events, vocabs))


def _ts(value: str):
    from feedrank.features.build import parse_ts

    return parse_ts(value, "split_at")
