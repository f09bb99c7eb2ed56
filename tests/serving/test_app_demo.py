"""The real server in a subprocess (``feedrank.serving.demo``): what `feedrank demo` prints at the end.

Each test starts uvicorn in a fresh Python process (torch and FAISS imports: seconds each), so the
module is marked slow.
"""

import time

import httpx
import pytest

from feedrank.data.log import read_events
from feedrank.serving.app import ServeSettings
from feedrank.serving.demo import ServerProcess, demo_requests, most_active_user

pytestmark = pytest.mark.slow
# httpx's default 5 s is a short fuse on a loaded 2-core machine where the other worker may still be
# importing torch; these bound a hang, they are not latency targets
TIMEOUT_S = 60.0
DEADLINE_S = 300.0  # for the second worker to come up (ServerProcess waits as long for the first)


def test_demo_requests_shows_warm_cold_and_the_effect_of_an_event(serving_world, tmp_path):
    text = demo_requests(serving_world.two_tower.path, serving_world.ranker.path, serving_world.log, k=5, workdir=tmp_path)
    assert f"ranker={serving_world.ranker.version[:12]}" in text
    warm = most_active_user(serving_world.log)
    assert f"warm user {warm}: path=tower cache=miss" in text
    assert f"warm user {warm}, again (cached vector): path=cached cache=hit" in text
    assert "cold user demo-new-user: path=cold_start" in text
    assert "after the click (vector recomputed): path=tower cache=miss" in text
    assert "is gone from the feed (seen)" in text
    assert text.count("Server-Timing: user;dur=") == 4
    logged = read_events(tmp_path / "serving_log")  # flushed and readable after the server stopped
    assert logged.num_rows == 1 and logged["user_id"][0].as_py() == warm


def test_server_process_reports_a_failed_startup(tmp_path):
    settings = ServeSettings(bundle=str(tmp_path / "no-bundle"))
    with pytest.raises(RuntimeError, match="exited with"):
        with ServerProcess(settings, tmp_path, startup_timeout_s=120):
            pass


def test_sigterm_shuts_down_cleanly_flushing_a_buffered_serving_log(serving_world, tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text("serving:\n  index: {kind: flat}\n  event_log: {durable: false, flush_interval_s: 3600}\n")
    settings = ServeSettings(bundle=str(serving_world.two_tower.path), config=str(config), serving_log=str(tmp_path / "log"))
    with ServerProcess(settings, tmp_path) as server:
        feed = httpx.get(f"{server.url}/feed", params={"user_id": "x", "k": 1}, timeout=TIMEOUT_S).json()
        item = feed["items"][0]["item_id"]
        event = {"user_id": "x", "item_id": item}
        assert httpx.post(f"{server.url}/events", json=event, timeout=TIMEOUT_S).status_code == 200
        assert not list((tmp_path / "log").rglob("part-*.parquet"))  # buffered, not yet written
    assert server.proc.returncode in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    assert read_events(tmp_path / "log").num_rows == 1  # the shutdown flushed it
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=1.0)


def test_two_workers_share_an_event_through_redis(serving_world, tmp_path, redis_url):
    """Each uvicorn worker has its own user store: the event bus must bring a click posted to one
    worker to the other, so no worker shows the clicked item again."""
    settings = ServeSettings(bundle=str(serving_world.two_tower.path), log=str(serving_world.log),
                             redis_url=redis_url, serving_log=str(tmp_path / "log"))  # fmt: skip
    with ServerProcess(settings, tmp_path, workers=2) as server:
        ready: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while len(ready) < 2 and time.monotonic() < deadline:  # fresh connections until both answer, subscribed
            with httpx.Client(timeout=TIMEOUT_S) as client:
                health = client.get(f"{server.url}/healthz").json()
            if health["event_bus"]["subscribed"]:
                ready.add(health["pid"])
            time.sleep(0.05)
        assert len(ready) == 2, "the second worker never answered"
        user = most_active_user(serving_world.log)
        feed = httpx.get(f"{server.url}/feed", params={"user_id": user, "k": 5}, timeout=TIMEOUT_S).json()
        item = feed["items"][0]["item_id"]
        event = {"user_id": user, "item_id": item, "clicked": True}
        assert httpx.post(f"{server.url}/events", json=event, timeout=TIMEOUT_S).status_code == 200
        # pub/sub delivery takes milliseconds, but wait for it, not for a guessed time: until both
        # workers have answered knowing the event (one took the POST, the other received it)
        knowing: set[int] = set()
        deadline = time.monotonic() + DEADLINE_S
        while len(knowing) < 2 and time.monotonic() < deadline:
            with httpx.Client(timeout=TIMEOUT_S) as client:  # a fresh connection: either worker may answer it
                health = client.get(f"{server.url}/healthz").json()
            if health["event_bus"]["published"] + health["event_bus"]["received"] == 1:
                knowing.add(health["pid"])
            time.sleep(0.05)
        assert len(knowing) == 2, "the event never reached the other worker"
        answered: dict[int, dict] = {}
        for _ in range(40):
            with httpx.Client(timeout=TIMEOUT_S) as client:
                feed = client.get(f"{server.url}/feed", params={"user_id": user, "k": 5}).json()
                health = client.get(f"{server.url}/healthz").json()
            assert item not in [i["item_id"] for i in feed["items"]]
            answered[health["pid"]] = health["event_bus"]
        # whichever worker answered knew the event: it took the POST or received it from the other
        assert all(bus["published"] + bus["received"] == 1 for bus in answered.values()), answered
    assert read_events(tmp_path / "log").num_rows == 1  # logged once, by the worker that took the POST
