"""The HTTP API over the pipeline (memory and Redis caches), Redis dying mid-test, and `feedrank serve`."""

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.serving.app import create_app
from feedrank.serving.cache import RedisCache


@pytest.fixture
def client(make_service, backend_cache):
    service = make_service(cache=backend_cache)
    with TestClient(create_app(service)) as c:
        c.service = service
        yield c


def warm_user(client) -> str:
    return next(u for u in sorted(client.service.store._snapshot.row_of)
                if len(client.service.store.view(u, client.service.clock()).history) >= 3)  # fmt: skip


def test_feed_returns_items_and_server_timing(client):
    user = warm_user(client)
    response = client.get("/feed", params={"user_id": user, "k": 7})
    assert response.status_code == 200
    body = response.json()
    assert (body["path"], body["cache"], len(body["items"])) == ("tower", "miss", 7)
    assert set(body["items"][0]) == {"item_id", "score", "source", "reason", "publisher"}
    timing = response.headers["server-timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["user", "ann", "rank", "rerank", "total"]
    assert all(float(part.split("dur=")[1]) >= 0 for part in timing.split(", "))
    again = client.get("/feed", params={"user_id": user, "k": 7}).json()
    assert (again["path"], again["cache"]) == ("cached", "hit")


def test_unknown_user_is_served_the_cold_start_feed(client):
    response = client.get("/feed", params={"user_id": "never-seen"})
    assert response.status_code == 200
    body = response.json()
    assert body["path"] == "cold_start" and len(body["items"]) == client.service.cfg.k_default
    assert len({item["publisher"] for item in body["items"]}) >= 2


@pytest.mark.parametrize("k", ["0", "51", "-3", "abc", "2.5"])
def test_bad_k_is_a_422_naming_k(client, k):
    response = client.get("/feed", params={"user_id": "u1", "k": k})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "k"]


def test_missing_user_id_is_a_422(client):
    response = client.get("/feed", params={"k": 3})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "user_id"]


def test_posting_an_event_invalidates_and_changes_the_feed(client):
    user = warm_user(client)
    before = client.get("/feed", params={"user_id": user, "k": 10}).json()
    clicked = before["items"][0]["item_id"]
    response = client.post("/events", json={"user_id": user, "item_id": clicked, "clicked": True, "dwell_s": 12.5})
    assert response.status_code == 200 and response.json() == {"accepted": 1}
    after = client.get("/feed", params={"user_id": user, "k": 10}).json()
    assert (after["path"], after["cache"]) == ("tower", "miss")
    assert clicked not in [item["item_id"] for item in after["items"]]
    other = before["items"][1]["item_id"]
    batch = [{"user_id": user, "item_id": other}, {"user_id": "someone", "item_id": other, "position": 3}]
    assert client.post("/events", json=batch).json() == {"accepted": 2}


