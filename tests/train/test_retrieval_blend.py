"""`retrieval.kind: blend`: weights chosen on a validation holdout, trained, bundled, evaluated, served as parts."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from feedrank.bundle import load_bundle
from feedrank.cli import app
from feedrank.config import from_dict
from feedrank.data.log import read_events, read_items, write_items, write_log
from feedrank.evaluate.retrieval import Holdout, blend_grid_metrics, evaluate_bundle, evaluate_ranking
from feedrank.features.user_state import user_state
from feedrank.features.vocab import FIRST_ID
from feedrank.models.blend import BlendModel
from feedrank.models.item2item import Item2ItemModel
from feedrank.serving.item2item import serving_parts
from feedrank.train.retrieval import RetrievalRunConfig, train_retrieval

SPLIT = "2024-01-04T00:00:00"
RUN = {
    "features": {"split_at": SPLIT, "history_len": 20},
    "two_tower": {"dim": 16, "user_id_dim": 16, "item_id_dim": 16, "cat_dim": 4, "hidden": [], "max_history_len": 20},
    "train": {"epochs": 1, "lr": 0.01, "progress": False},
    "eval": {"ks": [10]},
    "item2item": {"reg": 10.0},
}


def run_config(**blend) -> RetrievalRunConfig:
    return from_dict(RetrievalRunConfig, {**RUN, "retrieval": {"kind": "blend"}, "blend": blend})


def holdout(world, users: int | None = None) -> Holdout:
    """The world's engagements after the cut as a holdout (a test's stand-in for a validation split)."""
    cut = dt.datetime.fromisoformat(SPLIT).replace(tzinfo=dt.timezone.utc)
    before, after = read_events(world, end=cut), read_events(world, start=cut)
    engaged = after.filter(pc.and_(after["clicked"], pc.invert(after["hidden"])))
    ids = pc.unique(engaged["user_id"]).sort()
    ids = ids if users is None else ids.slice(0, users)
    keep = lambda t: t.filter(pc.is_in(t["user_id"], value_set=ids)).select(["user_id", "item_id"])  # noqa: E731
    return Holdout(user_state(before, ids, 20, fallback=after), keep(engaged), keep(before.filter(before["clicked"])), cut)


class FixedScores(nn.Module):
    """A two-tower stand-in whose scores are a given [users, items] matrix: user vector = its row,
    item vectors = one-hot."""

    def __init__(self, scores: np.ndarray) -> None:
        super().__init__()
        self.scores = torch.from_numpy(scores)

    def user_vectors(self, batch):
        return self.scores[batch.user]

    def item_vectors(self, idx, cats, ages):
        return torch.eye(self.scores.shape[1], dtype=self.scores.dtype)[idx]


def test_selection_picks_the_grid_point_that_is_best_on_the_constructed_holdout(world, tmp_path):
    # vocabularies and catalogue from a fitted item2item run; the parts' scores are constructed
    ease = train_retrieval(world, tmp_path, from_dict(RetrievalRunConfig, {**RUN, "retrieval": {"kind": "ease"}}), progress=False)
    vocabs, catalogue = ease.vocabs, ease.catalogue
    valid = holdout(world, users=3)
    users = vocabs.users.lookup(valid.users.user_id)
    # each user's one relevant item is second in both parts, behind a different top item in each:
    # either part alone has MRR 1/2, the even mix puts the relevant item first (MRR 1)
    relevant, top_a, top_b = FIRST_ID + np.array([0, 1, 2]), FIRST_ID + np.array([3, 4, 5]), FIRST_ID + np.array([6, 7, 8])
    a = np.zeros((vocabs.n_users, vocabs.n_items))
    b = np.zeros((vocabs.n_users, vocabs.n_items))
    for u, r, ta, tb in zip(users, relevant, top_a, top_b):
        a[u, ta], a[u, r] = 10.0, 9.0
        b[u, tb], b[u, r] = 10.0, 9.0
    ids = pa.array(vocabs.items.ids, pa.string())
    valid = Holdout(valid.users, pa.table({"user_id": valid.users.user_id, "item_id": ids.take(pa.array(relevant - FIRST_ID))}),
                    pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string())}), valid.at)  # fmt: skip
    model = BlendModel({"two_tower": FixedScores(a), "ease": FixedScores(b)}, [0, 0], "zscore")
    grid = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert blend_grid_metrics(model, grid, valid, vocabs, catalogue, "mrr@10") == pytest.approx([0.5, 1.0, 0.5])
    assert blend_grid_metrics(model, grid, valid, vocabs, catalogue, "recall@1") == pytest.approx([0.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def blend_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("blend")
    valid = holdout(world)
    return out, valid, train_retrieval(world, out, run_config(parts=["two_tower", "ease"], grid_step=0.25), progress=False,
                                       valid=valid)  # fmt: skip


def test_blend_run_trains_each_part_and_keeps_the_best_weights_on_valid(blend_run, world):
    out, valid, bundle = blend_run
    assert bundle.kind == "blend" and isinstance(bundle.model, BlendModel)
    assert bundle.model.names == ["two_tower", "ease"]
    assert isinstance(bundle.model.parts["ease"], Item2ItemModel)
    assert bundle.model.history_lens.tolist() == [20, 1000]  # each part scores from its own history length
    for kind in ("two_tower", "ease"):  # each part is a bundle of its own kind, on the one feature build
        part = load_bundle(out / "parts" / kind / "bundle")
        assert part.kind == ("two_tower" if kind == "two_tower" else "item2item")
        assert (out / "parts" / kind / "features").resolve() == (out / "features").resolve()
    selection = bundle.metrics["train"]["selection"]
    values = [row["mrr@10"] for row in selection["grid"]]
    assert [row["weights"] for row in selection["grid"]] == run_config(grid_step=0.25).blend.grid()
    assert selection["weights"] == selection["grid"][int(np.argmax(values))]["weights"]
    torch.testing.assert_close(bundle.model.weights, torch.tensor(selection["weights"], dtype=torch.float64))
    # the grid's figures are the full evaluation's: the selected weights ranked by evaluate_ranking agree
    full = evaluate_ranking(bundle.model, bundle.vocabs, bundle.catalogue, valid.users, valid.relevant, valid.exclude,
                            valid.at, ks=[10], model_name="blend")  # fmt: skip
    assert full.model["mrr@10"] == pytest.approx(max(values), abs=1e-9)


def test_blend_bundle_reloads_and_is_evaluated_like_any_retrieval_bundle(blend_run, world):
    out, _, bundle = blend_run
    reloaded = load_bundle(out / "bundle")
    assert reloaded.kind == "blend" and reloaded.version == bundle.version
    torch.testing.assert_close(reloaded.model.weights, bundle.model.weights)
    run_eval = bundle.metrics["eval"]["models"]["blend"]["recall@10"]["value"]
    again = evaluate_bundle(reloaded, world, out_dir=out / "eval2")  # `evaluate retrieval`'s path
    assert again.model["recall@10"] == pytest.approx(run_eval)


def test_blend_serves_as_its_parts(blend_run):
    _, _, bundle = blend_run
    tower, item2item = serving_parts(bundle)
    assert tower.kind == "two_tower" and tower.model is bundle.model.parts["two_tower"]
    assert item2item.kind == "item2item" and item2item.model is bundle.model.parts["ease"]
    assert tower.version == item2item.version == bundle.version


def test_blend_without_fixed_weights_needs_a_validation_holdout(world, tmp_path):
    with pytest.raises(ValueError, match="validation holdout"):
        train_retrieval(world, tmp_path, run_config(), progress=False)


def test_cli_trains_a_blend_choosing_its_weights_on_a_validation_log(world, tmp_path):
    cut = dt.datetime.fromisoformat(SPLIT).replace(tzinfo=dt.timezone.utc)
    for name, rows in (("train", read_events(world, end=cut)), ("valid", read_events(world, start=cut))):
        write_log(tmp_path / name, rows)
        write_items(tmp_path / name, read_items(world))
    config = {key: value for key, value in RUN.items() if key != "features"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**config, "retrieval": {"kind": "blend"}, "blend": {"grid_step": 0.5}}))
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    args = ("train", "retrieval", "--config", tmp_path / "run.yaml", "--log", tmp_path / "train", "--out", tmp_path / "run")
    refused = run(*args)
    assert refused.exit_code == 2 and "validation holdout" in refused.output
    result = run(*args, "--valid-log", tmp_path / "valid")
    assert result.exit_code == 0, result.output
    assert "blend of two_tower, ease: weights" in result.output and "valid mrr@10" in result.output
    assert load_bundle(tmp_path / "run" / "bundle").kind == "blend"


def test_recent_history_keeps_each_users_last_n_items():
    from feedrank.data.user_batch import user_batch
    from feedrank.evaluate.retrieval import recent_history

    # user 0 has items 5, 6, 7 (oldest first), user 1 item 9, user 2 none
    batch = user_batch(np.zeros(3, np.int64), np.zeros((3, 0), np.int64), np.array([0, 3, 4, 4]), np.array([5, 6, 7, 9]),
                       np.zeros((3, 2), np.float32), 0)  # fmt: skip
    kept = lambda b: [b.history[r][b.history_mask[r]].tolist() for r in range(3)]  # noqa: E731
    assert kept(recent_history(batch, 2)) == [[6, 7], [9], []]
    assert kept(recent_history(batch, 0)) == [[], [], []]
    assert kept(recent_history(batch, 10)) == kept(batch) == [[5, 6, 7], [9], []]
