"""The simulated A/B test on tiny synthetic worlds: one experiment through real feed services, its
log, the CLI, bad input; and (slow) the A/A false-positive rate and the power against the plan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from feedrank.bundle import Bundle, build_catalogue, build_two_tower, load_bundle, save_bundle
from feedrank.cli import app
from feedrank.data.log import read_events
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig, load_world
from feedrank.experiment.analyze import analyze
from feedrank.experiment.assignment import assign
from feedrank.experiment.power import Design, MetricModel, estimate_from_users, power, sample_size
from feedrank.experiment.simulate_ab import (
    ABSimConfig,
    Requests,
    Served,
    events_table,
    replicate_feeds,
    replicate_users,
    respond,
    serve_population,
    simulate_ab,
    true_ctr,
)
from feedrank.features.vocab import Vocabularies

runner = CliRunner()
TT_CONFIG = {"two_tower": {"dim": 16, "user_id_dim": 8, "item_id_dim": 16, "cat_dim": 4, "freshness_dim": 4,
                           "hidden": [32], "dropout": 0.0, "max_history_len": 20}}  # fmt: skip
LOG_COLUMNS = ["user_id", "item_id", "ts", "position", "clicked", "dwell_s", "hidden"]


def make_world(root: Path, users: int) -> tuple[Path, Bundle]:
    """A simulated world and an untrained (seeded) two-tower bundle over its log."""
    simulate(WorldConfig(users=users, items=150, days=3, seed=1), root / "log")
    events = read_events(root / "log")
    vocabs = Vocabularies.build(events)
    torch.manual_seed(0)
    model = build_two_tower(TT_CONFIG, vocabs)
    path = save_bundle(root / "two_tower", kind="two_tower", model=model, config=TT_CONFIG, vocabs=vocabs,
                       catalogue=build_catalogue(events, vocabs))  # fmt: skip
    return root / "log", load_bundle(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Bundle]:
    return make_world(tmp_path_factory.mktemp("ab_tiny"), users=200)


@pytest.fixture(scope="module")
def aa_run(tiny, tmp_path_factory):
    """One A/A experiment with its log kept."""
    world, bundle = tiny
    out = tmp_path_factory.mktemp("aa") / "run"
    cfg = ABSimConfig(days=2, salt="aa-1", seed=3)
    return simulate_ab(world, {"control": (bundle, None), "treatment": (bundle.path, None)}, cfg, out_dir=out), out


def test_identical_arms_give_a_balanced_non_significant_experiment(aa_run):
    result, _ = aa_run
    a = result.analysis
    assert a.srm.ok
    assert sum(s.users_assigned for s in result.arms.values()) == result.population == 200
    ctr = next(m for m in a.metrics if m.metric == "ctr")
    assert not ctr.significant and ctr.rel_ci[0] < 0 < ctr.rel_ci[1]
    assert [g.verdict for g in a.guardrails if g.metric != "latency_p99_ms"] == ["ok", "ok"]
    assert set(result.arms) == {"control", "treatment"} and result.arms["control"].model == result.arms["treatment"].model
    text = result.render_text()
    assert "sample ratio OK" in text and "200 users, 2 day(s)" in text


def test_the_log_matches_what_was_served_and_the_assignment(aa_run, tiny):
    result, out = aa_run
    events = read_events(out, columns=LOG_COLUMNS + ["request_id", "publisher"])
    served = result.served
    assert events.num_rows == sum(int(s.shown.sum()) for s in served.values())
    assert pc.sum(events["clicked"]).as_py() == sum(int(s.outcomes.clicked.sum()) for s in served.values())
    # every user's rows are in the arm the salted hash (and the assignment file) gives them
    assignment = pq.read_table(out / "assignment.parquet")
    assert assignment.num_rows == 200
    np.testing.assert_array_equal(assign(assignment["user_id"], "aa-1", ["control", "treatment"]),
                                  assignment["arm"].to_numpy(zero_copy_only=False))  # fmt: skip
    arm_of = dict(zip(assignment["user_id"].to_pylist(), assignment["arm"].to_pylist()))
    arm_prefix = [r.split("-")[0] for r in events["request_id"].to_pylist()]
    assert arm_prefix == [arm_of[u] for u in events["user_id"].to_pylist()]
    # each arm's own serving log (FeedService.record_events) holds exactly that arm's rows
    for name in ("control", "treatment"):
        mine = events.filter(pc.starts_with(events["request_id"], f"{name}-")).select(LOG_COLUMNS)
        serving = read_events(out / "serving" / name, columns=LOG_COLUMNS)
        keys = [("ts", "ascending"), ("user_id", "ascending"), ("position", "ascending")]
        assert serving.sort_by(keys).equals(mine.sort_by(keys))
    # feedback reached the services: no user was shown the same item twice
    pairs = pc.binary_join_element_wise(events["user_id"], events["item_id"], ":")
    assert pc.count_distinct(pairs).as_py() == events.num_rows
    saved = json.loads((out / "result.json").read_text())
    assert saved["analysis"]["users"] == result.analysis.users


def test_the_same_seed_gives_the_same_experiment(aa_run, tiny):
    result, _ = aa_run
    world, bundle = tiny
    again = simulate_ab(world, {"control": (bundle, None), "treatment": (bundle, None)}, result.config)
    assert again.out_dir is None
    assert again.analysis.to_dict() == result.analysis.to_dict()
    for name, served in result.served.items():
        np.testing.assert_array_equal(again.served[name].items, served.items)
        np.testing.assert_array_equal(again.served[name].outcomes.dwell_s, served.outcomes.dwell_s)


def test_the_oracle_beats_an_untrained_model_and_weights_shape_the_split(tiny):
    world, bundle = tiny
    cfg = ABSimConfig(days=1, salt="w", weights=[30, 70], metrics=["ctr"])
    result = simulate_ab(world, {"control": (bundle, None), "oracle": "oracle"}, cfg)
    ctr = result.analysis.metrics[0]
    assert ctr.significant and ctr.rel_lift > 0.5
    assert result.analysis.srm.ok and result.arms["oracle"].users_assigned > result.arms["control"].users_assigned
    assert result.arms["oracle"].model == "oracle (world truth, noise 0)"


def test_true_ctr_is_the_mean_click_rate_of_the_world(tiny):
    world_dir, _ = tiny
    world = load_world(world_dir)
    rng = np.random.default_rng(0)
    requests = Requests(np.array([3, 3, 17, 40]), np.full(4, int(world.config.start.timestamp() * 1e6) + 3 * 86_400_000_000))
    items = np.array([[5, 9, 11], [2, -1, -1], [7, 8, 1], [0, 4, -1]])
    feeds = Served("x", requests, items, respond(world, requests, items, rng), np.zeros(4), np.full(4, "tower", object))
    assert not feeds.outcomes.clicked[~feeds.shown].any() and feeds.outcomes.dwell_s[~feeds.shown].sum() == 0
    draws = np.array([respond(world, requests, items, rng).clicked[feeds.shown].mean() for _ in range(4000)])
    expected = true_ctr(world, feeds)
    assert abs(draws.mean() - expected) < 4 * draws.std() / np.sqrt(len(draws))
    assert events_table(world, feeds).num_rows == 9


def test_replicates_are_deterministic_and_assign_by_salt(tiny):
    world_dir, bundle = tiny
    served = serve_population(world_dir, {"a": (bundle, None), "b": "oracle"}, ABSimConfig(days=1, users=80))
    world = load_world(world_dir)
    feeds, arm = replicate_feeds(world, served, "s", np.random.default_rng(1))
    users = feeds.requests.user_idx
    np.testing.assert_array_equal(arm, assign([f"u{u}" for u in users], "s", ["a", "b"]))
    for name in ("a", "b"):
        theirs = np.isin(served[name].requests.user_idx, users[arm == name])
        np.testing.assert_array_equal(feeds.items[arm == name], served[name].items[theirs])
    first = replicate_users(world, served, "s", np.random.default_rng(1), users=30)
    assert first.equals(replicate_users(world, served, "s", np.random.default_rng(1), users=30))
    assert first.num_rows == 30 and set(first["arm"].to_pylist()) == {"a", "b"}
    with pytest.raises(ValueError, match="users must be in"):
        replicate_users(world, served, "s", np.random.default_rng(1), users=10_000)


@pytest.mark.parametrize(
    ("arms", "overrides", "error", "match"),
    [
        ({"only": "oracle"}, {}, ValueError, "at least 2 arms"),
        ({"a": "oracle", "b": "oracle:-1"}, {}, ValueError, "noise must be >= 0"),
        ({"a": "oracle", "b": ("missing/bundle", None)}, {}, FileNotFoundError, "missing/bundle"),
        ({"a": "oracle", "b": "oracle:1"}, {"max_requests": 5}, ValueError, "exceed max_requests=5"),
        ({"a": "oracle", "b": "oracle:1"}, {"weights": [1.0]}, ValueError, "1 weight"),
        ({"a": "oracle", "b": "oracle:1"}, {"metrics": ["ctr", "nope"]}, ValueError, "unknown metric 'nope'"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny, tmp_path, arms, overrides, error, match):
    world, _ = tiny
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        simulate_ab(world, arms, ABSimConfig(**overrides), out_dir=out)
    assert not out.exists()


def test_a_used_output_folder_is_refused_and_kept(tiny, tmp_path):
    world, _ = tiny
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        simulate_ab(world, {"a": "oracle", "b": "oracle:1"}, ABSimConfig(), out_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_cli_ab_prints_the_analysis_and_its_log_reanalyses_the_same(tiny, tmp_path):
    world, bundle = tiny
    config = tmp_path / "ab.yaml"
    config.write_text("ab:\n  cuped: false\n  metrics: [ctr]\n")
    out = tmp_path / "run"
    args = ["experiment", "ab", "--world", str(world), "--arm", f"control={bundle.path}", "--arm", "treatment=oracle:1",
            "--days", "1", "--salt", "cli", "--config", str(config), "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    ctr = payload["analysis"]["metrics"][0]
    assert ctr["metric"] == "ctr" and ctr["significant"] and payload["config"]["salt"] == "cli"
    again = runner.invoke(app, ["experiment", "analyze", str(out), "--arms", "control,treatment", "--salt", "cli",
                                "--metrics", "ctr", "--json"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["metrics"][0]["treatment"] == pytest.approx(ctr["treatment"])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--arm", "control=oracle", "--arm", "nobundle"], "expected NAME=BUNDLE"),
        (["--arm", "a=oracle", "--arm", "a=oracle:1"], "arm names must be distinct"),
        (["--arm", "a=oracle", "--arm", "b=oracle:x"], "noise must be a number"),
        (["--arm", "a=oracle", "--arm", "b=oracle", "--weights", "1,x"], "--weights"),
    ],
)
def test_cli_ab_bad_arguments_exit_2_naming_the_problem(tiny, extra, match):
    world, _ = tiny
    result = runner.invoke(app, ["experiment", "ab", "--world", str(world), *extra])
    assert result.exit_code == 2
    assert match in result.output


def test_cli_ab_unknown_config_key_is_named(tiny, tmp_path):
    world, _ = tiny
    config = tmp_path / "ab.yaml"
    config.write_text("ab:\n  dayz: 3\n")
    result = runner.invoke(app, ["experiment", "ab", "--world", str(world), "--arm", "a=oracle", "--arm", "b=oracle:1",
                                 "--config", str(config)])  # fmt: skip
    assert result.exit_code == 2 and "dayz" in result.output


# ------------------------------------------------------------------------------------------------
# the statistics over replicates (slow: one serving pass per model on a 1,000-user world)


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """Every request of 1,000 users over 2 days served by an untrained two-tower (real pipeline) and
    by a noisy oracle (a known better model), plus the world's log as the CUPED pre-period."""
    world_dir, bundle = make_world(tmp_path_factory.mktemp("ab_pop"), users=1000)
    served = serve_population(world_dir, {"model": (bundle, None), "better": "oracle:2"}, ABSimConfig(days=2, seed=0))
    pre = read_events(world_dir, columns=["user_id", "clicked", "dwell_s", "hidden", "publisher"])
    return load_world(world_dir), served, pre


