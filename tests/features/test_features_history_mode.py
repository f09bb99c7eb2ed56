"""history_mode "other_engagements": profile histories for random-split protocols.

The sampler (feedrank.features.profile) is checked against hand-computed cases and a brute-force
set reference; the builder end to end for the guarantees the mode promises (never the row's own
item, only the same user's engagements, byte-identical builds) and for the default staying as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.config import ConfigError, from_dict
from feedrank.data.log import write_log
from feedrank.features import FeatureConfig, build_features, split_files
from feedrank.features.profile import ProfileSampler


def profiles(user, item, engaged, values, n: int, seed: int) -> ProfileSampler:
    """The sampler of rows ``user, item``: its pool is their engaged rows, in row order."""
    return ProfileSampler(user[engaged], item[engaged], values[engaged], n=n, seed=seed, n_item_codes=int(item.max()) + 1)


def histories(sampler: ProfileSampler, user, item) -> list[list[int]]:
    offsets, values = sampler.sample(user, item)
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(user))]


# ------------------------------------------------------------------------------------------------
# the sampler


def test_hand_computed_profiles():
    user = np.array([0, 0, 0, 1, 1, 2])
    item = np.array([10, 11, 12, 10, 13, 14])
    engaged = np.array([True, True, True, True, False, False])
    values = item * 100  # what the history holds, told apart from the grouping codes
    got = histories(profiles(user, item, engaged, values, n=5, seed=0), user, item)
    assert [sorted(h) for h in got] == [[1100, 1200], [1000, 1200], [1000, 1100], [], [1000], []]
    # n=1: one of the user's other items, never the row's own
    got = histories(profiles(user, item, engaged, values, n=1, seed=0), user, item)
    assert [len(h) for h in got] == [1, 1, 1, 0, 1, 0]
    assert got[0][0] in (1100, 1200) and got[1][0] in (1000, 1200) and got[2][0] in (1000, 1100)
    assert got[4] == [1000]
    # n=0: no history at all
    assert histories(profiles(user, item, engaged, values, n=0, seed=0), user, item) == [[]] * 6


def random_rows(seed: int, n: int = 400, n_users: int = 12, n_items: int = 30):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, n)
    item = rng.integers(0, n_items, n)  # repeats: a user may engage one item twice
    engaged = rng.random(n) < 0.6
    return user, item, engaged, item + 1000


@pytest.mark.parametrize("n", [1, 4, 100])
def test_histories_are_other_engagements_of_the_same_user(n):
    user, item, engaged, values = random_rows(1)
    got = histories(profiles(user, item, engaged, values, n=n, seed=3), user, item)
    for row, h in enumerate(got):
        others = values[(user == user[row]) & engaged & (item != item[row])]
        assert item[row] + 1000 not in h  # never the row's own item
        assert len(h) == min(n, len(others))
        # a sample without replacement of the user's other engagements (as a multiset)
        left = list(others)
        for v in h:
            left.remove(v)


def test_chunked_sampling_equals_one_pass_and_is_deterministic():
    user, item, engaged, values = random_rows(2)
    whole = profiles(user, item, engaged, values, n=3, seed=7).sample(user, item)
    again = profiles(user, item, engaged, values, n=3, seed=7)
    parts = [again.sample(user[lo : lo + 37], item[lo : lo + 37]) for lo in range(0, len(user), 37)]
    assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
    assert np.array_equal(np.concatenate([[0], *(np.diff(p[0]) for p in parts)]).cumsum(), whole[0])
    other_seed = profiles(user, item, engaged, values, n=3, seed=8).sample(user, item)
    assert not np.array_equal(other_seed[1], whole[1])


def test_rows_of_one_user_see_different_samples():
    """The per-row window start makes the sample a dropout over the profile, not one fixed subset
    (windows of one shuffled order: a user has at most as many distinct subsets as engagements;
    200 seeded starts over 200 positions hit about 200 * (1 - 1/e) = 126 of them)."""
    user = np.zeros(200, dtype=np.int64)
    item = np.arange(200)
    got = histories(profiles(user, item, np.ones(200, bool), item, n=5, seed=0), user, item)
    assert len({tuple(sorted(h)) for h in got}) > 100


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="must be 1-d of one length"):
        ProfileSampler(np.zeros(3), np.zeros(2), np.zeros(3), n=2, seed=0, n_item_codes=1)
    with pytest.raises(ValueError, match="history length must be >= 0, got -1"):
        ProfileSampler(np.zeros(3), np.zeros(3), np.zeros(3), n=-1, seed=0, n_item_codes=1)


# ------------------------------------------------------------------------------------------------
# the builder


def small_log(seed: int = 0, n: int = 300) -> pa.Table:
    """Rows with distinct timestamps per request, clicks and a few hidden clicks (not engagements)."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 10, n)
    item = rng.integers(0, 25, n)
    clicked = rng.random(n) < 0.7
    ts = np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64) + np.arange(n) * 60_000_000
    return pa.table({
        "user_id": [f"u{u}" for u in user],
        "item_id": [f"i{i}" for i in item],
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "request_id": [f"r{r}" for r in range(n)],
        "position": np.zeros(n, np.int32),
        "clicked": clicked,
        "dwell_s": np.zeros(n, np.float32),
        "shared": np.zeros(n, bool),
        "hidden": clicked & (rng.random(n) < 0.1),
        "publisher": [f"pub{i % 3}" for i in item],
        "item_type": ["article"] * n,
        "created_ts": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "category": [f"cat{i % 4}" for i in item],
        "age_bucket": [f"age{u % 3}" for u in user],
        "country": ["DE"] * n,
    })  # fmt: skip


