"""``simulate``: the streamed log on disk, its truth folder, its summary, and the CLI."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.data.log import list_days, read_events, read_items, read_users
from feedrank.data.schema import EVENT_SCHEMA, TS_TYPE, validate
from feedrank.data.simulate import SUMMARY_FILE, simulate
from feedrank.data.world import World, WorldConfig, load_world

# ~40k impressions over 2 days; chunk_rows small so every day is written in several chunks.
CFG = WorldConfig(users=2000, items=600, days=2, seed=3, chunk_rows=7_000)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate(CFG, out)
    return out, summary, read_events(out)


def parquet_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    cfg = WorldConfig(users=200, items=100, days=2, seed=9, chunk_rows=500)
    simulate(cfg, tmp_path / "a")
    simulate(cfg, tmp_path / "b")
    a, b = parquet_bytes(tmp_path / "a"), parquet_bytes(tmp_path / "b")
    assert len(a) > 5 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)
    simulate(WorldConfig(users=200, items=100, days=2, seed=10, chunk_rows=500), tmp_path / "c")
    assert not read_events(tmp_path / "a").equals(read_events(tmp_path / "c"))


def test_log_is_valid_canonical_and_partitioned_by_day(sim):
    out, _, events = sim
    assert events.schema == EVENT_SCHEMA
    report = validate(events)
    assert report.ok, str(report)
    assert list_days(out) == ["2024-01-01", "2024-01-02"]
    assert len(list((out / "events" / "date=2024-01-01").glob("part-*.parquet"))) > 1
    ts = events["ts"].to_numpy().astype("datetime64[us]")
    assert ts.min() >= np.datetime64("2024-01-01") and ts.max() < np.datetime64("2024-01-03")
    assert read_items(out).num_rows == CFG.items and read_users(out).num_rows == CFG.users
    assert pc.all(pc.starts_with(events["publisher"], "p")).as_py()


def test_every_request_is_a_full_feed_of_distinct_items(sim):
    _, _, events = sim
    per_request = events.group_by("request_id").aggregate(
        [("position", "min"), ("position", "max"), ("item_id", "count_distinct"), ("user_id", "count_distinct"),
         ("ts", "count_distinct"), ("position", "count")]
    )
    assert pc.all(pc.equal(per_request["position_count"], CFG.feed_size)).as_py()
    assert pc.all(pc.equal(per_request["item_id_count_distinct"], CFG.feed_size)).as_py()
    assert pc.max(per_request["position_max"]).as_py() == CFG.feed_size - 1
    assert pc.max(per_request["position_min"]).as_py() == 0
    assert pc.max(per_request["user_id_count_distinct"]).as_py() == 1
    assert pc.max(per_request["ts_count_distinct"]).as_py() == 1


def test_no_item_is_shown_or_engaged_before_it_exists(sim):
    _, _, events = sim
    assert not pc.any(pc.less(events["ts"], events["created_ts"])).as_py()
    # and items created during the window do get shown (and clicked) on their first day
    new = pc.greater_equal(events["created_ts"], pa.scalar(CFG.start, TS_TYPE))
    assert pc.any(pc.and_(new, events["clicked"])).as_py()


def test_position_bias_is_visible_and_follows_the_examination_curve(sim):
    out, _, events = sim
    pos, clicked = events["position"].to_numpy(), events["clicked"].to_numpy()
    ctr = np.array([clicked[pos == p].mean() for p in range(CFG.feed_size)])
    assert ctr[0] > 2 * ctr[-1]
    # Clicks / expected attraction per position isolates examination from the policy's ordering:
    # it must trace (1 + position) ** -0.8 (1.0 at the top, 0.158 at position 9).
    world = load_world(out)
    u, i = world.user_index(events["user_id"]), world.item_index(events["item_id"])
    ts = events["ts"].to_numpy().astype("datetime64[us]").astype(np.int64)
    attraction = world.true_affinity(u, i) * world.freshness(world.item_age_h(i, ts))
    ratio = np.array([clicked[pos == p].sum() / attraction[pos == p].sum() for p in range(CFG.feed_size)])
    np.testing.assert_allclose(ratio, world.examination(np.arange(CFG.feed_size)), rtol=0.15)


def test_higher_true_affinity_means_higher_ctr(sim):
    out, _, events = sim
    world = load_world(out)
    affinity = world.true_affinity(world.user_index(events["user_id"]), world.item_index(events["item_id"]))
    quintile = np.digitize(affinity, np.quantile(affinity, [0.2, 0.4, 0.6, 0.8]))
    clicked = events["clicked"].to_numpy()
    ctr = [clicked[quintile == q].mean() for q in range(5)]
    assert all(a < b for a, b in zip(ctr, ctr[1:])), ctr


def test_load_world_reproduces_the_truth(sim):
    out, _, _ = sim
    fresh, loaded = World.generate(CFG), load_world(out)
    assert loaded.config == CFG
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, CFG.users, 1000), rng.integers(0, CFG.items, 1000)
    np.testing.assert_array_equal(loaded.true_affinity(u, i), fresh.true_affinity(u, i))
    assert loaded.items_table().equals(read_items(out))
    assert loaded.users_table().equals(read_users(out))


def test_load_world_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="world.json"):
        load_world(tmp_path)


def test_summary_matches_the_log(sim):
    out, summary, events = sim
    clicked = events["clicked"].to_numpy()
    assert summary.events == events.num_rows
    assert summary.requests == pc.count_distinct(events["request_id"]).as_py()
    assert summary.clicks == clicked.sum()
    assert summary.ctr == pytest.approx(clicked.mean())
    assert summary.mean_dwell_s == pytest.approx(events["dwell_s"].to_numpy()[clicked].mean(), rel=1e-6)
    assert summary.share_rate == pytest.approx(events["shared"].to_numpy().mean())
    assert summary.hide_rate == pytest.approx(events["hidden"].to_numpy().mean())
    assert (summary.users, summary.items, summary.days) == (2000, 600, 2)
    assert 0.02 < summary.ctr < 0.3 and 0 < summary.share_rate < summary.ctr
    assert json.loads((out / SUMMARY_FILE).read_text()) == pytest.approx(summary.to_dict())


def test_refuses_a_non_empty_output_and_overwrite_keeps_other_files(tmp_path):
    cfg = WorldConfig(users=50, items=40, days=2, seed=1)
    simulate(cfg, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        simulate(cfg, tmp_path)
    simulate(WorldConfig(users=50, items=40, days=1, seed=1), tmp_path, overwrite=True)
    assert list_days(tmp_path) == ["2024-01-01"]  # the old second day is gone, not mixed in
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_simulates_and_prints_the_summary(tmp_path):
    config = tmp_path / "world.yaml"
    config.write_text("users: 5000\nitems: 80\ndays: 1\npolicy:\n  candidates: 20\n")
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--users", "60", "--seed", "4", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / SUMMARY_FILE).read_text())
    assert summary["users"] == 60 and summary["items"] == 80 and summary["days"] == 1
    assert f"{summary['events']:,}" in result.output and "CTR" in result.output
    assert load_world(tmp_path / "o").config.policy.candidates == 20


def test_cli_reports_bad_config_without_writing(tmp_path):
    config = tmp_path / "world.yaml"
    config.write_text("users: 10\nuserz: 5\n")
    result = CliRunner().invoke(app, ["simulate", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "unknown key(s) 'userz'" in result.output
    result = CliRunner().invoke(app, ["simulate", "--users", "-1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "users must be > 0" in result.output
    assert not (tmp_path / "o").exists()
