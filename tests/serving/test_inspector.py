"""The inspector's page and JSON routes over a real FeedService (TestClient)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from feedrank.serving.app import create_app


@pytest.fixture
def client(make_service, serving_world):
    service = make_service()
    with TestClient(create_app(service, compare=make_service(ranker=False), log_dir=str(serving_world.log))) as c:
        c.service = service
        yield c


def test_page_and_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "feedrank inspector" in page.text
    assert "/inspector/inspector.js" in page.text
    assert client.get("/inspector/inspector.js").status_code == 200
    assert client.get("/inspector/inspector.css").status_code == 200


def test_warm_user_history_and_feed(client):
    user = client.get("/inspect/users", params={"kind": "warm"}).json()["user_id"]
    body = client.get(f"/inspect/user/{user}").json()
    assert body["user_id"] == user and body["history"]
    assert {"title", "category", "publisher", "age_h", "item_id"} <= set(body["history"][0])
    feed = client.get("/inspect/feed", params={"user_id": user}).json()
    assert feed["items"] and {"source", "reason", "score", "title", "true_utility"} <= set(feed["items"][0])
    assert {"user", "ann", "rank", "rerank", "total"} <= set(feed["timings_ms"])


def test_click_removes_item_from_feed_and_adds_it_to_history(client):
    user = client.get("/inspect/users", params={"kind": "warm"}).json()["user_id"]
    first = client.get("/inspect/feed", params={"user_id": user}).json()["items"][0]["item_id"]
    event = {"user_id": user, "item_id": first, "clicked": True, "dwell_s": 30}
    assert client.post("/events", json=event).status_code == 200
    after = client.get("/inspect/feed", params={"user_id": user}).json()["items"]
    assert first not in [i["item_id"] for i in after]
    assert client.get(f"/inspect/user/{user}").json()["history"][0]["item_id"] == first


def test_cold_user_is_a_clear_404_with_a_cold_start_feed(client):
    user = client.get("/inspect/users", params={"kind": "cold"}).json()["user_id"]
    missing = client.get(f"/inspect/user/{user}")
    assert missing.status_code == 404 and "unknown user" in missing.json()["detail"]
    assert client.get("/inspect/feed", params={"user_id": user}).json()["path"] == "cold_start"


def test_compare_bundle_gives_a_second_feed(client):
    user = client.get("/inspect/users", params={"kind": "warm"}).json()["user_id"]
    assert client.get("/inspect/meta").json()["compare"] is True
    other = client.get("/inspect/feed", params={"user_id": user, "bundle": "compare"})
    assert other.status_code == 200 and other.json()["items"]
