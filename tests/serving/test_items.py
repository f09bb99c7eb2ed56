"""POST /items: published items are embedded from their content, join the index and the fresh pool,
survive a restart, can be engaged with, and bad bodies are refused naming the problem."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from feedrank.bundle import build_two_tower, load_bundle, save_bundle
from feedrank.data.schema import MAX_ABSTRACT_CHARS
from feedrank.serving.app import create_app
from feedrank.serving.items import MAX_ITEMS_PER_POST, MAX_TITLE_CHARS, JOURNAL_DIR, ItemIn
from feedrank.serving.pipeline import FeedService
from feedrank.serving.state import EventIn

from .conftest import TT_CONFIG, TickingClock, serving_config

CONTENT_CONFIG = {"two_tower": {**TT_CONFIG["two_tower"], "title_dim": 8, "item_id_dropout": 0.2}}


@pytest.fixture(scope="module")
def content_bundle(serving_world, tmp_path_factory):
    """An untrained (seeded) content-aware two-tower over the serving world's vocabularies."""
    tt = serving_world.two_tower
    torch.manual_seed(0)
    model = build_two_tower(CONTENT_CONFIG, tt.vocabs)
    path = tmp_path_factory.mktemp("content") / "bundle"
    return load_bundle(save_bundle(path, kind="two_tower", model=model, config=CONTENT_CONFIG, vocabs=tt.vocabs,
                                   catalogue=tt.catalogue))  # fmt: skip


def topic_words(serving_world, n: int = 6) -> str:
    """A title of ``n`` words the training titles use (so they are in the token vocabulary)."""
    return " ".join(serving_world.two_tower.vocabs.tokens.ids[:n])


@pytest.fixture
def service(content_bundle, serving_world, tmp_path):
    made = []

    def make(ranker: bool = False, **overrides) -> FeedService:
        s = FeedService(content_bundle, serving_config(tmp_path, **overrides), log_dir=serving_world.log,
                        ranker=serving_world.ranker if ranker else None, clock=TickingClock(serving_world.start))  # fmt: skip
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_a_published_item_is_indexed_in_the_fresh_pool_and_kept_across_a_restart(service, serving_world, tmp_path):
    first = service()
    before = first.index.size
    result = first.publish_items([ItemIn(item_id="new-1", title=topic_words(serving_world), publisher="p0", category="world")])
    assert result == {"published": 1, "known": 0}
    assert first.index.size == before + 1
    row = first._row_of("new-1")
    assert row >= first.model.n_items  # a row past the vocabulary: the models read it as OOV
    assert np.isclose(np.linalg.norm(first.catalogue.vectors[row]), 1.0, atol=1e-5)
    fresh = first.feed("u1", k=50)
    assert "new-1" in [i.item_id for i in fresh.items]
    assert "fresh" in next(i.source for i in fresh.items if i.item_id == "new-1").split("+")
    assert first.publish_items([ItemIn(item_id="new-1", title="again")]) == {"published": 0, "known": 1}
    assert first.publish_items([ItemIn(item_id="i1")]) == {"published": 0, "known": 1}  # a trained item
    first.close()

    assert len(list((tmp_path / "serving_log" / JOURNAL_DIR).glob("part-*.parquet"))) == 1
    second = service()  # a restart over the same serving log
    assert second.index.size == before + 1
    np.testing.assert_allclose(second.catalogue.vectors[second._row_of("new-1")], first.catalogue.vectors[row], atol=1e-6)


def test_events_on_a_published_item_are_accepted_and_its_history_reads_as_oov(service, serving_world):
    s = service(ranker=True)
    s.publish_items([ItemIn(item_id="new-2", title=topic_words(serving_world), category="sports")])
    s.record_events([EventIn(user_id="u3", item_id="new-2", clicked=True, dwell_s=20.0)])
    view = s.store.view("u3", s.clock())
    assert s._row_of("new-2") in view.history.tolist()
    feed = s.feed("u3", k=20)  # the user tower and the ranker read the published item as OOV
    assert "new-2" not in [i.item_id for i in feed.items]  # already seen


def test_an_ann_only_feed_can_reach_a_published_item(service, serving_world):
    """With no fresh pool, only the index can bring the item: it is there, searchable at once."""
    s = service(fresh_candidates=0, ann_candidates=500)
    s.publish_items([ItemIn(item_id="new-3", title=topic_words(serving_world))])
    row = s._row_of("new-3")
    vector = s.catalogue.vectors[row]
    _, positions = s.index.search(vector[None].astype(np.float32), 1)
    assert s.index_rows[positions[0][0]] == row


