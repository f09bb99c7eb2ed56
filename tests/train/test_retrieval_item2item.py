"""`retrieval.kind: ease | covisit`: fitted by train_retrieval, bundled, evaluated, and through the CLI."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from typer.testing import CliRunner

from feedrank.bundle import load_bundle
from feedrank.cli import app
from feedrank.config import ConfigError, from_dict
from feedrank.evaluate.retrieval import evaluate_bundle
from feedrank.models.item2item import Item2ItemModel, fit_ease, interactions, session_gram
from feedrank.train.retrieval import RetrievalRunConfig, training_positive_rows, train_retrieval, training_positives

RUN = {
    "features": {"split_at": "2024-01-04T00:00:00", "history_len": 20},
    "eval": {"ks": [5, 10]},
    "item2item": {"reg": 10.0, "neighbours": 20},
}


def run_config(kind: str) -> RetrievalRunConfig:
    return from_dict(RetrievalRunConfig, {**RUN, "retrieval": {"kind": kind}})


@pytest.fixture(scope="module")
def ease_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ease")
    return out, train_retrieval(world, out, run_config("ease"), progress=False)


def test_ease_run_bundles_the_closed_form_of_the_train_engagements(ease_run):
    out, bundle = ease_run
    assert bundle.kind == "item2item" and isinstance(bundle.model, Item2ItemModel)
    users, items = training_positives(out / "features")
    x = interactions(users.numpy(), items.numpy(), bundle.vocabs.n_users, bundle.vocabs.n_items)
    expected = fit_ease(x, reg=10.0).matrix().toarray()
    np.testing.assert_allclose(bundle.model.item2item.matrix().toarray(), expected, atol=1e-5)
    reloaded = load_bundle(out / "bundle")  # buffers sized from the saved state, version checked
    assert reloaded.version == bundle.version
    torch.testing.assert_close(reloaded.model.weights, bundle.model.weights)


def test_ease_run_is_evaluated_against_popularity(ease_run, world):
    out, bundle = ease_run
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(doc["models"]) == {"item2item", "popularity", "random", "oracle"}  # the world has truth/: an oracle row
    again = evaluate_bundle(bundle, world, out_dir=out / "eval2")  # `evaluate retrieval`'s path: same numbers
    assert again.model["recall@10"] == pytest.approx(doc["models"]["item2item"]["recall@10"]["value"])
    # scored from the histories, not a copy of the popularity list (the quality is the benchmark's to measure)
    assert 0 < again.model["recall@10"] <= 1 and again.model != again.popularity


def test_covisit_run_keeps_k_neighbours_per_item(world, tmp_path):
    bundle = train_retrieval(world, tmp_path, run_config("covisit"), progress=False)
    counts = np.diff(bundle.model.indptr.numpy())
    assert bundle.kind == "item2item" and counts.max() <= 20 and counts.sum() > 0


def test_unknown_kind_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="retrieval.kind"):
        run_config("knn")
    with pytest.raises(ConfigError, match="reg"):
        from_dict(RetrievalRunConfig, {"item2item": {"reg": 0}})


def test_cli_trains_and_evaluates_an_item2item_kind(world, tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**RUN, "retrieval": {"kind": "covisit"}}))
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    result = run("train", "retrieval", "--config", tmp_path / "run.yaml", "--log", world, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "covisit fitted" in result.output and "item2item" in result.output
    result = run("evaluate", "retrieval", tmp_path / "run" / "bundle", "--log", world, "--k", "5", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "recall@5" in json.loads((tmp_path / "e" / "metrics.json").read_text())["models"]["item2item"]


def test_session_ease_run_fits_on_the_train_engagements_times(world, tmp_path):
    cfg = from_dict(RetrievalRunConfig, {**RUN, "retrieval": {"kind": "ease"},
                                         "item2item": {"reg": 10.0, "session_weight": 1.0, "session_tau_s": 3600.0}})  # fmt: skip
    bundle = train_retrieval(world, tmp_path, cfg, progress=False)
    rows = training_positive_rows(tmp_path / "features", ["user_idx", "item_idx", "ts"])
    users, items = rows["user_idx"].to_numpy(), rows["item_idx"].to_numpy()
    ts_s = rows["ts"].cast(pa.timestamp("us")).cast(pa.int64()).to_numpy() / 1e6
    x = interactions(users, items, bundle.vocabs.n_users, bundle.vocabs.n_items)
    extra = session_gram(users, items, ts_s, bundle.vocabs.n_items, 3600.0)
    assert extra.nnz > np.unique(items).size  # the world has pairs engaged within hours: the term is not just the diagonal
    expected = fit_ease(x, reg=10.0, extra_gram=extra).matrix().toarray()
    np.testing.assert_allclose(bundle.model.item2item.matrix().toarray(), expected, atol=1e-5)
    assert not np.allclose(expected, fit_ease(x, reg=10.0).matrix().toarray(), atol=1e-4)
