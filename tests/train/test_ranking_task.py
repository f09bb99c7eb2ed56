"""The ranking training task on a small simulated world: config inheritance from the two-tower,
the shared feature build, the negative sample, label weights, the bundle, its evaluation, and
every way the inputs can fail to fit together."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from feedrank.bundle import build_ranker, load_bundle
from feedrank.config import ConfigError, from_dict
from feedrank.data.collate import Collator
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.evaluate.ranking import RankerScorer, dwell_weights, evaluate_bundle, load_holdout
from feedrank.evaluate.report import load_metrics, load_predictions, write_report
from feedrank.features import NotTrainableError, split_files
from feedrank.features.labels import LabelConfig
from feedrank.train.checkpoint import latest_checkpoint, load_checkpoint
from feedrank.train.ranking import (
    RankerLabelWeights,
    RankingRunConfig,
    load_ranking_config,
    resolve_config,
    sample_training_split,
    train_ranking,
)
from feedrank.train.retrieval import RetrievalRunConfig, train_retrieval

SPLIT = "2024-01-04T00:00:00"
TRAIN = {"steps": 30, "lr": 0.005, "progress": False, "device": "cpu", "log_every": 10}


def ranking_config(**sections) -> RankingRunConfig:
    base = {
        "ranker": {"dim": 8, "hidden": [32], "dropout": 0.0, "max_history_len": 20, "negative_rate": 0.5},
        "train": TRAIN, "loader": {"batch_size": 256}, "eval": {"n_resamples": 20},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return from_dict(RankingRunConfig, base)


@pytest.fixture(scope="module")
def two_tower(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = from_dict(RetrievalRunConfig, {
        "features": {"split_at": SPLIT, "history_len": 20},
        "two_tower": {"dim": 16, "item_id_dim": 16, "user_id_dim": 8, "cat_dim": 4, "hidden": [32], "dropout": 0.0,
                      "max_history_len": 20, "temperature": 0.1},
        "train": TRAIN, "loader": {"batch_size": 256}, "eval": {"ks": [10]},
    })  # fmt: skip
    return out, train_retrieval(world, out, cfg, progress=False)


@pytest.fixture(scope="module")
def trained(world, two_tower):
    out, tt = two_tower
    manifest_mtime = (out / "features" / "manifest.json").stat().st_mtime_ns
    bundle = train_ranking(world, out, ranking_config(), two_tower_bundle=tt, progress=False)
    return out, tt, bundle, manifest_mtime


def test_config_is_inherited_from_the_two_tower_and_the_feature_build_is_shared(trained):
    out, tt, bundle, manifest_mtime = trained
    assert (out / "features" / "manifest.json").stat().st_mtime_ns == manifest_mtime  # reused, not rebuilt
    assert bundle.config["features"] == tt.config["features"] and bundle.config["labels"] == tt.config["labels"]
    assert bundle.config["ranker"]["two_tower_dim"] == 16
    assert bundle.meta["sources"]["two_tower"] == {"path": str(tt.path.resolve()), "version": tt.version}
    assert bundle.vocabs == tt.vocabs


def test_bundle_scores_like_the_final_checkpoint_and_training_writes_its_own_folder(trained):
    out, tt, bundle, _ = trained
    assert bundle.path == out / "ranker" and bundle.kind == "ranker"
    assert (out / "train" / "ranking" / "metrics.jsonl").is_file() and (out / "train" / "retrieval" / "metrics.jsonl").is_file()
    reference = build_ranker(bundle.config, bundle.vocabs)
    reference.load_state_dict(load_checkpoint(latest_checkpoint(out / "train" / "ranking" / "checkpoints"))["model"])
    rows = pq.read_table(split_files(out / "features", "test")[0]).slice(0, 64)
    batch = Collator(max_history=20)(rows)
    expected = RankerScorer(reference.eval(), tt.model)(batch)
    again = RankerScorer(load_bundle(out / "ranker").model, tt.model)(batch)
    for key in ("score", "prob", "value", "two_tower"):
        assert torch.equal(again[key], expected[key]), key
    assert bundle.metrics["train"]["step"] == 30
    assert bundle.model.cfg.negative_rate == 0.5


def test_negative_sample_keeps_every_click_and_about_rate_of_the_rest(trained):
    out, *_ = trained
    full = pa.concat_tables(pq.read_table(f, columns=["clicked"]) for f in split_files(out / "features", "train"))
    sample = pa.concat_tables(pq.read_table(f, columns=["clicked"]) for f in (out / "ranking_sample").glob("*.parquet"))
    clicks = lambda t: int(np.sum(t["clicked"].to_numpy(zero_copy_only=False)))  # noqa: E731
    assert clicks(sample) == clicks(full)
    kept = (sample.num_rows - clicks(sample)) / (full.num_rows - clicks(full))
    assert 0.45 < kept < 0.55, kept
    manifest = json.loads((out / "ranking_sample" / "sample.json").read_text())
    assert manifest["negative_rate"] == 0.5 and manifest["seed"] == 0
    mtime = (out / "ranking_sample" / "sample.json").stat().st_mtime_ns
    files = sample_training_split(out / "features", out / "ranking_sample", 0.5, 0, progress=False)
    assert (out / "ranking_sample" / "sample.json").stat().st_mtime_ns == mtime and len(files) == 1  # reused
    assert sample_training_split(out / "features", out / "nothing", 1.0, 0) == split_files(out / "features", "train")
    assert not (out / "nothing").exists()


def test_label_weights_are_engagement_weights_over_their_click_class_mean(tmp_path):
    rows = pa.table({
        "clicked": [True, True, False, True, False, False],
        "dwell_s": [3.0, 30.0, 0.0, 40.0, 0.0, 0.0],
        "shared": [False, True, False, False, True, False],
        "hidden": [False, False, False, True, False, True],
    })  # fmt: skip
    pq.write_table(rows, tmp_path / "part.parquet")
    weights = RankerLabelWeights.fit(LabelConfig(), [tmp_path / "part.parquet"])
    # engagement weights: clicked rows 1, 7, 3 (hidden) -> mean 11/3; others 1, 5 (share), 3 (hidden) -> mean 3
    assert weights.clicked_mean == pytest.approx(11 / 3) and weights.unclicked_mean == pytest.approx(3.0)
    np.testing.assert_allclose(weights(rows), [3 / 11, 21 / 11, 1 / 3, 9 / 11, 5 / 3, 1.0], rtol=1e-6)
    with pytest.raises(ConfigError, match="every non-clicked training row weighs 0"):
        RankerLabelWeights.fit(LabelConfig(negative_weight=0.0, share_weight=0.0, hide_weight=0.0), [tmp_path / "part.parquet"])
    pq.write_table(rows.filter(pc.invert(rows["clicked"])), tmp_path / "negatives.parquet")
    with pytest.raises(NotTrainableError, match="3 training impressions .* have no click"):
        RankerLabelWeights.fit(LabelConfig(), [tmp_path / "negatives.parquet"])


def test_evaluation_holds_the_ranker_the_baselines_and_calibrated_probabilities(trained):
    out, _, bundle, _ = trained
    metrics = load_metrics(out / "eval" / "metrics.json")  # the report's strict reader accepts it
    values = {f"value_dwell_{w:g}" for w in dwell_weights(bundle.model.cfg.value.dwell)}  # the value formula's rows
    assert set(metrics.models) == {"ranker", "two_tower", "popularity", "recency", "random", "oracle"} | values
    assert {"auc", "gauc", "mrr", "ndcg@5", "ndcg@10", "log_loss", "ne", "ece", "dwell_ndcg@10",
            "time_spent@10"} == set(metrics.models["ranker"])  # fmt: skip
    pairs = {(c.a, c.b) for c in metrics.comparisons}
    assert pairs == {(m, "ranker") for m in ("two_tower", "popularity", "recency", "random", "oracle")}
    pred = load_predictions(out / "eval" / "predictions.parquet")
    assert pred.labels.size == metrics.holdout["impressions"] == bundle.metrics["eval"]["holdout"]["impressions"]
    # The down-sampling correction: the mean probability tracks the click rate (uncorrected it is ~2x).
    assert abs(pred.probs["ranker"].mean() - pred.labels.mean()) < 0.35 * pred.labels.mean()
    assert write_report(out).is_file()  # training curves of both tasks, the ranking table


def test_evaluate_bundle_against_a_production_bundle_writes_paired_comparisons(trained, tmp_path):
    out, tt, bundle, _ = trained
    result = evaluate_bundle(bundle, run_dir=tmp_path, against=bundle)
    production = [c for a, b, c in result.evaluation.comparisons if a == "production"]
    assert {c.metric for c in production} == {"auc", "gauc", "mrr", "ndcg@5", "ndcg@10", "log_loss", "ne", "ece",
                                              "dwell_ndcg@10", "time_spent@10"}  # fmt: skip
    assert all(c.delta == 0 for c in production)  # the same model against itself
    assert (tmp_path / "eval" / "predictions.parquet").is_file()
    two_tower_prod = evaluate_bundle(bundle, run_dir=tmp_path / "b", against=tt)
    metrics = two_tower_prod.evaluation.models
    assert metrics["production"]["auc"].value == pytest.approx(metrics["two_tower"]["auc"].value)
    assert "log_loss" not in metrics["production"]  # a two-tower has no probability


def test_evaluation_on_another_log_rebuilds_features_and_refuses_other_vocabularies(trained, tmp_path):
    out, _, bundle, _ = trained
    moved = load_bundle(out / "ranker")
    moved.meta["sources"] = {**moved.meta["sources"], "features": str(tmp_path / "gone")}
    result = evaluate_bundle(moved, run_dir=tmp_path)
    assert (tmp_path / "eval" / f"features-{bundle.version[:12]}" / "manifest.json").is_file()
    trained_auc = bundle.metrics["eval"]["models"]["ranker"]["auc"]["value"]
    assert result.evaluation.models["ranker"]["auc"].value == pytest.approx(trained_auc)
    other = tmp_path / "other_world"
    simulate(WorldConfig(users=100, items=50, days=4, seed=7), other)
    with pytest.raises(ValueError, match="vocabularies differ"):
        evaluate_bundle(moved, log_dir=other, run_dir=tmp_path / "x")


def test_existing_checkpoints_need_resume_and_a_resume_of_a_finished_run_is_the_same_model(trained, world):
    out, tt, bundle, _ = trained
    with pytest.raises(FileExistsError, match="--resume"):
        train_ranking(world, out, ranking_config(), two_tower_bundle=tt, progress=False)
    again = train_ranking(world, out, ranking_config(), two_tower_bundle=tt, resume=True, progress=False, evaluate=False)
    assert again.version == bundle.version


def test_settings_that_do_not_fit_together_are_refused_before_training(trained, world, tmp_path):
    out, tt, *_ = trained
    with pytest.raises(ConfigError, match="features: not set"):
        resolve_config(ranking_config(), None)
    with pytest.raises(ConfigError, match="two_tower_dim is 8 but no two-tower"):
        resolve_config(ranking_config(features={"split_at": SPLIT}, ranker={"two_tower_dim": 8}), None)
    with pytest.raises(ConfigError, match="two_tower_dim is 8 but the two-tower .* has dim 16"):
        resolve_config(ranking_config(ranker={"two_tower_dim": 8}), tt)
    ranker = load_bundle(out / "ranker")
    with pytest.raises(ConfigError, match="a 'ranker' bundle, expected a two_tower one"):
        resolve_config(ranking_config(), ranker)
    # An explicit feature config other than the two-tower's gives other vocabularies: refused.
    other = ranking_config(features={"split_at": "2024-01-03T00:00:00", "history_len": 20})
    with pytest.raises(ValueError, match="other vocabularies"):
        train_ranking(world, tmp_path / "run", other, two_tower_bundle=tt, progress=False)
    assert not (tmp_path / "run" / "train" / "ranking").exists()


def test_without_a_two_tower_the_ranker_trains_on_its_own_features(world, tmp_path):
    cfg = ranking_config(features={"split_at": SPLIT, "history_len": 10}, labels={"share_weight": 2.0},
                         ranker={"negative_rate": 1.0}, train={"steps": 5})  # fmt: skip
    bundle = train_ranking(world, tmp_path, cfg, progress=False)
    assert bundle.config["ranker"]["two_tower_dim"] == 0 and "two_tower" not in bundle.meta["sources"]
    values = {f"value_dwell_{w:g}" for w in dwell_weights(bundle.model.cfg.value.dwell)}
    assert set(bundle.metrics["eval"]["models"]) == {"ranker", "popularity", "recency", "random", "oracle"} | values
    assert not (tmp_path / "ranking_sample").exists()  # rate 1, nothing excluded: the split is read as is
    holdout = load_holdout(tmp_path / "features", bundle.vocabs)
    assert holdout.counts["impressions"] == bundle.metrics["eval"]["holdout"]["impressions"]


def test_a_run_without_a_usable_holdout_still_saves_its_bundle_and_excluded_clicks_cannot_train(world, tmp_path):
    cfg = ranking_config(features={"split_at": "2024-02-01T00:00:00", "history_len": 5}, train={"steps": 3})
    bundle = train_ranking(world, tmp_path / "late_split", cfg, progress=False)  # no test split at all
    assert "eval" not in bundle.metrics and (tmp_path / "late_split" / "ranker" / "bundle.json").is_file()
    everything = ranking_config(features={"split_at": SPLIT, "history_len": 5}, exclude_requests=[""], train={"steps": 3})
    with pytest.raises(NotTrainableError, match="have no click"):  # every request excluded
        train_ranking(world, tmp_path / "nothing", everything, progress=False)


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("ranker:\n  dimm: 8\n", "ranker: unknown key(s) 'dimm'"),
    ("ranker:\n  negative_rate: 0\n", "negative_rate must be in (0, 1]"),
    ("eval:\n  cluster: session\n", "eval.cluster: expected one of ['request', 'user']"),
    ("exclude_requests: hist-\n", "exclude_requests: expected a list"),
    ("evaluation: {}\n", "unknown key(s) 'evaluation'"),
])  # fmt: skip
def test_config_errors_name_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_ranking_config(path)


def test_shipped_configs_load():
    demo = load_ranking_config("configs/ranking_demo.yaml")
    assert demo.features is None and demo.labels is None  # inherited from configs/demo.yaml's two-tower
    assert 0 < demo.ranker.negative_rate < 1
    mind = load_ranking_config("configs/mind.yaml")
    assert mind.features.split_at.startswith("2019-11-15") and mind.exclude_requests == ["hist-"]