@pytest.mark.slow
def test_aa_false_positive_rate_stays_at_alpha(population):
    world, served, pre = population
    same = {"control": served["model"], "treatment": served["model"]}
    n_rep, alpha = 400, 0.05
    significant = np.zeros((n_rep, 2), bool)
    for r in range(n_rep):
        table = replicate_users(world, same, f"aa-{r}", np.random.default_rng([7, r]), pre_events=pre)
        result = analyze(table, ["control", "treatment"], metrics=["ctr", "time_spent"], alpha=alpha, guardrails=[])
        significant[r] = [m.significant for m in result.metrics]
    for rate, metric in zip(significant.mean(axis=0), ("ctr", "time_spent"), strict=True):
        # two-sided binomial test of "the rate is alpha": a real inflation (say 0.09) fails it
        p = stats.binomtest(int(rate * n_rep), n_rep, alpha).pvalue
        assert p > 0.001, f"{metric}: false-positive rate {rate:.3f} over {n_rep} A/A replicates (alpha {alpha})"


@pytest.mark.slow
def test_a_known_better_model_is_detected_at_the_planned_power(population):
    world, served, pre = population
    lift = true_ctr(world, served["better"]) / true_ctr(world, served["model"]) - 1
    assert 0.2 < lift < 0.5  # a moderate effect: the test needs a few hundred users to see it
    # plan from A/A tables (one per model: the better model's users vary more)
    def aa(name: str) -> MetricModel:
        same = {"c": served[name], "t": served[name]}
        return estimate_from_users(replicate_users(world, same, "plan", np.random.default_rng(0), pre_events=pre), "ctr")

    control = aa("model")
    metric = dataclasses.replace(control, sd_treatment=aa("better").sd)
    n = sample_size(metric, lift, Design(power=0.8)).n_control
    exposed = len(np.unique(served["model"].requests.user_idx))
    assert 100 <= n and 2 * n <= exposed, (n, exposed)
    planned = power(metric, lift, n)

    arms = {"control": served["model"], "treatment": served["better"]}
    n_rep = 300
    detected = 0
    for r in range(n_rep):
        table = replicate_users(world, arms, f"ab-{r}", np.random.default_rng([11, r]), users=2 * n, pre_events=pre)
        ctr = analyze(table, ["control", "treatment"], metrics=["ctr"], guardrails=[]).metrics[0]
        detected += ctr.significant and ctr.rel_lift > 0
    rate = detected / n_rep
    se = np.sqrt(planned * (1 - planned) / n_rep)
    # sampling error of the rate, plus 0.05 for the plan's approximations (normal test, variances
    # estimated from one A/A draw, a random rather than exact 50/50 split)
    assert abs(rate - planned) < 3 * se + 0.05, f"detected {rate:.3f}, planned power {planned:.3f} (n={n} per arm)"
