"""The serving user store's user x item-categorical counts equal the feature build's, impression by impression.

The store is seeded from the log before the split, then every test-period timestamp in turn: each
row's counters from ``UserView.cross_counters`` (what a feed request reads) must equal the feature
build's columns for that row, and only then are that timestamp's rows applied as live events (one
request's impressions are ranked before any of them is clicked: ties are excluded in both).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from feedrank.features.vocab import lookup_quiet
from feedrank.config import from_dict
from feedrank.data.log import read_events
from feedrank.features import FeatureConfig, Vocabularies, build_features, split_files
from feedrank.features.build import parse_ts
from feedrank.features.counters import cross_counter_columns
from feedrank.serving.state import EVENT_ID, SERVING_LOG_SCHEMA, UserStore

_spec = importlib.util.spec_from_file_location("streaming_world", Path(__file__).parents[1] / "features" / "streaming_world.py")
world = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(world)

CROSS = ["category", "publisher"]


@pytest.mark.parametrize("max_live_users", [1, 100_000])  # 1: records evicted and rebuilt from the journal
def test_served_cross_counters_equal_the_feature_build_for_every_next_impression(tmp_path, max_live_users) -> None:
    log = world.write_world(tmp_path / "log")
    cfg = from_dict(FeatureConfig, world.CONFIGS[world.ROWS_OF] | {"cross_counters": CROSS}, "features")
    build_features(log, tmp_path / "features", cfg, progress=False)
    vocabs = Vocabularies.load(tmp_path / "features" / "vocab")
    split, cutoff = parse_ts(cfg.split_at, "split_at"), parse_ts(cfg.cutoff, "cutoff")
    cross = {c: vocabs.item_cats[c] for c in CROSS}
    store = UserStore.from_log(log, vocabs.items, history_len=6, max_seen=10, end=split, cross=cross,
                               max_live_users=max_live_users)

    test = pa.concat_tables(pq.read_table(f) for f in split_files(tmp_path / "features", "test"))
    live = read_events(log, start=split, end=cutoff)
    live = live.append_column(SERVING_LOG_SCHEMA.field(EVENT_ID), pa.array([f"e{i}" for i in range(live.num_rows)]))
    ts_test, ts_live = (t["ts"].cast(pa.int64()).to_numpy() for t in (test, live))
    values = np.stack([test[f"{c}_idx"].to_numpy() for c in CROSS], axis=1)
    want = np.stack([test[c].to_numpy() for c in cross_counter_columns(CROSS)], axis=1)
    nonzero = 0
    for t in np.unique(ts_test):
        for r in np.flatnonzero(ts_test == t):
            got = store.view(test["user_id"][r].as_py(), split).cross_counters(values[r : r + 1])[0]
            assert got == pytest.approx(want[r], abs=0), (r, test["user_id"][r].as_py())
            nonzero += int(want[r].any())
        now = live.filter(pa.array(ts_live == t))
        store.apply(now, lookup_quiet(vocabs.items, now["item_id"]))
    assert nonzero > 50 and test.num_rows > 50
    assert max_live_users > 1 or store.rebuilt > 0
    assert pc.count_distinct(test["user_id"]).as_py() > 3