def build(tmp: Path, name: str, **cfg) -> tuple[pa.Table, dict]:
    log = tmp / "log"
    if not log.exists():
        assert write_log(log, small_log()).ok
    result = build_features(log, tmp / name, FeatureConfig(**cfg), progress=False)
    return pa.concat_tables([pq.read_table(p) for p in split_files(tmp / name)]), result.manifest


def test_build_histories_are_the_users_other_engagements(tmp_path):
    rows, _ = build(tmp_path, "oe", history_mode="other_engagements", history_len=4, rows_per_file=70)
    d = rows.to_pydict()
    engaged_by_user: dict[str, set[int]] = {}
    for u, i, c, h in zip(d["user_id"], d["item_idx"], d["clicked"], d["hidden"]):
        if c and not h:
            engaged_by_user.setdefault(u, set()).add(i)
    lengths = [len(h) for h in d["history"]]
    assert max(lengths) == 4 and sum(lengths) > 3 * len(lengths)  # the sample really is filled
    for u, i, h in zip(d["user_id"], d["item_idx"], d["history"]):
        assert i not in h, (u, i, h)
        assert set(h) <= engaged_by_user.get(u, set()) - {i}
        assert len(h) == min(4, len(engaged_by_user.get(u, set()) - {i})) or len(h) == 4  # repeats may fill it


def test_build_is_byte_identical_and_the_default_is_point_in_time(tmp_path):
    _, a = build(tmp_path, "a", history_mode="other_engagements", history_len=3, rows_per_file=70)
    _, b = build(tmp_path, "b", history_mode="other_engagements", history_len=3, rows_per_file=70)
    assert a["content_hash"] == b["content_hash"] and a["config"]["history_mode"] == "other_engagements"
    _, c = build(tmp_path, "c", history_mode="other_engagements", history_len=3, rows_per_file=70, history_seed=1)
    assert [f["sha256"] for f in c["splits"]["train"]["files"]] != [f["sha256"] for f in a["splits"]["train"]["files"]]
    default, _ = build(tmp_path, "d", history_len=3)
    explicit, _ = build(tmp_path, "e", history_len=3, history_mode="point_in_time")
    assert default.equals(explicit)
    ts = default["ts"].cast(pa.int64()).to_pylist()
    d = default.to_pydict()
    for row in (10, 150, 299):  # point-in-time: the last 3 engagements strictly before the row
        before = [i for t, u, i, c, h in zip(ts, d["user_id"], d["item_idx"], d["clicked"], d["hidden"])
                  if t < ts[row] and u == d["user_id"][row] and c and not h]  # fmt: skip
        assert d["history"][row] == before[-3:]


def test_config_refuses_other_engagements_on_a_time_split():
    with pytest.raises(ConfigError, match="history_mode: expected one of"):
        from_dict(FeatureConfig, {"history_mode": "recent"})
    with pytest.raises(ConfigError, match="not with split_at"):
        from_dict(FeatureConfig, {"history_mode": "other_engagements", "split_at": "2024-01-02T00:00:00"})
    assert from_dict(FeatureConfig, {}).history_mode == "point_in_time"