def test_oversized_bodies_are_413(client):
    limit = client.service.cfg.max_body_bytes
    big = json.dumps([{"user_id": "u", "item_id": "x" * 200}] * (limit // 200 + 10))
    response = client.post("/events", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    assert client.post("/events", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    many = [{"user_id": "u", "item_id": "i"}] * (client.service.cfg.max_events_per_post + 1)
    response = client.post("/events", json=many)
    assert response.status_code == 413 and "at most" in response.json()["detail"]


def test_malformed_events_are_422_naming_the_field(client):
    item = client.get("/feed", params={"user_id": "u1", "k": 1}).json()["items"][0]["item_id"]
    response = client.post("/events", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]
    response = client.post("/events", json={"user_id": "u1", "item_id": item, "dwell_s": -2})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "dwell_s"
    response = client.post("/events", json=[{"user_id": "u1", "item_id": item}, {"user_id": "u1"}])
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "events[1].item_id"
    response = client.post("/events", json=[{"user_id": "u1", "item_id": item, "clicked": "maybe"}])
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "events[0].clicked"
    response = client.post("/events", json=[{"user_id": "u1", "item_id": item}, 7])
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "events[1]"
    response = client.post("/events", json="hello")
    assert response.status_code == 422 and "event object or a list" in response.json()["detail"]
    response = client.post("/events", json={"user_id": "u1", "item_id": "no-such-item"})
    assert response.status_code == 422 and "unknown item 'no-such-item'" in response.json()["detail"]
    assert client.service.sink.rows_written == 0  # nothing was logged


def test_healthz_reports_models_index_and_cache(client, cache_backend):
    body = client.get("/healthz").json()
    assert body["models"]["two_tower"] == client.service.two_tower.version
    assert body["models"]["ranker"] == client.service.ranker_bundle.version
    assert body["index"]["kind"] == "flat" and body["index"]["size"] == len(client.service.catalogue.rankable)
    assert body["cache"]["backend"] == cache_backend and body["cache"]["status"] == "ok"


def test_metrics_expose_stage_histograms_and_counters(client):
    user = warm_user(client)
    client.get("/feed", params={"user_id": user})
    client.get("/feed", params={"user_id": user})
    client.get("/feed", params={"user_id": "nobody"})
    client.post("/events", json={"user_id": "nobody", "item_id": "no-such-item"})
    text = client.get("/metrics").text
    for stage in ("user", "ann", "rank", "rerank"):
        assert f'feedrank_stage_seconds_count{{stage="{stage}"}} 3.0' in text
    assert 'feedrank_stage_seconds_bucket{le="0.05",stage="rank"}' in text
    assert "feedrank_feed_seconds_count 3.0" in text
    assert 'feedrank_cache_lookups_total{outcome="hit"} 1.0' in text
    assert 'feedrank_cache_lookups_total{outcome="miss"} 2.0' in text
    assert "feedrank_cache_hit_ratio" not in text  # a ratio since start: Prometheus takes the rate of the counters
    assert "feedrank_cold_start_total 1.0" in text
    assert 'feedrank_events_total{outcome="rejected"} 1.0' in text


def test_killing_redis_mid_test_still_serves_and_counts_errors(make_service, redis_server):
    # a generous timeout: the live server's answers must not time out on a loaded machine, and once it
    # is killed every call is refused at once
    cache = RedisCache(redis_server.url, ttl_s=600, socket_timeout=10.0, breaker_failures=2, breaker_cooldown_s=60)
    service = make_service(cache=cache)
    with TestClient(create_app(service)) as client:
        user = warm_user(type("C", (), {"service": service}))
        assert client.get("/feed", params={"user_id": user}).json()["cache"] == "miss"
        assert client.get("/feed", params={"user_id": user}).json()["cache"] == "hit"
        redis_server.stop()
        for _ in range(4):  # errors, then the open breaker short-circuits: all served
            response = client.get("/feed", params={"user_id": user})
            assert response.status_code == 200 and response.json()["cache"] == "error"
            assert response.json()["path"] == "tower" and response.json()["items"]
        item = response.json()["items"][0]["item_id"]
        assert client.post("/events", json={"user_id": user, "item_id": item, "clicked": True}).status_code == 200
        assert 'feedrank_cache_lookups_total{outcome="error"} 4.0' in client.get("/metrics").text
        assert client.get("/healthz").json()["cache"]["status"] == "degraded"


# ------------------------------------------------------------------------------------------------
# feedrank serve


def test_serve_dry_run_builds_the_service_and_prints_health(serving_world, tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  start_time: '{serving_world.start.isoformat()}'\n")
    result = CliRunner().invoke(app, ["serve", str(serving_world.two_tower.path), "--ranker", str(serving_world.ranker.path),
                                      "--log", str(serving_world.log), "--config", str(config),
                                      "--serving-log", str(tmp_path / "slog"), "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    health = json.loads(result.output)
    assert health["models"] == {"two_tower": serving_world.two_tower.version, "ranker": serving_world.ranker.version}
    assert health["users"] > 0
    assert health["index"]["kind"] == "flat" and health["event_log"]["dir"] == str(tmp_path / "slog")


def test_serve_refuses_bad_inputs_with_exit_code_2(serving_world, tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing"), "--dry-run"])
    assert result.exit_code == 2 and "no such directory" in result.output
    config = tmp_path / "bad.yaml"
    config.write_text("serving:\n  ann_candidate: 5\n")
    result = CliRunner().invoke(app, ["serve", str(serving_world.two_tower.path), "--config", str(config), "--dry-run"])
    assert result.exit_code == 2 and "ann_candidate" in result.output
