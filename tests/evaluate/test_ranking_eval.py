"""Ranking evaluation: candidate lists from a hand-written holdout, baselines, scorers, the metrics
document, alignment of two holdouts, and the label-weighting comparison."""

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from feedrank.bundle import build_catalogue, build_ranker
from feedrank.data.collate import collate
from feedrank.data.log import read_events, write_log
from feedrank.evaluate.metrics import auc, ndcg_at_k
from feedrank.evaluate.ranking import (
    RankerScorer,
    RankingEvalConfig,
    align,
    baseline_scores,
    compare_weightings,
    compute_evaluation,
    impression_rows,
    load_holdout,
    predictions_table,
    value_gain,
)
from feedrank.evaluate.report import PREDICTIONS, load_metrics, load_predictions
from feedrank.features.build import FeatureConfig, build_features
from feedrank.features.labels import LabelConfig
from feedrank.features.vocab import Vocabularies

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
SPLIT = "2024-01-02T00:00:00"


def _at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


# (request, user, item, hours, position, clicked)
ROWS = [
    ("r1", "u1", "A", 1, 0, True), ("r1", "u1", "B", 1, 1, False), ("r1", "u1", "C", 1, 2, False),
    ("r2", "u2", "A", 2, 0, False), ("r2", "u2", "B", 2, 1, True), ("r2", "u2", "C", 2, 2, False),
    ("r3", "u1", "B", 3, 0, False), ("r3", "u1", "C", 3, 1, True),
    # the holdout (day 2)
    ("t1", "u1", "A", 25, 0, False), ("t1", "u1", "B", 25, 1, True), ("t1", "u1", "D", 25, 2, False),
    ("t1", "u1", "A", 25.02, 3, True),  # A again in the same list, clicked this time: a duplicate
    ("t2", "u3", "B", 26, 0, False), ("t2", "u3", "C", 26, 1, False),  # unknown user, no click
    ("t3", "u2", "C", 27, 0, True), ("t3", "u2", "A", 27, 1, False),
    ("hist-u2", "u2", "B", 28, 0, True),  # not an impression (a reader's history row)
]  # fmt: skip


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    table = pa.table({
        "request_id": [r[0] for r in ROWS], "user_id": [r[1] for r in ROWS], "item_id": [r[2] for r in ROWS],
        "ts": pa.array([_at(r[3]) for r in ROWS], pa.timestamp("us", tz="UTC")),
        "position": pa.array([r[4] for r in ROWS], pa.int32()), "clicked": [r[5] for r in ROWS],
        "dwell_s": [30.0 if r[5] else 0.0 for r in ROWS],
    })  # fmt: skip
    assert write_log(root / "log", table).ok
    build_features(root / "log", root / "features", FeatureConfig(split_at=SPLIT, history_len=5), progress=False)
    return root


