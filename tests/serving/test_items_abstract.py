"""POST /items with an abstract: embedded from title + abstract words when the bundle's
``features.content_fields`` has ``abstract``, ignored (but journaled) when it reads titles only."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from feedrank.bundle import build_two_tower, load_bundle, save_bundle
from feedrank.serving.app import create_app
from feedrank.serving.items import JOURNAL_DIR, ItemJournal
from feedrank.serving.pipeline import FeedService

from .conftest import TT_CONFIG, TickingClock, serving_config

TWO_TOWER = {**TT_CONFIG["two_tower"], "title_dim": 8, "item_id_dropout": 0.2}


def _bundle(serving_world, path, content_fields: list[str] | None):
    """One seeded content two-tower, saved with or without ``features.content_fields``."""
    config = {"two_tower": TWO_TOWER} | ({"features": {"content_fields": content_fields}} if content_fields else {})
    torch.manual_seed(0)
    tt = serving_world.two_tower
    model = build_two_tower(config, tt.vocabs)
    return load_bundle(save_bundle(path, kind="two_tower", model=model, config=config, vocabs=tt.vocabs, catalogue=tt.catalogue))


def _vectors(serving_world, bundle, tmp_path, items: list[dict]) -> dict[str, np.ndarray]:
    service = FeedService(bundle, serving_config(tmp_path), log_dir=serving_world.log, clock=TickingClock(serving_world.start))
    try:
        response = TestClient(create_app(service)).post("/items", json=items)
        assert response.status_code == 200, response.text
        return {i["item_id"]: service.catalogue.vectors[service._row_of(i["item_id"])].copy() for i in items}
    finally:
        service.close()


@pytest.fixture(scope="module")
def words(serving_world):
    ids = serving_world.two_tower.vocabs.tokens.ids
    return " ".join(ids[:4]), " ".join(ids[10:22])  # (a title, an abstract) of known words


def test_an_abstract_moves_the_vector_when_the_bundle_reads_abstracts(serving_world, tmp_path, words):
    title, abstract = words
    bundle = _bundle(serving_world, tmp_path / "b", ["title", "abstract"])
    got = _vectors(serving_world, bundle, tmp_path / "s", [
        {"item_id": "t-only", "title": title, "category": "world"},
        {"item_id": "t-abs", "title": title, "abstract": abstract, "category": "world"},
        {"item_id": "t-abs-again", "title": title, "abstract": abstract, "category": "world"},
    ])  # fmt: skip
    assert not np.allclose(got["t-only"], got["t-abs"], atol=1e-4)  # the abstract's words are in the bag
    np.testing.assert_allclose(got["t-abs"], got["t-abs-again"], atol=1e-6)  # and the rule is deterministic


def test_a_title_only_bundle_ignores_the_abstract_but_the_journal_keeps_it(serving_world, tmp_path, words):
    title, abstract = words
    bundle = _bundle(serving_world, tmp_path / "b", None)  # a bundle saved before content_fields existed
    got = _vectors(serving_world, bundle, tmp_path / "s", [
        {"item_id": "t-only", "title": title},
        {"item_id": "t-abs", "title": title, "abstract": abstract},
    ])  # fmt: skip
    np.testing.assert_allclose(got["t-only"], got["t-abs"], atol=1e-6)
    journal = ItemJournal(tmp_path / "s" / "serving_log").read_new()
    assert dict(zip(journal["item_id"].to_pylist(), journal["abstract"].to_pylist())) == {"t-only": None, "t-abs": abstract}


def test_a_journal_file_written_before_abstracts_still_replays(serving_world, tmp_path, words):
    title, _ = words
    bundle = _bundle(serving_world, tmp_path / "b", ["title", "abstract"])
    first = _vectors(serving_world, bundle, tmp_path / "s", [{"item_id": "old", "title": title}])
    (part,) = (tmp_path / "s" / "serving_log" / JOURNAL_DIR).glob("part-*.parquet")
    pq.write_table(pq.read_table(part).drop_columns(["abstract"]), part)  # the file as the old schema wrote it
    service = FeedService(bundle, serving_config(tmp_path / "s"), log_dir=serving_world.log, clock=TickingClock(serving_world.start))
    try:
        np.testing.assert_allclose(service.catalogue.vectors[service._row_of("old")], first["old"], atol=1e-6)
    finally:
        service.close()
