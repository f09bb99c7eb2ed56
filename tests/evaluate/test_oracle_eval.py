"""The world's oracle in evaluation: on a simulated log with truth/, ranking and retrieval
evaluation add an ``oracle`` row, each model's share of its lift over random (overall and by
slice), and the time-spent metrics; the report shows the slices."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from feedrank.bundle import build_catalogue, build_ranker, build_two_tower
from feedrank.data.collate import collate
from feedrank.data.log import read_events
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.evaluate.oracle import ORACLE, load_truth, oracle_scores
from feedrank.evaluate.ranking import RankerScorer, RankingEvalConfig, evaluate_ranker, load_holdout
from feedrank.evaluate.report import load_metrics, write_report
from feedrank.evaluate.retrieval import evaluate_holdout
from feedrank.features.build import FeatureConfig, build_features
from feedrank.features.vocab import Vocabularies

SPLIT = dt.datetime(2024, 1, 3, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    simulate(WorldConfig(users=300, items=150, days=3, seed=1), root / "log")
    build_features(root / "log", root / "features", FeatureConfig(split_at=SPLIT.isoformat(), history_len=10),
                   progress=False)  # fmt: skip
    vocabs = Vocabularies.load(root / "features" / "vocab")
    catalogue = build_catalogue(read_events(root / "log", end=SPLIT), vocabs)
    return root, vocabs, catalogue


def test_oracle_scores_are_the_worlds_affinity_times_freshness(world_run):
    root, _, _ = world_run
    world = load_truth(root / "log")
    events = read_events(root / "log", start=SPLIT).slice(0, 50)
    ts = events["ts"].cast(pa.int64()).to_numpy()
    users, items = world.user_index(events["user_id"]), world.item_index(events["item_id"])
    expected = world.true_affinity(users, items) * world.freshness(world.item_age_h(items, ts))
    np.testing.assert_allclose(oracle_scores(world, events["user_id"], events["item_id"], ts), expected)
    assert load_truth(root / "features") is None  # no truth/: no oracle


def test_ranking_evaluation_adds_the_oracle_its_lift_and_time_spent(world_run, tmp_path):
    root, vocabs, catalogue = world_run
    holdout = load_holdout(root / "features", vocabs)
    model = build_ranker({"ranker": {"dim": 8, "hidden": [16]}}, vocabs).eval()  # untrained: near random
    result = evaluate_ranker(RankerScorer(model), catalogue, holdout, RankingEvalConfig(n_resamples=30))
    ev = result.evaluation
    assert ORACLE in ev.models and ev.models["random"]["auc"].value == 0.5
    assert ev.models[ORACLE]["auc"].value > 0.6  # the world's utility separates clicks well
    for model_name in ev.models:
        assert {"dwell_ndcg@10", "time_spent@10"} <= set(ev.models[model_name])
    # the value formula under the dwell weights none, the run's (0.1) and 1: what dwell does to each metric
    assert {"value_dwell_0", "value_dwell_0.1", "value_dwell_1"} <= set(ev.models)
    out = RankerScorer(model)(collate(holdout.rows))
    expected = out["click"] + 5.0 * out["share"] - 3.0 * out["hide"]  # ranking_demo-like defaults, dwell weight 0
    np.testing.assert_allclose(result.predictions["score__value_dwell_0"].to_numpy(), expected.double().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # time spent per feed is seconds: the oracle's list of the same candidates holds more of them
    assert ev.models[ORACLE]["time_spent@10"].value > ev.models["random"]["time_spent@10"].value > 0
    by_name = {s["slice"]: s for s in ev.slices}
    assert set(by_name) == {"all", "items seen in training", "new items", "warm users", "cold users"}
    everything = by_name["all"]
    assert ORACLE not in everything["lift_share"] and "random" not in everything["lift_share"]
    share = everything["lift_share"]["ranker"]["auc"]["value"]
    ranker, random, oracle = (ev.models[m]["auc"].value for m in ("ranker", "random", ORACLE))
    assert share == pytest.approx((ranker - random) / (oracle - random))
    assert "time_spent@10" in everything["lift_share"]["recency"]
    seen, new = by_name["items seen in training"], by_name["new items"]
    assert seen["counts"]["impressions"] + new["counts"]["impressions"] == holdout.rows.num_rows
    assert new["counts"]["impressions"] == holdout.counts["rows_oov_item"] > 0  # the world publishes new items

    run = tmp_path / "run"
    result.write(run / "eval")
    metrics = load_metrics(run / "eval" / "metrics.json")  # the report's strict reader accepts it
    assert [s.slice for s in metrics.slices][0] == "all"
    page = write_report(run).read_text()
    assert 'id="slices-table"' in page and "share of oracle lift: auc" in page and "new items" in page


def test_retrieval_evaluation_adds_the_oracle_and_its_lift(world_run):
    root, vocabs, catalogue = world_run
    model = build_two_tower({"two_tower": {"dim": 8, "hidden": [16]}}, vocabs).eval()
    result = evaluate_holdout(model, vocabs, catalogue, root / "log", SPLIT, ks=[10], n_resamples=30)
    assert ORACLE in result.models
    oracle, random = result.models[ORACLE]["recall@10"], result.models["random"]["recall@10"]
    assert oracle.value > 2 * random.value  # the truth finds what users engage with
    lift = result.slices[0]["lift_share"]["two_tower"]["recall@10"]
    assert lift["value"] is not None and lift["ci"] is not None
    assert {c[0] for c in result.comparisons} == {"popularity", "random", ORACLE}


def test_a_log_without_dwell_or_truth_gets_neither_time_spent_nor_an_oracle(world_run):
    root, vocabs, catalogue = world_run
    holdout = load_holdout(root / "features", vocabs)
    rows = holdout.rows.set_column(holdout.rows.schema.get_field_index("dwell_s"), "dwell_s",
                                   pa.array(np.zeros(holdout.rows.num_rows, np.float32)))  # fmt: skip
    bare = type(holdout)(rows, holdout.counts, holdout.features_dir, holdout.split_at, holdout.warm_user,
                         holdout.seen_item, log_dir=None)  # as if ingested from MIND: no dwell, no truth/
    model = build_ranker({"ranker": {"dim": 8, "hidden": [16]}}, vocabs).eval()
    ev = evaluate_ranker(RankerScorer(model), catalogue, bare, RankingEvalConfig(n_resamples=10)).evaluation
    assert ORACLE not in ev.models and "time_spent@10" not in ev.models["ranker"]
    assert all(s["lift_share"] == {} for s in ev.slices) and ev.holdout["oracle"] == "none (no truth/)"