def test_holdout_keeps_each_candidate_once_sends_unknown_ids_down_the_oov_path_and_counts_everything(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    holdout = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    assert holdout.counts == {
        "impressions": 7, "rows_excluded": 1, "requests": 3, "clicks": 2,
        "duplicate_rows_dropped": 1, "duplicate_clicks_dropped": 1,  # t1's second A, clicked
        "requests_without_click": 1, "requests_all_clicked": 0,      # t2
        "rows_oov_user": 2, "rows_oov_item": 1,                      # u3's two rows; item D
    }  # fmt: skip
    kept = list(zip(holdout.column("request_id"), holdout.column("item_id"), holdout.column("position")))
    # log order (ts, request, position); the duplicate A of t1 is dropped, its first impression kept
    assert kept == [("t1", "A", 0), ("t1", "B", 1), ("t1", "D", 2), ("t2", "B", 0), ("t2", "C", 1),
                    ("t3", "C", 0), ("t3", "A", 1)]  # fmt: skip
    assert holdout.labels.sum() == 2
    # Without the exclusion the history row is a one-row list with a click: counted as all clicked.
    assert load_holdout(features / "features", vocabs).counts["requests_all_clicked"] == 1


def test_holdout_errors_name_the_feature_build(features, tmp_path):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    with pytest.raises(ValueError, match="all 9 test rows belong to excluded requests"):
        load_holdout(features / "features", vocabs, exclude_prefixes=["t", "hist-"])
    build_features(features / "log", tmp_path / "nosplit", FeatureConfig(history_len=5), progress=False)
    with pytest.raises(ValueError, match="nosplit: no test impressions"):
        load_holdout(tmp_path / "nosplit", vocabs)
    with pytest.raises(ValueError, match=r"the holdout has 0 click\(s\) in 2 impressions"):
        load_holdout(features / "features", vocabs, exclude_prefixes=["t1", "t3", "hist-"])


def test_max_requests_keeps_whole_requests_of_a_seeded_sample(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    sample = lambda seed: load_holdout(features / "features", vocabs, max_requests=2, seed=seed,  # noqa: E731
                                       exclude_prefixes=["hist-"])  # fmt: skip
    holdout = sample(0)
    requests = set(holdout.column("request_id"))
    assert holdout.counts["requests"] == 2 and len(requests) == 2
    sizes = {"t1": 3, "t2": 2, "t3": 2}
    assert holdout.rows.num_rows == sum(sizes[r] for r in requests)
    assert set(sample(0).column("request_id")) == requests


def test_impression_rows_drops_every_prefix():
    table = pa.table({"request_id": ["hist-1", "a", "pre-2", "b"]})
    assert impression_rows(table, ["hist-", "pre-"])["request_id"].to_pylist() == ["a", "b"]
    assert impression_rows(table, [])["request_id"].to_pylist() == ["hist-1", "a", "pre-2", "b"]


def test_baselines_popularity_by_training_clicks_then_impressions_unseen_items_last(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    holdout = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    catalogue = build_catalogue(read_events(features / "log", end=_at(24)), vocabs)
    scores = baseline_scores(holdout.rows, catalogue)
    pop = dict(zip(holdout.column("item_id"), scores["popularity"]))
    # training clicks: A 1, B 1, C 1; impressions: A 2, B 3, C 3 -> B and C (tie broken by index) above A; D unseen
    assert pop["D"] == 0 and min(pop["A"], pop["B"], pop["C"]) > 0
    assert pop["A"] < min(pop["B"], pop["C"])
    np.testing.assert_allclose(scores["recency"], -holdout.column("item_age_h"))
    np.testing.assert_array_equal(scores["random"], np.zeros(7))  # all tied: the mean of random orders


def test_ranker_scorer_corrects_for_down_sampling_and_adds_the_logged_position(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    holdout = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    torch.manual_seed(0)
    model = build_ranker({"ranker": {"dim": 8, "hidden": [16], "negative_rate": 0.25, "max_positions": 4}}, vocabs).eval()
    with torch.no_grad():
        model.position_bias.weight[1:, 0] = torch.tensor([-0.5, -1.0, -1.5])
    batch = collate(holdout.rows)
    out = RankerScorer(model)(batch)
    raw = model.batch_heads(batch)["click"]
    torch.testing.assert_close(out["score"], raw + np.log(0.25))
    bias = torch.tensor([0.0, -0.5, -1.0, -1.5])[batch.position.clamp_max(3)]
    torch.testing.assert_close(out["prob"], torch.sigmoid(raw + bias + np.log(0.25)))
    torch.testing.assert_close(out["click"], torch.sigmoid(raw + np.log(0.25)))  # serving: top slot


def test_metrics_document_is_the_report_schema_and_comparisons_point_the_right_way(tmp_path):
    rng = np.random.default_rng(0)
    requests = np.repeat(np.arange(300), 10)
    labels = (rng.random(requests.size) < 0.2).astype(np.float64)
    good, noise = labels + rng.normal(0, 0.7, labels.size), rng.normal(0, 1, labels.size)
    probs = np.clip(0.2 + 0.3 * (labels - 0.2) + rng.normal(0, 0.05, labels.size), 0.01, 0.99)
    cfg = RankingEvalConfig(n_resamples=100)
    ev = compute_evaluation(labels, requests, requests, {"ranker": good, "random": noise}, {"ranker": probs},
                            [("random", "ranker")], cfg)  # fmt: skip
    assert ev.models["ranker"]["auc"].value == pytest.approx(auc(labels, good))
    assert ev.models["ranker"]["ndcg@10"].value == pytest.approx(ndcg_at_k(labels, good, 10, requests))
    assert set(ev.models["random"]) == {"auc", "gauc", "mrr", "ndcg@5", "ndcg@10"}
    assert set(ev.models["ranker"]) == {"auc", "gauc", "mrr", "ndcg@5", "ndcg@10", "log_loss", "ne", "ece"}
    by_metric = {c.metric: c for a, b, c in ev.comparisons}
    assert set(by_metric) == {"auc", "gauc", "mrr", "ndcg@5", "ndcg@10"}  # random has no probabilities
    assert all(c.b_better and c.delta > 0.2 for c in by_metric.values())
    assert ev.reliability["ranker"].counts.sum() == labels.size

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(ev.metrics_file()))
    doc = load_metrics(tmp_path / "eval" / "metrics.json")  # the report's strict reader
    assert doc.comparisons[0].a == "random" and doc.comparisons[0].b == "ranker"
    assert doc.models["ranker"]["ece"].ci is not None


def test_predictions_table_is_what_the_report_reads(features, tmp_path):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    holdout = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    table = predictions_table(holdout, {"ranker": np.arange(7.0), "random": np.zeros(7)}, {"ranker": np.full(7, 0.3)})
    (tmp_path / "eval").mkdir()
    pq.write_table(table, tmp_path / PREDICTIONS)
    pred = load_predictions(tmp_path / PREDICTIONS)
    assert set(pred.scores) == {"ranker", "random"} and set(pred.probs) == {"ranker"}
    assert pred.labels.sum() == 2 and pred.history_len.min() >= 0


def test_align_matches_impressions_by_request_and_item(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    full = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    part = full.take(np.array([6, 3, 0]))  # a subset, in another order
    mine, theirs = align(full, part)
    assert mine.tolist() == [0, 3, 6] and theirs.tolist() == [2, 1, 0]
    assert (full.column("item_id")[mine] == part.column("item_id")[theirs]).all()


def test_value_gain_makes_ndcg_gains_equal_to_the_realized_value():
    rows = pa.table({"clicked": [True, True, False, True, False], "dwell_s": [3.0, 30.0, 0.0, 40.0, 0.0],
                     "shared": [False, True, False, False, False], "hidden": [False, False, False, True, False]})  # fmt: skip
    gains = np.exp2(value_gain(rows, LabelConfig())) - 1
    np.testing.assert_allclose(gains, [1.0, 7.0, 0.0, 0.0, 0.0])  # click; long click + share; -; hidden; -


def test_weighting_comparison_is_paired_and_skips_what_the_holdout_cannot_measure(features):
    vocabs = Vocabularies.load(features / "features" / "vocab")
    holdout = load_holdout(features / "features", vocabs, exclude_prefixes=["hist-"])
    n = holdout.rows.num_rows
    rng = np.random.default_rng(0)
    outputs = {name: rng.random(n) for name in ("click", "share", "hide", "value")}
    result = compare_weightings(holdout, outputs, outputs, LabelConfig(), LabelConfig(share_weight=1.0),
                                RankingEvalConfig(n_resamples=20))  # fmt: skip
    assert [c.metric for c in result.comparisons] == ["click auc", "value ndcg@10 (labels A)", "value ndcg@10 (labels B)"]
    assert all(c.delta == 0 and c.ci == (0.0, 0.0) for c in result.comparisons)  # same model: exactly 0
    assert result.skipped == {"share auc": "the holdout has no positives", "hide auc": "the holdout has no positives"}
