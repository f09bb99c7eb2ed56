"""Model bundles: catalogue contents, save/load round trip, atomic replacement, clear load errors."""

import datetime as dt
import json

import pyarrow as pa
import pytest
import torch

from feedrank.bundle import (
    CATALOGUE_FILE,
    META_FILE,
    MODEL_FILE,
    BundleError,
    build_catalogue,
    build_two_tower,
    catalogue_age_hours,
    catalogue_item_cats,
    load_bundle,
    save_bundle,
)
from feedrank.data.schema import TS_TYPE
from feedrank.features.vocab import Vocabularies

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
CONFIG = {"two_tower": {"dim": 8, "user_id_dim": 4, "item_id_dim": 8, "cat_dim": 2, "freshness_dim": 2, "hidden": [16],
                        "dropout": 0.0}}  # fmt: skip


def events() -> pa.Table:
    """i1 shown 3 times (2 clicks), moving from publisher p1 to p2; i2 shown once, no created_ts."""
    h = lambda hours: T0 + dt.timedelta(hours=hours)  # noqa: E731
    return pa.table({
        "user_id": ["u1", "u2", "u1", "u2"],
        "item_id": ["i1", "i1", "i2", "i1"],
        "ts": pa.array([h(1), h(2), h(3), h(5)], TS_TYPE),
        "clicked": [True, False, False, True],
        "created_ts": pa.array([h(0), h(0), None, h(0)], TS_TYPE),
        "publisher": ["p1", "p1", "p1", "p2"],
        "item_type": ["article", "article", "video", "article"],
        "category": ["news", "news", None, "news"],
        "age_bucket": ["a", "b", "a", "b"],
        "country": ["DE", "FR", "DE", "FR"],
    })  # fmt: skip


@pytest.fixture
def parts():
    table = events()
    vocabs = Vocabularies.build(table)
    torch.manual_seed(0)
    model = build_two_tower(CONFIG, vocabs)
    return model, vocabs, build_catalogue(table, vocabs)


def test_catalogue_has_one_row_per_item_index_with_latest_metadata(parts):
    _, vocabs, cat = parts
    assert vocabs.items.ids == ["i1", "i2"]  # most impressions first: indices 2, 3
    rows = cat.to_pylist()
    assert [r["item_id"] for r in rows] == [None, None, "i1", "i2"]
    assert [r["train_impressions"] for r in rows] == [0, 0, 3, 1]
    assert [r["train_clicks"] for r in rows] == [0, 0, 2, 0]
    publisher = vocabs.item_cats["publisher"]
    assert rows[2]["publisher_idx"] == publisher.lookup(["p2"])[0]  # the latest row wins
    assert rows[0]["publisher_idx"] == 0 and rows[1]["publisher_idx"] == 1  # padding, OOV
    assert catalogue_item_cats(cat).shape == (4, 3)
    # ages at T0 + 10 h: i1 from created_ts (T0), i2 from its first impression (T0 + 3 h)
    assert catalogue_age_hours(cat, T0 + dt.timedelta(hours=10))[2:].tolist() == [10.0, 7.0]


def test_round_trip_gives_identical_scores_and_a_content_version(tmp_path, parts):
    model, vocabs, cat = parts
    path = save_bundle(tmp_path / "b", kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat,
                       metrics={"recall@10": 0.5}, sources={"log_hash": "abc"})  # fmt: skip
    bundle = load_bundle(path)
    items, cats, ages = torch.tensor([2, 3]), catalogue_item_cats(cat)[2:], torch.tensor([1.0, 2.0])
    model.eval()
    with torch.no_grad():
        assert torch.equal(bundle.model.item_vectors(items, cats, ages), model.item_vectors(items, cats, ages))
    assert bundle.kind == "two_tower" and bundle.metrics == {"recall@10": 0.5}
    assert bundle.meta["sources"] == {"log_hash": "abc"} and len(bundle.version) == 64
    assert bundle.catalogue.equals(cat) and bundle.vocabs.items.ids == ["i1", "i2"]
    # same weights + config -> same version; other weights -> another
    again = save_bundle(tmp_path / "c", kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat)
    assert load_bundle(again).version == bundle.version
    with torch.no_grad():
        model.item_tower.id_embedding.weight[2, 0] += 1.0
    other = save_bundle(tmp_path / "c", kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat)
    assert load_bundle(other).version != bundle.version  # and the old bundle at c was replaced


def test_a_failed_save_leaves_the_previous_bundle(tmp_path, parts):
    model, vocabs, cat = parts
    path = save_bundle(tmp_path / "b", kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat)
    version = load_bundle(path).version
    with pytest.raises(BundleError, match="one row per item index"):
        save_bundle(path, kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat.slice(1))
    with pytest.raises(BundleError, match="unknown bundle kind 'ranker9'"):
        save_bundle(path, kind="ranker9", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat)
    assert load_bundle(path).version == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temp folders left behind


def _saved(tmp_path, parts):
    model, vocabs, cat = parts
    return save_bundle(tmp_path / "b", kind="two_tower", model=model, config=CONFIG, vocabs=vocabs, catalogue=cat)


def test_load_errors_name_the_problem(tmp_path, parts):
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        load_bundle(tmp_path / "nowhere")
    path = _saved(tmp_path, parts)
    (path / MODEL_FILE).write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="model.pt: corrupt or truncated"):
        load_bundle(path)
    path = _saved(tmp_path, parts)
    (path / CATALOGUE_FILE).unlink()
    with pytest.raises(BundleError, match="catalogue.parquet is missing"):
        load_bundle(path)
    path = _saved(tmp_path, parts)
    (path / META_FILE).write_text("{oops")
    with pytest.raises(BundleError, match="bundle.json: not valid JSON"):
        load_bundle(path)


def test_unknown_kind_and_tampering_are_refused(tmp_path, parts):
    path = _saved(tmp_path, parts)
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "kind": "gbdt"}))
    with pytest.raises(BundleError, match="unknown bundle kind 'gbdt'.*two_tower"):
        load_bundle(path)
    (path / META_FILE).write_text(json.dumps({**meta, "config": {"two_tower": {**CONFIG["two_tower"], "dim": 16}}}))
    with pytest.raises(BundleError, match="do not match the recorded version"):
        load_bundle(path)
    state = torch.load(path / MODEL_FILE, weights_only=True)
    state["temperature.value"] = torch.tensor(0.5)
    torch.save(state, path / MODEL_FILE)
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="do not match the recorded version"):
        load_bundle(path)
