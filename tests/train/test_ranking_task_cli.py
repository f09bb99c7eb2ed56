"""`feedrank train ranking`, `feedrank evaluate ranking|weights` and `feedrank report` through typer."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig

FEATURES = {"split_at": "2024-01-03T00:00:00", "history_len": 10}
RETRIEVAL = {
    "features": FEATURES,
    "two_tower": {"dim": 8, "item_id_dim": 8, "user_id_dim": 4, "cat_dim": 2, "hidden": [16], "max_history_len": 10},
    "train": {"steps": 10, "device": "cpu", "progress": False},
    "loader": {"batch_size": 128},
    "eval": {"ks": [5]},
}
RANKING = {
    "ranker": {"dim": 4, "hidden": [16], "max_history_len": 10, "negative_rate": 0.5},
    "train": {"steps": 10, "device": "cpu", "progress": False},
    "loader": {"batch_size": 128},
    "eval": {"n_resamples": 10},
}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    simulate(WorldConfig(users=150, items=80, days=3, seed=2), root / "log")
    (root / "retrieval.yaml").write_text(yaml.safe_dump(RETRIEVAL))
    (root / "ranking.yaml").write_text(yaml.safe_dump(RANKING))
    (root / "ranking_alone.yaml").write_text(yaml.safe_dump({**RANKING, "features": FEATURES}))
    result = invoke("train", "retrieval", "--config", root / "retrieval.yaml", "--log", root / "log", "--out", root / "run")
    assert result.exit_code == 0, result.output
    return root


def test_train_ranking_evaluate_and_report(setup):
    root = setup
    result = invoke("train", "ranking", "--config", root / "ranking.yaml", "--log", root / "log", "--out", root / "run",
                    "--two-tower", root / "run" / "bundle")  # fmt: skip
    assert result.exit_code == 0, result.output
    for word in ("ranker", "two_tower", "popularity", "recency", "random", "ndcg@10", "ece", "ranker vs random"):
        assert word in result.output, word
    assert (root / "run" / "ranker" / "bundle.json").is_file()

    result = invoke("evaluate", "ranking", root / "run" / "ranker", "--against", root / "run" / "ranker", "--out", root / "ev")
    assert result.exit_code == 0, result.output
    assert "ranker vs production" in result.output and "impressions in" in result.output
    doc = json.loads((root / "ev" / "eval" / "metrics.json").read_text())
    assert doc["comparisons"][0]["a"] == "production" and doc["comparisons"][0]["delta"] == 0

    result = invoke("report", root / "run")
    assert result.exit_code == 0, result.output
    page = json.loads((root / "run" / "report.json").read_text())
    assert set(page["training"]) == {"retrieval", "ranking"} and "ranker" in page["models"]

    again = invoke("train", "ranking", "--config", root / "ranking.yaml", "--log", root / "log", "--out", root / "run",
                   "--two-tower", root / "run" / "bundle")  # fmt: skip
    assert again.exit_code == 2 and "--resume" in again.output


def test_evaluate_weights_trains_both_and_prints_the_paired_deltas(setup):
    root = setup
    (root / "b.yaml").write_text(yaml.safe_dump({**RANKING, "features": FEATURES, "labels": {"share_weight": 20.0}}))
    result = invoke("evaluate", "weights", "--config-a", root / "ranking_alone.yaml", "--config-b", root / "b.yaml",
                    "--log", root / "log", "--out", root / "weights")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "click auc" in result.output and "value ndcg@10 (labels A)" in result.output
    doc = json.loads((root / "weights" / "weights.json").read_text())
    assert {c["metric"] for c in doc["comparisons"]} >= {"click auc", "value ndcg@10 (labels B)"}
    assert (root / "weights" / "a" / "ranker").is_dir() and (root / "weights" / "b" / "ranker").is_dir()


@pytest.mark.parametrize(("args", "message"), [
    (("train", "ranking", "--config", "{root}/ranking.yaml", "--log", "{root}/log", "--out", "{root}/x"),
     "features: not set, and there is no two-tower bundle"),
    (("train", "ranking", "--config", "{root}/ranking.yaml", "--log", "{root}/log", "--out", "{root}/y",
      "--two-tower", "{root}/nobundle"), "no model bundle"),
    (("train", "ranking", "--config", "{root}/bad.yaml", "--log", "{root}/log", "--out", "{root}/z"), "unknown key(s) 'dimm'"),
    (("evaluate", "ranking", "{root}/run/bundle"), "`evaluate ranking` needs a ranker bundle"),
    (("evaluate", "ranking", "{root}/nobundle"), "no model bundle"),
    (("evaluate", "weights", "--config-a", "{root}/bad.yaml", "--config-b", "{root}/ranking.yaml", "--log", "{root}/log"),
     "unknown key(s) 'dimm'"),
])  # fmt: skip
def test_errors_exit_2_with_one_line(setup, args, message):
    (setup / "bad.yaml").write_text("ranker:\n  dimm: 3\n")
    result = invoke(*(a.format(root=setup) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
