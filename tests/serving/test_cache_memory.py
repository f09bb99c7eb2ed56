"""MemoryCache specifics: the LRU bound, config and the factory."""

from __future__ import annotations

import numpy as np
import pytest

from feedrank.config import ConfigError, from_dict
from feedrank.serving.cache import CacheConfig, MemoryCache, RedisCache, make_cache

VEC = np.ones(3, dtype=np.float32)


def test_least_recently_used_entry_is_evicted_first():
    cache = MemoryCache(max_items=2, ttl_s=60)
    cache.set("a", VEC)
    cache.set("b", 2 * VEC)
    assert cache.get("a") is not None  # a is now more recent than b
    cache.set("c", 3 * VEC)
    assert len(cache) == 2
    assert cache.get("b") is None
    np.testing.assert_array_equal(cache.get("a"), VEC)
    np.testing.assert_array_equal(cache.get("c"), 3 * VEC)


def test_set_many_beyond_capacity_keeps_the_last_written():
    cache = MemoryCache(max_items=2, ttl_s=60)
    cache.set_many({"a": VEC, "b": VEC, "c": VEC})
    assert [v is not None for v in cache.get_many(["a", "b", "c"])] == [False, True, True]


def test_expiry_is_checked_against_the_injected_clock():
    now = [0.0]
    cache = MemoryCache(max_items=10, ttl_s=5, clock=lambda: now[0])
    cache.set("a", VEC)
    now[0] = 4.999
    assert cache.get("a") is not None
    now[0] = 5.0  # expires exactly at set time + ttl
    assert cache.get("a") is None
    assert len(cache) == 0  # the expired entry was dropped, not just hidden


@pytest.mark.parametrize(("max_items", "ttl_s"), [(0, 1.0), (10, 0.0), (10, -1.0)])
def test_constructor_refuses_bad_bounds(max_items, ttl_s):
    with pytest.raises(ValueError, match="max_items >= 1 and ttl_s > 0"):
        MemoryCache(max_items=max_items, ttl_s=ttl_s)


def test_make_cache_builds_the_configured_backend():
    memory = make_cache(CacheConfig(backend="memory", max_items=7, ttl_s=3))
    assert isinstance(memory, MemoryCache) and memory.max_items == 7 and memory.ttl_s == 3
    redis_cache = make_cache(from_dict(CacheConfig, {"backend": "redis", "url": "redis://127.0.0.1:1/0", "ttl_s": 2}))
    assert isinstance(redis_cache, RedisCache) and redis_cache.ttl_ms == 2000  # no connection is made yet
    redis_cache.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"backend": "memcached"}, "cache.backend: expected one of"),
        ({"ttl": 5}, "unknown key(s) 'ttl'"),
        ({"ttl_s": 0}, "ttl_s must be > 0"),
        ({"max_items": 0}, "max_items must be >= 1"),
        ({"breaker_failures": 0}, "breaker_failures must be >= 1"),
        ({"backend": "redis", "url": "localhost:6379"}, "url must start with redis://"),
    ],
)
def test_cache_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(CacheConfig, data, "cache")
    assert message in str(info.value)
