"""The ``item2item`` candidate source: served in /feed beside the ANN, mapped through item ids; a
blend bundle served as its parts."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from feedrank.bundle import load_bundle, save_bundle
from feedrank.cli import app
from feedrank.data.log import read_events
from feedrank.features.vocab import FIRST_ID
from feedrank.models.blend import BlendModel
from feedrank.models.item2item import Item2ItemModel, fit_covisit, interactions
from feedrank.serving.app import ServeSettings, build_service, create_app
from feedrank.serving.item2item import Item2ItemSource, serving_parts
from feedrank.serving.pipeline import FeedService

from .conftest import TickingClock, serving_config


@pytest.fixture(scope="module")
def item2item_bundle(serving_world, tmp_path_factory):
    """Co-visitation over the serving world's clicks, with the two-tower bundle's vocabularies."""
    tt = serving_world.two_tower
    events = read_events(serving_world.log, columns=["user_id", "item_id", "clicked"])
    clicks = events.filter(events["clicked"])
    users = tt.vocabs.users.lookup(clicks["user_id"])
    items = tt.vocabs.items.lookup(clicks["item_id"])
    x = interactions(users, items, tt.vocabs.n_users, tt.vocabs.n_items)
    model = Item2ItemModel(tt.vocabs.n_items, fit_covisit(x, k=30))
    path = save_bundle(tmp_path_factory.mktemp("i2i") / "bundle", kind="item2item", model=model,
                       config={"retrieval": {"kind": "covisit"}}, vocabs=tt.vocabs, catalogue=tt.catalogue)  # fmt: skip
    return load_bundle(path)


@pytest.fixture
def service(serving_world, item2item_bundle, tmp_path):
    # one ANN candidate and no fresh ones: almost every candidate can only come from item2item
    cfg = serving_config(tmp_path, ann_candidates=1, fresh_candidates=0, item2item_candidates=40)
    s = FeedService(serving_world.two_tower, cfg, log_dir=serving_world.log, clock=TickingClock(serving_world.start),
                    item2item=item2item_bundle)  # fmt: skip
    yield s
    s.close()


def warm_user(service) -> str:
    return next(u for u in sorted(service.store._snapshot.row_of) if len(service.store.view(u, service.clock()).history) >= 3)


def test_feed_serves_candidates_tagged_item2item(service, item2item_bundle):
    user = warm_user(service)
    with TestClient(create_app(service)) as client:
        body = client.get("/feed", params={"user_id": user, "k": 10}).json()
    sources = [item["source"] for item in body["items"]]
    assert "item2item" in sources, sources
    assert body["model_versions"]["item2item"] == item2item_bundle.version
    # every item2item pick is a neighbour of the user's history, never the history itself
    view = service.store.view(user, service.clock())
    expected, _ = item2item_bundle.model.item2item.recommend(view.history, 40)
    ids = set(np.asarray(service.catalogue.item_ids)[expected].tolist())
    history_ids = set(np.asarray(service.catalogue.item_ids)[view.history].tolist())
    for item in body["items"]:
        if "item2item" in item["source"]:
            assert item["item_id"] in ids and item["item_id"] not in history_ids


def test_indices_are_mapped_through_item_ids(serving_world, item2item_bundle):
    source = Item2ItemSource(item2item_bundle, serving_world.two_tower)
    vocab = serving_world.two_tower.vocabs.items
    known = np.arange(FIRST_ID, FIRST_ID + len(vocab.ids))
    np.testing.assert_array_equal(source.to_own[known], known)  # same vocabulary: the identity
    assert source.candidates(np.zeros(0, np.int64), 10).size == 0
    # an item published to the running server (POST /items) has a row past the vocabulary: no neighbours
    seed = known[:3]
    published = np.array([len(source.to_own), len(source.to_own) + 5])
    np.testing.assert_array_equal(source.candidates(np.concatenate([seed, published]), 10), source.candidates(seed, 10))


def test_a_two_tower_bundle_is_refused_as_item2item(serving_world):
    with pytest.raises(ValueError, match="expected an item2item bundle"):
        Item2ItemSource(serving_world.two_tower, serving_world.two_tower)


def test_serve_dry_run_loads_the_item2item_bundle(serving_world, item2item_bundle, tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  start_time: '{serving_world.start.isoformat()}'\n")
    result = CliRunner().invoke(app, ["serve", str(serving_world.two_tower.path), "--item2item", str(item2item_bundle.path),
                                      "--log", str(serving_world.log), "--config", str(config),
                                      "--serving-log", str(tmp_path / "slog"), "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["models"]["item2item"] == item2item_bundle.version
    refused = CliRunner().invoke(app, ["serve", str(serving_world.two_tower.path), "--item2item", str(serving_world.two_tower.path),
                                       "--config", str(config), "--serving-log", str(tmp_path / "slog2"), "--dry-run"])  # fmt: skip
    assert refused.exit_code == 2 and "expected an item2item bundle" in refused.output


@pytest.fixture(scope="module")
def blend_bundle(serving_world, item2item_bundle, tmp_path_factory):
    """A two-tower + co-visitation blend over the serving world (kind ``blend``, one bundle)."""
    tt = serving_world.two_tower
    model = BlendModel({"two_tower": tt.model, "covisit": item2item_bundle.model}, [50, 1000], "zscore", [0.6, 0.4])
    config = {**tt.config, "retrieval": {"kind": "blend"}, "blend": {"parts": ["two_tower", "covisit"], "weights": [0.6, 0.4]}}
    path = save_bundle(tmp_path_factory.mktemp("blend") / "bundle", kind="blend", model=model, config=config,
                       vocabs=tt.vocabs, catalogue=tt.catalogue)  # fmt: skip
    return load_bundle(path)


def test_a_blend_bundle_serves_its_parts_as_sources_ann_and_item2item(serving_world, blend_bundle, tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  start_time: '{serving_world.start.isoformat()}'\n"
                      "  ann_candidates: 1\n  fresh_candidates: 0\n  item2item_candidates: 40\n")  # fmt: skip
    settings = ServeSettings(bundle=str(blend_bundle.path), log=str(serving_world.log), config=str(config),
                             serving_log=str(tmp_path / "slog"))  # fmt: skip
    service = build_service(settings)  # `feedrank serve BLEND_BUNDLE`'s path
    try:
        assert service.item2item is not None and service.item2item.bundle.version == blend_bundle.version
        user = warm_user(service)
        with TestClient(create_app(service)) as client:
            body = client.get("/feed", params={"user_id": user, "k": 10}).json()
        sources = {s for item in body["items"] for s in item["source"].split("+")}
        assert "item2item" in sources, body["items"]
        assert body["model_versions"]["item2item"] == blend_bundle.version
    finally:
        service.close()


def test_a_blend_without_a_two_tower_part_cannot_be_served(blend_bundle):
    import dataclasses

    only_items = dataclasses.replace(blend_bundle, model=BlendModel({"ease": blend_bundle.model.parts["covisit"],
                                                                    "covisit": blend_bundle.model.parts["covisit"]},
                                                                   [1000, 1000], "zscore"))  # fmt: skip
    with pytest.raises(ValueError, match="no two_tower part"):
        serving_parts(only_items)
