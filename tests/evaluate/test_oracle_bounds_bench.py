"""``benchmarks/oracle_bounds.py``'s building blocks: the point-in-time topic mixes equal a
row-by-row loop over the log, the title topics are the world's own words, and its click formula
with the true topic match and quality is the oracle itself."""

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from feedrank.data.log import read_events
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig, load_world
from feedrank.evaluate.oracle import oracle_scores

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "oracle_bounds.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("oracle_bounds_bench", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    simulate(WorldConfig(users=60, items=40, days=2, seed=3), root / "log")
    world = load_world(root / "log")
    events = read_events(root / "log")
    log = {"user": world.user_index(events["user_id"]), "item": world.item_index(events["item_id"]),
           "ts": events["ts"].cast(pa.int64()).to_numpy(),
           "clicked": events["clicked"].to_numpy(zero_copy_only=False).astype(np.float64)}  # fmt: skip
    return world, log


def test_point_in_time_mixes_equal_a_loop_over_the_log(bench, world_log):
    world, log = world_log
    topics = world.item_topics.astype(np.float64)
    rng = np.random.default_rng(0)
    queries = rng.choice(len(log["ts"]), size=40, replace=False)  # impressions of the log: their own ts
    users, ts = log["user"][queries], log["ts"][queries]
    clicks, skips = bench.point_in_time_mixes(log, topics, users, ts)
    for row, (user, at) in enumerate(zip(users, ts)):
        before = (log["user"] == user) & (log["ts"] < at)  # strictly before: not the query's own request
        np.testing.assert_allclose(clicks[row], (topics[log["item"][before]] * log["clicked"][before, None]).sum(0), atol=1e-9)
        np.testing.assert_allclose(skips[row], (topics[log["item"][before]] * (1 - log["clicked"][before, None])).sum(0),
                                   atol=1e-9)  # fmt: skip
    assert (clicks.sum(1) > 0).any() and (skips.sum(1) > 0).any()  # the loop compared some non-empty histories


def test_title_topics_count_each_word_under_its_topic(bench, world_log):
    world, _ = world_log
    counts = bench.title_topics(world)
    assert counts.shape == world.item_topics.shape and (counts.sum(1) == 6).all()  # six words a title
    # a word is drawn from a topic of the item's own mix: never from a topic it has (almost) none of
    assert (world.item_topics[counts > 0] > 1e-6).all()


def test_utility_with_the_true_match_and_quality_is_the_oracle(bench, world_log):
    world, log = world_log
    h = bench.Holdout(user=log["user"], item=log["item"], ts_us=log["ts"], clicked=log["clicked"].astype(int),
                      seen=np.ones(len(log["ts"]), bool), request=np.zeros(len(log["ts"]), int),
                      ranker=np.zeros(len(log["ts"])), clicks_mix=np.zeros((1, 1)), skips_mix=np.zeros((1, 1)))  # fmt: skip
    got = bench.utility(world, h, world.topic_match(h.user, h.item), world.item_quality[h.item])
    ids = world.items_table()["item_id"].take(pa.array(h.item)), world.users_table()["user_id"].take(pa.array(h.user))
    np.testing.assert_allclose(got, oracle_scores(world, ids[1], ids[0], h.ts_us), rtol=1e-6)
