"""The inspector's page and JSON routes over a real FeedService (TestClient)."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from feedrank.serving.app import create_app
from feedrank.serving.config import EventLogConfig


@pytest.fixture
def client(make_service, serving_world, tmp_path):
    service = make_service()
    compare = make_service(ranker=False, event_log=EventLogConfig(dir=str(tmp_path / "compare_log")))
    with TestClient(create_app(service, compare=compare, log_dir=str(serving_world.log))) as c:
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
    assert {"title", "category", "publisher", "age_h", "item_id", "dwell_s"} <= set(body["history"][0])
    feed = client.get("/inspect/feed", params={"user_id": user}).json()
    assert feed["items"] and {"source", "reason", "score", "title", "true_utility"} <= set(feed["items"][0])
    assert {"user", "ann", "rank", "rerank", "total"} <= set(feed["timings_ms"])


def test_every_warm_user_has_a_history(client):
    warm = client.app.state.inspector.warm_users
    assert warm
    for user in warm[:: max(1, len(warm) // 20)]:
        assert client.get(f"/inspect/user/{user}").json()["history"], user


def test_seeded_pick_is_reproducible(client):
    inspector = client.app.state.inspector
    for kind in ("warm", "cold"):
        picks = {client.get("/inspect/users", params={"kind": kind, "seed": 7}).json()["user_id"] for _ in range(3)}
        assert picks == {inspector.random_user(kind, random.Random(7))}
    assert client.get("/inspect/users", params={"kind": "warm", "seed": -1}).status_code == 422


def test_seeded_history_carries_the_logs_dwell(client, serving_world):
    from feedrank.data.log import read_events

    clicks = read_events(serving_world.log, columns=["user_id", "item_id", "ts", "clicked", "dwell_s"]).to_pandas()
    clicks = clicks[clicks.clicked].sort_values("ts")
    user = client.app.state.inspector.warm_users[0]
    expected = clicks[clicks.user_id == user].groupby("item_id").dwell_s.last()
    history = client.get(f"/inspect/user/{user}").json()["history"]
    assert history
    for item in history:
        assert item["dwell_s"] == pytest.approx(float(expected[item["item_id"]]), abs=0.051)


def test_click_removes_item_from_feed_and_adds_it_to_history_with_its_dwell(client):
    user = client.get("/inspect/users", params={"kind": "warm", "seed": 0}).json()["user_id"]
    first = client.get("/inspect/feed", params={"user_id": user}).json()["items"][0]["item_id"]
    event = {"user_id": user, "item_id": first, "clicked": True, "dwell_s": 37.5}
    assert client.post("/events", json=event).status_code == 200
    after = client.get("/inspect/feed", params={"user_id": user}).json()["items"]
    assert first not in [i["item_id"] for i in after]
    newest = client.get(f"/inspect/user/{user}").json()["history"][0]
    assert newest["item_id"] == first and newest["dwell_s"] == pytest.approx(37.5)


def test_cold_user_is_a_clear_404_with_a_cold_start_feed(client):
    user = client.get("/inspect/users", params={"kind": "cold"}).json()["user_id"]
    missing = client.get(f"/inspect/user/{user}")
    assert missing.status_code == 404 and "unknown user" in missing.json()["detail"]
    assert client.get("/inspect/feed", params={"user_id": user}).json()["path"] == "cold_start"


def test_a_user_id_that_is_not_an_id_is_a_422(client):
    assert client.get("/inspect/user/%20padded%20").status_code == 422
    assert client.get("/inspect/feed", params={"user_id": "a\tb"}).status_code == 422


def test_compare_bundle_gives_a_second_feed(client):
    user = client.get("/inspect/users", params={"kind": "warm"}).json()["user_id"]
    assert client.get("/inspect/meta").json()["compare"] is True
    other = client.get("/inspect/feed", params={"user_id": user, "bundle": "compare"})
    assert other.status_code == 200 and other.json()["items"]


def test_run_pages_are_linked_and_served_only_when_they_exist(client, tmp_path):
    from feedrank.serving.inspector.pages import RunPages

    assert client.get("/inspect/meta").json()["pages"] == {"report": None, "labs": None}
    run = tmp_path / "runs" / "demo"  # the layout feedrank demo and `feedrank lab all --out runs/labs` write
    client.app.state.inspector.pages = RunPages.of_bundle(run / "bundle")
    missing = client.get("/run/report.html")
    assert missing.status_code == 404 and "no report.html for this run" in missing.json()["detail"]
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "model.pt").write_text("weights")
    assert client.get("/run/model.pt").status_code == 404  # only the named pages, never the run's other files
    assert client.get("/run/..%2Fbundle%2Fmodel.pt").status_code == 404
    (run / "report.html").write_text("<html>the report</html>")
    (tmp_path / "runs" / "labs").mkdir()
    (tmp_path / "runs" / "labs" / "index.html").write_text("<html>the labs</html>")
    assert client.get("/inspect/meta").json()["pages"] == {"report": "/run/report.html", "labs": "/run/labs.html"}
    assert client.get("/run/report.html").text == "<html>the report</html>"
    assert client.get("/run/labs.html").text == "<html>the labs</html>"


def test_truth_view_is_the_worlds_truth(client, serving_world):
    import numpy as np

    from feedrank.data.world.world import load_world

    world = load_world(str(serving_world.log))
    assert client.get("/inspect/meta").json()["truth"] is True
    user = client.app.state.inspector.warm_users[0]
    row = int(world.user_index([user])[0])
    interests = client.get(f"/inspect/user/{user}").json()["interests"]
    top = np.argsort(-world.user_topics[row])[: len(interests)]
    assert [t["topic"] for t in interests] == [world.topic_names[t] for t in top]
    items = client.get("/inspect/feed", params={"user_id": user}).json()["items"]
    truth = world.true_affinity(np.int64(row), world.item_index([i["item_id"] for i in items]))
    assert [i["true_utility"] for i in items] == pytest.approx(truth.tolist(), abs=1e-4)


def test_a_click_reaches_the_compare_feed_too(client):
    user = client.get("/inspect/users", params={"kind": "warm"}).json()["user_id"]
    shown = [i["item_id"] for i in client.get("/inspect/feed", params={"user_id": user, "bundle": "compare"}).json()["items"]]
    event = {"user_id": user, "item_id": shown[0], "clicked": True, "dwell_s": 12.0}
    assert client.post("/events", json=event).json() == {"accepted": 1}
    after = [i["item_id"] for i in client.get("/inspect/feed", params={"user_id": user, "bundle": "compare"}).json()["items"]]
    assert shown[0] not in after  # the compare service applied the click: its feed no longer shows it
