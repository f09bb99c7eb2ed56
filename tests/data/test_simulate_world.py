"""The synthetic world's ground truth and response model, tested without writing a log."""

from pathlib import Path

import numpy as np
import pytest

from feedrank.config import ConfigError, from_dict, load_yaml
from feedrank.data.world import LoggingPolicy, World, WorldConfig
from feedrank.data.world.world import AGE_BUCKETS

US_PER_HOUR = 3_600 * 1_000_000


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(WorldConfig(users=300, items=200, days=2, seed=11))


def day0_noon(world: World) -> int:
    return int(world.config.start.timestamp()) * 1_000_000 + 12 * US_PER_HOUR


def test_generate_is_deterministic_and_seed_dependent():
    a = World.generate(WorldConfig(users=50, items=40, seed=1))
    b = World.generate(WorldConfig(users=50, items=40, seed=1))
    c = World.generate(WorldConfig(users=50, items=40, seed=2))
    np.testing.assert_array_equal(a.user_topics, b.user_topics)
    np.testing.assert_array_equal(a.item_created_us, b.item_created_us)
    assert a.items_table().equals(b.items_table())
    assert not np.array_equal(a.user_topics, c.user_topics)


def test_world_shapes_and_catalogue_arrival(world):
    c = world.config
    assert world.user_topics.shape == (300, c.topics)
    np.testing.assert_allclose(world.user_topics.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(world.item_topics.sum(axis=1), 1.0, rtol=1e-5)
    start = int(c.start.timestamp()) * 1_000_000
    before = (world.item_created_us < start).sum()
    assert before == c.items_before_window == 100  # new_item_share 0.5 of 200
    assert world.item_created_us.max() < start + c.days * 24 * US_PER_HOUR
    assert set(world.items_table()["item_type"].to_pylist()) <= set(c.item_type_shares)
    assert world.users_table()["user_id"].to_pylist()[:2] == ["u0", "u1"]


def test_activity_is_heterogeneous(world):
    activity = np.sort(world.user_activity)[::-1]
    top_decile_share = activity[: len(activity) // 10].sum() / activity.sum()
    assert top_decile_share > 0.3  # a gamma(0.6) population: heavy users dominate traffic


def test_demographics_carry_signal_about_interests():
    w = World.generate(WorldConfig(users=4000, items=50, demographic_strength=1.0, seed=5))
    means = np.stack([w.user_topics[w.user_age == a].mean(axis=0) for a in range(len(AGE_BUCKETS))])
    # Group means differ far more than sampling noise would make them (~0.01 with ~800 users).
    assert np.abs(means - means.mean(axis=0)).max() > 0.05


def test_true_affinity_matches_hand_computation(world):
    r = world.config.response
    u, i = np.array([0, 5, 7]), np.array([3, 3, 150])
    cos = np.array([
        world.user_topics[a] @ world.item_topics[b] / np.linalg.norm(world.user_topics[a]) / np.linalg.norm(world.item_topics[b])
        for a, b in zip(u, i)
    ])
    expected = 1 / (1 + np.exp(-(r.click_bias + r.affinity_weight * cos + r.quality_weight * world.item_quality[i])))
    np.testing.assert_allclose(world.true_affinity(u, i), expected, rtol=1e-5)
    # Broadcasting scores a user block against the catalogue, consistent with pairwise calls.
    block = world.true_affinity(u[:, None], np.arange(world.n_items)[None, :])
    assert block.shape == (3, world.n_items)
    np.testing.assert_allclose(block[[0, 1, 2], [3, 3, 150]], expected, rtol=1e-5)


def test_examination_and_freshness_curves(world):
    np.testing.assert_allclose(world.examination(np.array([0, 1, 3])), [1.0, 2**-0.8, 4**-0.8])
    r = world.config.response  # half-life 48 h, floor 0.2
    np.testing.assert_allclose(world.freshness(np.array([0.0, 48.0, 96.0, -1.0])), [1.0, 0.6, 0.4, 0.0])
    assert r.freshness_half_life_h == 48.0 and r.freshness_floor == 0.2
    with pytest.raises(ValueError, match="positions must be >= 0"):
        world.examination(np.array([0, -1]))


def test_respond_outcome_invariants(world):
    rng = np.random.default_rng(0)
    n = 50_000
    u = rng.integers(0, world.n_users, n)
    i = rng.integers(0, world.n_items, n)
    ts = np.full(n, day0_noon(world))  # most items created during the window do not exist yet
    out = world.respond(u, i, rng.integers(0, 10, n), ts, rng)
    assert out.clicked.any() and out.shared.any() and out.hidden.any()
    assert np.all(out.dwell_s[~out.clicked] == 0) and np.all(out.dwell_s[out.clicked] > 0)
    assert not np.any(out.shared & ~out.clicked)
    assert not np.any(out.hidden & out.clicked)
    created_later = world.item_created_us[i] > ts
    assert created_later.any() and not out.clicked[created_later].any()


def test_respond_click_rate_is_examination_times_attraction(world):
    # One (user, item) pair shown many times at position 3: the click rate must be the product.
    u = np.argmax(world.user_topics[:, 0])
    item = int(np.argmin(world.item_created_us))  # exists long before ts
    ts = day0_noon(world)
    n = 200_000
    out = world.respond(np.full(n, u), np.full(n, item), np.full(n, 3), np.full(n, ts), np.random.default_rng(1))
    age_h = (ts - world.item_created_us[item]) / US_PER_HOUR
    expected = 4**-0.8 * world.true_affinity(np.array([u]), np.array([item]))[0] * world.freshness(age_h)
    assert abs(out.clicked.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-4


def test_respond_is_deterministic_given_rng_and_accepts_datetime64(world):
    u, i, p = np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([0, 1, 2])
    ts = np.full(3, day0_noon(world))
    a = world.respond(u, i, p, ts, np.random.default_rng(7))
    b = world.respond(u, i, p, ts.astype("datetime64[us]"), np.random.default_rng(7))
    np.testing.assert_array_equal(a.dwell_s, b.dwell_s)


def test_respond_rejects_bad_input(world):
    rng = np.random.default_rng(0)
    ts = np.full(2, day0_noon(world))
    with pytest.raises(ValueError, match="must have one shape"):
        world.respond(np.array([0, 1]), np.array([0, 1, 2]), np.array([0, 1]), ts, rng)
    with pytest.raises(IndexError, match=r"item_idx: 1 index\(es\) outside \[0, 200\), e.g. 200"):
        world.respond(np.array([0, 1]), np.array([0, 200]), np.array([0, 1]), ts, rng)
    with pytest.raises(TypeError, match="user_idx must be integer"):
        world.true_affinity(np.array([0.5]), np.array([1]))
    with pytest.raises(TypeError, match="ts must be int64 microseconds"):
        world.respond(np.array([0]), np.array([0]), np.array([0]), np.array([1.5]), rng)


def test_id_parsing_round_trips_and_names_unknown_ids(world):
    np.testing.assert_array_equal(world.item_index(["i0", "i199", "i7"]), [0, 199, 7])
    with pytest.raises(KeyError, match="unknown user id.*u300"):
        world.user_index(["u1", "u300"])
    with pytest.raises(KeyError, match="not of the form u<index>.*'x9'"):
        world.user_index(["x9"])


def test_policy_feeds_are_distinct_live_and_biased_towards_interests(world):
    policy = LoggingPolicy(world, np.random.default_rng(0))
    start = int(world.config.start.timestamp()) * 1_000_000
    policy.start_day(start)
    rng = np.random.default_rng(1)
    users = rng.integers(0, world.n_users, 3000)
    ts = start + rng.integers(0, 24 * US_PER_HOUR, 3000)
    feed = policy.choose(users, ts, rng)
    assert feed.shape == (3000, 10)
    assert all(len(set(row)) == 10 for row in feed[:200])
    assert np.all(np.sort(feed, axis=1)[:, 1:] != np.sort(feed, axis=1)[:, :-1])
    assert np.all(world.item_created_us[feed] <= ts[:, None])
    shown = world.true_affinity(np.repeat(users, 10), feed.ravel()).mean()
    random = world.true_affinity(users[:, None], np.arange(world.n_items)[None, :]).mean()
    assert shown > random + 0.05  # selection bias: the policy shows what users tend to like
    alive = (world.item_created_us <= ts.max()).sum()
    assert len(np.unique(feed)) > 0.9 * alive  # ... yet the log covers the catalogue


def test_policy_fills_feeds_from_a_tiny_catalogue(monkeypatch):
    # Exactly feed_size items exist at the start: candidates repeat, the exhaustive draw fills in.
    w = World.generate(WorldConfig(users=20, items=20, feed_size=10, new_item_share=0.5, seed=3))
    policy = LoggingPolicy(w, np.random.default_rng(0))
    filled = []
    exhaustive = policy._exhaustive
    monkeypatch.setattr(policy, "_exhaustive", lambda u, t, rng: filled.append(len(u)) or exhaustive(u, t, rng))
    start = int(w.config.start.timestamp()) * 1_000_000
    policy.start_day(start)
    ts = np.full(20, start + 1)
    feed = policy.choose(np.arange(20), ts, np.random.default_rng(0))
    assert filled and filled[0] > 0
    assert np.all(np.sort(feed, axis=1)[:, 1:] != np.sort(feed, axis=1)[:, :-1])
    assert np.all(w.item_created_us[feed] <= ts[:, None])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"users": -5}, "users must be > 0, got -5"),
        ({"colour": "blue"}, "unknown key(s) 'colour'"),
        ({"response": {"position_decay": -1.0}}, "response: position_decay must be >= 0"),
        ({"policy": {"topic_shar": 0.3}}, "policy: unknown key(s) 'topic_shar'"),
        ({"items": 15, "feed_size": 10}, "only 7 item(s) exist before the window"),
        ({"start_date": "2024-13-01"}, "start_date must be YYYY-MM-DD"),
        ({"item_type_shares": {"podcast": 1.0}}, "type_dwell_log_offset has no entry for item type(s) ['podcast']"),
    ],
)
def test_bad_config_is_named(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(WorldConfig, data)
    assert message in str(err.value)


def test_demo_config_loads():
    cfg = load_yaml(WorldConfig, Path(__file__).parents[2] / "configs" / "world_demo.yaml")
    assert cfg.users == 10_000 and cfg.policy.candidates == 40 and cfg.response.position_decay == 0.8
