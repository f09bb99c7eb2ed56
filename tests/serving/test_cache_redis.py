"""RedisCache against a real redis-server: wire format, TTL, shared invalidation, and faults that
must never reach the caller (server killed, hung, corrupt values), plus the circuit breaker."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import redis

from feedrank.serving.cache import CacheStats, CircuitBreaker, RedisCache, decode_vector, encode_vector

VEC = np.array([0.25, -0.5, 1.0], dtype=np.float32)


def test_wire_format_round_trip_and_header():
    blob = encode_vector(VEC)
    assert blob[:4] == b"FRV1" and blob[4:7] == b"<f4" and blob[7] == 1
    assert struct.unpack_from("<I", blob, 8) == (3,)
    assert len(blob) == 12 + 3 * 4
    np.testing.assert_array_equal(decode_vector(blob), VEC)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"FRV", "shorter than the header"),
        (b"XXXX<f4\x01" + struct.pack("<I", 3) + VEC.tobytes(), "does not start with"),
        (encode_vector(VEC)[:-1], "holds 11 data bytes, its header says (3,) float32"),
    ],
)
def test_decode_refuses_damaged_values(blob, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_vector(blob)


def test_values_are_written_with_the_ttl(redis_url):
    cache = RedisCache(redis_url, ttl_s=30, prefix="t:")
    client = redis.Redis.from_url(redis_url)
    before_set = time.monotonic()
    cache.set("u1", VEC)
    left_ms = client.pttl("t:u1")
    elapsed_ms = (time.monotonic() - before_set) * 1000
    assert 30_000 - elapsed_ms - 1 <= left_ms <= 30_000  # 30 s from the set, less the time since (1 ms: rounding)
    assert client.get("t:u1") == encode_vector(VEC)
    client.close()
    cache.close()


def test_two_workers_see_each_others_writes_and_invalidations(redis_url):
    worker_a = RedisCache(redis_url, ttl_s=60)
    worker_b = RedisCache(redis_url, ttl_s=60)
    worker_a.set("u1", VEC)
    np.testing.assert_array_equal(worker_b.get("u1"), VEC)
    worker_b.invalidate("u1")  # e.g. worker b received the user's new click
    assert worker_a.get("u1") is None
    worker_a.close()
    worker_b.close()


def test_prefixes_keep_caches_apart(redis_url):
    old = RedisCache(redis_url, ttl_s=60, prefix="model1:")
    new = RedisCache(redis_url, ttl_s=60, prefix="model2:")
    old.set("u1", VEC)
    assert new.get("u1") is None


def test_a_corrupt_value_is_an_error_not_an_exception(redis_url):
    redis.Redis.from_url(redis_url).set("feedrank:uvec:u1", b"garbage")
    cache = RedisCache(redis_url, ttl_s=60)
    cache.set("u2", VEC)
    got = cache.get_many(["u1", "u2"])
    assert got[0] is None
    np.testing.assert_array_equal(got[1], VEC)
    assert cache.stats() == CacheStats(hits=1, misses=0, errors=1)


def test_server_killed_mid_test_never_raises(redis_server):
    cache = RedisCache(redis_server.url, ttl_s=60, breaker_failures=3, breaker_cooldown_s=60)
    cache.set("u1", VEC)
    np.testing.assert_array_equal(cache.get("u1"), VEC)
    redis_server.stop()
    assert cache.get("u1") is None
    cache.set("u1", VEC)
    cache.invalidate("u1")
    assert cache.stats() == CacheStats(hits=1, misses=0, errors=3, short_circuits=0)
    # three consecutive faults opened the breaker: later calls do not even try the dead server
    assert cache.breaker.is_open
    assert cache.get_many(["u1", "u2"]) == [None, None]
    cache.set("u1", VEC)
    assert cache.stats() == CacheStats(hits=1, misses=0, errors=3, short_circuits=3)
    cache.close()


def test_server_down_from_the_start(redis_server):
    redis_server.stop()
    cache = RedisCache(redis_server.url, ttl_s=60)  # constructing does not connect
    assert cache.get("u1") is None
    assert cache.stats().errors == 1


def test_hung_server_times_out_as_an_error(redis_server):
    # 1 s: short enough to keep the test quick, long enough that the set before the pause (a
    # healthy server) never times out on a loaded machine
    cache = RedisCache(redis_server.url, ttl_s=60, socket_timeout=1.0)
    cache.set("u1", VEC)
    redis_server.pause()
    try:
        assert cache.get("u1") is None
    finally:
        redis_server.resume()
    assert cache.stats() == CacheStats(hits=0, misses=0, errors=1)


def test_breaker_lets_a_trial_through_after_cooldown_and_recovers(redis_server):
    now = [0.0]
    cache = RedisCache(redis_server.url, ttl_s=60, breaker_failures=1, breaker_cooldown_s=5, clock=lambda: now[0])
    redis_server.stop()
    assert cache.get("u1") is None  # fault: opens the breaker
    assert cache.get("u1") is None  # skipped
    redis_server.start()  # the server comes back on the same port
    cache.set("u1", VEC)  # still inside the cooldown: skipped, not written
    now[0] = 5.0
    assert cache.get("u1") is None  # the trial call reaches the server: a genuine miss
    assert not cache.breaker.is_open
    cache.set("u1", VEC)
    np.testing.assert_array_equal(cache.get("u1"), VEC)
    assert cache.stats() == CacheStats(hits=1, misses=1, errors=1, short_circuits=2)


def test_circuit_breaker_states():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    assert breaker.allow() and not breaker.record_failure()  # 1 of 2
    breaker.record_success()  # resets the run of failures
    assert not breaker.record_failure()
    assert breaker.record_failure()  # 2 consecutive: open
    assert not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # half-open: one trial ...
    assert not breaker.allow()  # ... and only one
    assert breaker.record_failure()  # the trial failed: open again for a full cooldown
    now[0] = 19.9
    assert not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()
