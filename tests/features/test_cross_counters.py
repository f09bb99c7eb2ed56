"""User x item-categorical counters (``features.cross_counters``): a brute-force count, chunk sizes, config checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from feedrank.config import from_dict
from feedrank.features import FeatureConfig, build_features
from feedrank.features.counters import cross_counter_columns

_spec = importlib.util.spec_from_file_location("streaming_world", Path(__file__).with_name("streaming_world.py"))
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)

CROSS = ["category", "publisher"]


@pytest.fixture(scope="module")
def log(tmp_path_factory) -> Path:
    return world.write_world(tmp_path_factory.mktemp("world") / "log")


def _config() -> FeatureConfig:
    # the streaming test's split build (OOV and null categories, ties within and across requests, a cutoff)
    return from_dict(FeatureConfig, world.CONFIGS[world.ROWS_OF] | {"cross_counters": CROSS}, "features")


def test_cross_counters_equal_a_brute_force_count_with_ties(log, tmp_path) -> None:
    result = build_features(log, tmp_path / "out", _config(), progress=False, chunk_rows=7)
    rows = world.split_rows(tmp_path / "out")
    keys = ["ts", "user_id", "clicked", *(f"{c}_idx" for c in CROSS), *cross_counter_columns(CROSS)]
    table = {k: np.concatenate([np.asarray(rows[s][k]) for s in ("train", "test")]) for k in keys}
    ts, user, clicked = table["ts"], table["user_id"], table["clicked"].astype(bool)
    assert len(np.unique(ts)) < len(ts) / 2, "the log must have ties for this test to mean anything"
    checked_nonzero = 0
    for col in CROSS:
        value = table[f"{col}_idx"]
        for r in range(len(ts)):
            earlier = (user == user[r]) & (value == value[r]) & (ts < ts[r])  # strictly before: ties excluded
            want = np.log1p([earlier.sum(), (earlier & clicked).sum()]).astype(np.float32)
            got = [table[f"user_{col}_impressions"][r], table[f"user_{col}_clicks"][r]]
            assert got == pytest.approx(want, abs=1e-6), (col, r)
            checked_nonzero += int(earlier.any())
    assert checked_nonzero > 100
    assert result.manifest["columns"]["cross_counters"] == list(cross_counter_columns(CROSS))


def test_cross_counters_do_not_depend_on_the_chunk_size(log, tmp_path) -> None:
    hashes = {build_features(log, tmp_path / str(n), _config(), progress=False, chunk_rows=n).manifest["content_hash"]
              for n in (1, 7, 64, 1_000_000)}  # fmt: skip
    assert len(hashes) == 1


@pytest.mark.parametrize("bad", [["title"], ["category", "category"], ["user_id"]])
def test_cross_counters_must_be_distinct_item_categoricals(bad) -> None:
    with pytest.raises(ValueError, match="cross_counters must be distinct item categorical columns"):
        FeatureConfig(cross_counters=bad).validate()