@pytest.fixture
def client(service):
    return TestClient(create_app(service()))


def test_post_items_publishes_and_acknowledges_known_ids(client, serving_world):
    body = [{"item_id": "web-1", "title": topic_words(serving_world), "publisher": "p1"}, {"item_id": "web-2"}]
    assert client.post("/items", json=body).json() == {"published": 2, "known": 0}
    assert client.post("/items", json={"item_id": "web-1"}).json() == {"published": 0, "known": 1}
    assert client.get("/healthz").json()["index"]["size"] >= 2


@pytest.mark.parametrize("body, field", [
    ({"item_id": ""}, "item_id"),
    ({"item_id": "a\nb"}, "item_id"),
    ({"item_id": "x", "title": "line\nbreak"}, "title"),
    ({"item_id": "x", "title": "w" * (MAX_TITLE_CHARS + 1)}, "title"),
    ({"item_id": "x", "created_ts": "2999-01-01T00:00:00Z"}, "created_ts"),
    ({"item_id": "x", "created_ts": 1700000000}, "created_ts"),
    ({"item_id": "x", "body": "not a field"}, "body"),
    ({"item_id": "x", "abstract": 7}, "abstract"),
    ({"item_id": "x", "abstract": "tab\there"}, "abstract"),
    ({"item_id": "x", "abstract": "w" * (MAX_ABSTRACT_CHARS + 1)}, "abstract"),
    ({"item_id": 7}, "item_id"),
])  # fmt: skip
def test_bad_items_are_refused_naming_the_field(client, body, field):
    response = client.post("/items", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == field


def test_item_lists_bodies_and_content_types_are_limited(client):
    too_many = [{"item_id": f"m{i}"} for i in range(MAX_ITEMS_PER_POST + 1)]
    assert client.post("/items", json=too_many).status_code == 413
    assert client.post("/items", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    response = client.post("/items", json=[{"item_id": "ok"}, {"item_id": ""}])
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "items[1].item_id"
    assert client.post("/items", json=[]).status_code == 422


def test_an_id_only_two_tower_still_publishes(serving_world, tmp_path):
    """Publishing does not need a content tower; the vector then comes from categoricals and age."""
    s = FeedService(serving_world.two_tower, serving_config(tmp_path), clock=TickingClock(serving_world.start))
    try:
        assert s.publish_items([ItemIn(item_id="plain", publisher="p0")]) == {"published": 1, "known": 0}
        assert s.index.size == len(s.catalogue.rankable)
    finally:
        s.close()


def test_published_created_ts_sets_the_age(service, serving_world):
    s = service()
    created = serving_world.start - dt.timedelta(hours=5)
    s.publish_items([ItemIn(item_id="old", created_ts=created)])
    row = s._row_of("old")
    assert s.catalogue.born_us[row] == int(created.timestamp() * 1_000_000)
    assert dataclasses.asdict(s.catalogue) is not None


def test_the_shared_lock_lets_readers_share_and_a_writer_wait_for_them():
    import threading

    from feedrank.serving.items import SharedLock

    lock, order = SharedLock(), []

    def writer():
        with lock.writing():
            order.append("write")

    with lock.reading():
        with lock.reading():  # a second reader does not wait for the first
            order.append("read")
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join(timeout=0.2)
        assert thread.is_alive() and order == ["read"]  # the writer waits while a reader holds it
    thread.join(timeout=10)
    assert order == ["read", "write"]


def test_another_worker_picks_up_a_published_item_and_the_events_on_it(service, serving_world):
    a, b = service(), service()  # two workers of one server: one serving log
    a.publish_items([ItemIn(item_id="shared", title=topic_words(serving_world))])
    a.record_events([EventIn(user_id="u5", item_id="shared", clicked=True, dwell_s=9.0)])
    assert b._row_of("shared") < 0
    b._catch_up()  # the event file arrives: the journal is read first, so the event is not dropped
    assert b._row_of("shared") >= 0 and b.index.size == a.index.size
    assert b._row_of("shared") in b.store.view("u5", b.clock()).seen.tolist()  # applied, not dropped
    b._sync_items(b.journal.read_new())  # nothing new: nothing added twice
    assert b.index.size == a.index.size
