"""Serving workers that share Redis share their accepted events (feedrank.serving.bus).

Two ``FeedService`` instances stand for two uvicorn workers: separate stores and caches, one real
Redis server, one clock (workers of one machine read the same wall clock).
"""

import time

import pyarrow as pa
import pytest

from feedrank.data.log import read_events
from feedrank.serving.bus import EventBus, decode_events, encode_events
from feedrank.serving.cache import MemoryCache
from feedrank.serving.state import EventIn


def most_active(service) -> str:
    """The log user with the longest history in ``service``'s store."""
    return max(sorted(service.store._snapshot.row_of), key=lambda u: len(service.store.view(u, service.clock()).history))


def eventually(check, timeout_s: float = 60.0) -> bool:
    """Poll ``check`` until it holds. The deadline only bounds a failure: delivery takes
    milliseconds, but a loaded machine may stall the subscriber thread for seconds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_messages_round_trip_and_foreign_ones_are_refused():
    table = pa.table({"user_id": ["u"], "item_id": ["i"]})
    token, back = decode_events(encode_events(b"t" * 16, table))
    assert token == b"t" * 16 and back.equals(table)
    with pytest.raises(ValueError, match="too short"):
        decode_events(b"t" * 16)
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        decode_events(b"t" * 16 + b"not arrow")


@pytest.fixture
def workers(make_service, shared_clock, redis_url):
    """Two services, each with its own memory cache and its own bus on the shared Redis."""
    pair = [make_service(cache=MemoryCache(1000, 600), clock=shared_clock, bus=EventBus(redis_url)) for _ in range(2)]
    assert all(eventually(lambda w=w: w.bus.subscribed) for w in pair)
    return pair


def test_an_event_posted_to_one_worker_reaches_the_other(workers, tmp_path):
    a, b = workers
    user = most_active(b)
    before = b.feed(user, k=10)
    assert b.cache.get(user) is not None  # b holds a vector computed without the event
    clicked = before.items[0].item_id
    row = b.items(clicked)
    impressions = a.store.view(user, a.clock()).impressions

    assert a.record_events([EventIn(user_id=user, item_id=clicked, clicked=True, dwell_s=20.0)]) == 1

    # b's listener thread applies the event, drops the stale vector, counts it, then counts the
    # message as received: wait for that last step, so every effect checked below has happened
    assert eventually(lambda: b.bus.received >= 1)
    assert row in b.store.view(user, b.clock()).seen
    assert b.cache.get(user) is None  # b dropped its stale vector
    view = b.store.view(user, b.clock())
    assert view.history[-1] == row and view.impressions == impressions + 1
    after = b.feed(user, k=10)
    assert (after.path, after.cache) == ("tower", "miss") and clicked not in [i.item_id for i in after.items]
    # each event counted once: a ignores its own message, and only a logged it
    assert a.store.view(user, a.clock()).impressions == impressions + 1
    assert read_events(tmp_path / "serving_log").num_rows == 1
    assert (a.bus.published, b.bus.received, a.bus.received) == (1, 1, 0)
    assert b.health()["event_bus"] == {"subscribed": True, "published": 0, "publish_errors": 0, "received": 1, "dropped": 0}
    assert b'feedrank_events_total{outcome="from_peers"} 1.0' in b.metrics.exposition()


def test_peer_events_for_items_this_worker_does_not_know_are_dropped(workers):
    a, b = workers
    user = most_active(b)
    item = b.catalogue.item_ids[b.catalogue.rankable[0]]
    table, _ = a._event_table([EventIn(user_id=user, item_id=item, request_id=r) for r in ("r1", "r2")])
    table = table.set_column(1, "item_id", pa.array([item, "not-in-this-catalogue"]))
    impressions = b.store.view(user, b.clock()).impressions
    b._apply_peer_events(table)
    assert b.store.view(user, b.clock()).impressions == impressions + 1


def test_a_redis_fault_never_fails_the_post(make_service, redis_server):
    worker = make_service(cache=MemoryCache(1000, 600), bus=EventBus(redis_server.url, retry_s=0.1))
    assert eventually(lambda: worker.bus.subscribed)
    user = most_active(worker)
    item = worker.catalogue.item_ids[worker.catalogue.rankable[0]]
    redis_server.stop()
    assert worker.record_events([EventIn(user_id=user, item_id=item, clicked=True)]) == 1  # accepted, logged, applied
    assert worker.health()["event_bus"]["publish_errors"] == 1
    assert eventually(lambda: not worker.health()["event_bus"]["subscribed"])  # /healthz shows the cut
    assert item in [worker.catalogue.item_ids[r] for r in worker.store.view(user, worker.clock()).seen]
