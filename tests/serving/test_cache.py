"""The user-vector cache contract, run against both backends (``cache`` is parametrised in conftest)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from feedrank.serving.cache import CacheStats

VEC = np.array([0.6, 0.8, 0.0, -1.5], dtype=np.float32)


def test_miss_then_hit_returns_the_same_float32_values(cache):
    assert cache.get("u1") is None
    cache.set("u1", VEC)
    got = cache.get("u1")
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_array_equal(got, VEC)
    assert cache.stats() == CacheStats(hits=1, misses=1, errors=0, short_circuits=0)


def test_returned_vector_is_read_only_and_detached_from_the_input(cache):
    mine = VEC.copy()
    cache.set("u1", mine)
    mine[0] = 99.0  # the caller reusing its buffer must not change the cached vector
    got = cache.get("u1")
    assert got[0] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        got[0] = 5.0


def test_float64_is_stored_as_float32(cache):
    cache.set("u1", np.array([0.1, 0.2], dtype=np.float64))
    got = cache.get("u1")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([0.1, 0.2], dtype=np.float32))


def test_set_replaces_and_invalidate_forgets(cache):
    cache.set("u1", VEC)
    cache.set("u1", 2 * VEC)
    np.testing.assert_array_equal(cache.get("u1"), 2 * VEC)
    cache.invalidate("u1")
    assert cache.get("u1") is None
    cache.invalidate("never-seen")  # forgetting an absent user is not an error
    assert cache.stats().errors == 0


def test_get_many_and_set_many_keep_order(cache):
    cache.set_many({"a": VEC, "c": 3 * VEC})
    got = cache.get_many(["a", "b", "c"])
    np.testing.assert_array_equal(got[0], VEC)
    assert got[1] is None
    np.testing.assert_array_equal(got[2], 3 * VEC)
    assert cache.get_many([]) == []
    cache.set_many({})
    assert cache.stats() == CacheStats(hits=2, misses=1)


def test_users_are_independent(cache):
    cache.set("u1", VEC)
    cache.set("u2", -VEC)
    cache.invalidate("u1")
    assert cache.get("u1") is None
    np.testing.assert_array_equal(cache.get("u2"), -VEC)


def test_entries_expire_after_ttl(cache_factory):
    """An entry is served while younger than ttl_s and gone once older. Redis keeps TTLs on its own
    (real) clock, so the "still there" read is only owed when it provably came within the TTL: it
    always does, bar a stall of a whole second between two loopback calls on a loaded machine."""
    ttl_s = 1.0
    cache = cache_factory.make(ttl_s=ttl_s)
    before_set = cache_factory.clock()
    cache.set("u1", VEC)
    fresh = cache.get("u1")
    fresh_is_owed = cache_factory.clock() - before_set < ttl_s
    if fresh_is_owed:
        np.testing.assert_array_equal(fresh, VEC)
    cache_factory.advance(1.2)  # more than ttl_s after the set finished, on either clock
    assert cache.get("u1") is None
    hits = int(fresh is not None)
    assert cache.stats() == CacheStats(hits=hits, misses=2 - hits)


@pytest.mark.parametrize(
    ("vec", "message"),
    [
        (np.array([0.1, np.nan], dtype=np.float32), "NaN or inf"),
        (np.array([np.inf, 0.0]), "NaN or inf"),
        (np.ones((2, 2), dtype=np.float32), "must be 1-D"),
        (np.array([], dtype=np.float32), "must be 1-D and non-empty"),
        (np.array([1, 2, 3]), "must hold floats"),
    ],
)
def test_bad_vectors_raise_and_keep_the_cached_one(cache, vec, message):
    cache.set("u1", VEC)
    with pytest.raises(ValueError, match=message):
        cache.set("u1", vec)
    with pytest.raises(ValueError, match="'u1'"):
        cache.set_many({"u2": VEC, "u1": vec})  # all-or-nothing: u2 is not written either
    np.testing.assert_array_equal(cache.get("u1"), VEC)
    assert cache.get("u2") is None


@pytest.mark.parametrize("user_id", [17, "", None, b"u1"])
def test_user_id_must_be_a_non_empty_string(cache, user_id):
    with pytest.raises(TypeError, match="user_id must be a non-empty str"):
        cache.get(user_id)
    with pytest.raises(TypeError, match="user_id must be a non-empty str"):
        cache.set(user_id, VEC)


def test_concurrent_readers_and_writers(cache):
    """Threads hammering one cache (FastAPI's threadpool) lose no counts and raise nothing."""
    n_threads, rounds, failures = 4, 50, []

    def work(t: int) -> None:
        try:
            for i in range(rounds):
                user = f"u{i % 10}"
                cache.set(user, np.full(4, t, dtype=np.float32))
                got = cache.get(user)
                assert got is None or got.shape == (4,)
                if i % 7 == 0:
                    cache.invalidate(user)
        except Exception as exc:  # noqa: BLE001 - collected and re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    stats = cache.stats()
    assert stats.hits + stats.misses == n_threads * rounds
    assert stats.errors == 0
