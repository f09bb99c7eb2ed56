"""`feedrank train retrieval`, `feedrank evaluate retrieval`, `feedrank features build` through typer."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig

RUN = {
    "features": {"split_at": "2024-01-03T00:00:00", "history_len": 10},
    "two_tower": {"dim": 8, "item_id_dim": 8, "user_id_dim": 4, "cat_dim": 2, "hidden": [16], "max_history_len": 10},
    "train": {"steps": 10, "device": "cpu", "progress": False},
    "loader": {"batch_size": 128},
    "eval": {"ks": [5]},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    simulate(WorldConfig(users=150, items=80, days=3, seed=2), root / "log")
    (root / "run.yaml").write_text(yaml.safe_dump(RUN))
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_then_evaluate(setup):
    root = setup
    result = invoke("train", "retrieval", "--config", root / "run.yaml", "--log", root / "log", "--out", root / "run")
    assert result.exit_code == 0, result.output
    assert "recall@5" in result.output and "popularity" in result.output and "bundle" in result.output
    assert (root / "run" / "bundle" / "bundle.json").is_file()

    result = invoke("evaluate", "retrieval", root / "run" / "bundle", "--log", root / "log", "--k", "3,7",
                    "--out", root / "eval2")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((root / "eval2" / "metrics.json").read_text())
    assert set(doc["models"]["two_tower"]) >= {"recall@3", "ndcg@7"} and doc["holdout"]["ks"] == [3, 7]

    again = invoke("train", "retrieval", "--config", root / "run.yaml", "--log", root / "log", "--out", root / "run")
    assert again.exit_code == 2 and "--resume" in again.output


@pytest.mark.parametrize(("args", "message"), [
    (("train", "retrieval", "--config", "{root}/bad.yaml", "--log", "{root}/log", "--out", "{root}/x"), "unknown key(s) 'epochz'"),
    (("train", "retrieval", "--config", "{root}/run.yaml", "--log", "{root}/nolog", "--out", "{root}/y"), "no event log"),
    (("evaluate", "retrieval", "{root}/nobundle", "--log", "{root}/log"), "no model bundle"),
    (("features", "build", "{root}/log", "{root}/f", "--config", "{root}/missing.yaml"), "config file not found"),
])  # fmt: skip
def test_errors_exit_2_with_one_line(setup, args, message):
    (setup / "bad.yaml").write_text("train:\n  epochz: 3\n")
    result = invoke(*(a.format(root=setup) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_bad_k_is_a_usage_error(setup):
    result = invoke("evaluate", "retrieval", setup / "nobundle", "--log", setup / "log", "--k", "ten")
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_features_build_reads_the_run_config_section(setup):
    result = invoke("features", "build", setup / "log", setup / "features", "--config", setup / "run.yaml")
    assert result.exit_code == 0, result.output
    manifest = json.loads((setup / "features" / "manifest.json").read_text())
    assert manifest["history_len"] == 10 and "test" in manifest["splits"]
    assert "train:" in result.output and "features:" in result.output
