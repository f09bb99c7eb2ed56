"""User-vector cache for serving: one interface, an in-process and a Redis backend.

Computing a user vector runs the user tower over the user's history; caching it for ``ttl_s`` saves
that on repeat requests, and ``POST /events`` calls ``invalidate`` so new behaviour shows up at once.
A cache is an optimisation, never a dependency: every fault of the backend (server down, timeout,
corrupt value) is swallowed, counted in ``stats().errors`` and answered as a miss, so serving goes on
from the user tower. Bad *arguments* (a NaN vector, a non-string id) are caller bugs and do raise.

``MemoryCache`` lives in one process (each uvicorn worker has its own, and one worker's invalidation
is invisible to the others); ``RedisCache`` is shared by all workers. Both return read-only float32
arrays, so a caller cannot corrupt a cached vector in place.

A dead Redis would otherwise cost ``socket_timeout`` on every request (a hung server) or a failed
connect per call: after ``breaker_failures`` consecutive faults the circuit breaker opens and calls
skip Redis entirely (counted as ``short_circuits``) for ``breaker_cooldown_s``; then a single trial
call goes through, closing the breaker on success and re-opening it on failure.

Example::

    cache = make_cache(CacheConfig(backend="redis", url="redis://cache:6379/0", ttl_s=600))
    vec = cache.get(user_id)
    if vec is None:
        vec = user_tower(user_id)
        cache.set(user_id, vec)
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]


@dataclass
class CacheConfig:
    """Which cache serving uses and how long vectors live in it.

    ``max_items`` bounds the memory backend only (Redis is bounded by its own ``maxmemory``);
    ``url``, ``prefix``, ``socket_timeout_s`` and the breaker settings apply to Redis only.
    """

    backend: Literal["memory", "redis"] = "memory"
    ttl_s: float = 3600.0
    max_items: int = 100_000
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "feedrank:uvec:"
    socket_timeout_s: float = 0.05
    breaker_failures: int = 3
    breaker_cooldown_s: float = 5.0

    def validate(self) -> None:
        for name in ("ttl_s", "socket_timeout_s", "breaker_cooldown_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_items", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend == "redis" and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, got {self.url!r}")


@dataclass(frozen=True)
class CacheStats:
    """Outcome counts since the cache was made. Each looked-up key is exactly one of hit, miss,
    error (the backend failed) or short_circuit (skipped while the breaker was open); a failed or
    skipped ``set``/``set_many``/``invalidate`` call adds one to ``errors`` or ``short_circuits``."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    short_circuits: int = 0


def check_user_id(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id:
        raise TypeError(f"user_id must be a non-empty str, got {type(user_id).__name__} {user_id!r}")
    return user_id


def as_user_vector(vec: np.ndarray, user_id: str) -> np.ndarray:
    """A read-only float32 1-D copy of ``vec``; refuses shapes and values no tower should produce."""
    array = np.asarray(vec)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"vector for user {user_id!r} must be 1-D and non-empty, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"vector for user {user_id!r} must hold floats, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"vector for user {user_id!r} contains NaN or inf")
    out = np.array(array, dtype=np.float32, order="C")
    out.setflags(write=False)
    return out


class UserVectorCache(ABC):
    """User id -> user vector, with a TTL. Backend faults never raise out of these methods."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "errors": 0, "short_circuits": 0}

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._counts[outcome] += n

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._counts)

    def get(self, user_id: str) -> np.ndarray | None:
        """The cached vector, or None (absent, expired, or the backend failed)."""
        return self.get_many([user_id])[0]

    def set(self, user_id: str, vec: np.ndarray) -> None:
        """Cache ``vec`` for ``user_id`` for the TTL (replacing any cached vector)."""
        self.set_many({user_id: vec})

    @abstractmethod
    def get_many(self, user_ids: Sequence[str]) -> list[np.ndarray | None]:
        """``get`` for several users in one round trip; one entry per id, in order."""

    @abstractmethod
    def set_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        """``set`` for several users in one round trip."""

    @abstractmethod
    def invalidate(self, user_id: str) -> bool:
        """Forget ``user_id``'s vector (their behaviour changed), for every reader of this cache.

        False when the backend could not be reached: the old vector may still be there, and the
        caller must not trust a hit for this user until an ``invalidate`` succeeds."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend (connections or memory); the cache must not be used afterwards."""


class MemoryCache(UserVectorCache):
    """An in-process LRU cache with a TTL; thread-safe (FastAPI runs sync endpoints in a threadpool).

    ``clock`` (monotonic seconds) is injectable so tests can expire entries without sleeping.
    """

    def __init__(self, max_items: int, ttl_s: float, clock: Clock = time.monotonic) -> None:
        super().__init__()
        if max_items < 1 or not ttl_s > 0:
            raise ValueError(f"MemoryCache needs max_items >= 1 and ttl_s > 0, got {max_items}, {ttl_s}")
        self.max_items, self.ttl_s, self._clock = max_items, ttl_s, clock
        self._entries: OrderedDict[str, tuple[float, np.ndarray]] = OrderedDict()  # oldest use first

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_many(self, user_ids: Sequence[str]) -> list[np.ndarray | None]:
        keys = [check_user_id(u) for u in user_ids]
        now, out = self._clock(), []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[0] <= now:
                    del self._entries[key]
                    entry = None
                if entry is None:
                    self._counts["misses"] += 1
                    out.append(None)
                else:
                    self._entries.move_to_end(key)
                    self._counts["hits"] += 1
                    out.append(entry[1])
        return out

    def set_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        checked = {check_user_id(u): as_user_vector(v, u) for u, v in vectors.items()}
        expires = self._clock() + self.ttl_s
        with self._lock:
            for key, vec in checked.items():
                self._entries[key] = (expires, vec)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_items:
                self._entries.popitem(last=False)

    def invalidate(self, user_id: str) -> bool:
        key = check_user_id(user_id)
        with self._lock:
            self._entries.pop(key, None)
        return True

    def close(self) -> None:
        with self._lock:
            self._entries.clear()


class CircuitBreaker:
    """Closed until ``failures`` consecutive faults, then open for ``cooldown_s``, then half-open.

    Half-open lets exactly one trial call through (others stay blocked for another cooldown); the
    trial's success closes the breaker, its failure opens it again.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Clock = time.monotonic) -> None:
        self.failures, self.cooldown_s, self._clock = failures, cooldown_s, clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._open_until: float | None = None

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def allow(self) -> bool:
        with self._lock:
            if self._open_until is None:
                return True
            now = self._clock()
            if now < self._open_until:
                return False
            self._open_until = now + self.cooldown_s  # this caller is the trial; hold the others back
            return True

    def record_success(self) -> None:
        with self._lock:
            self._consecutive, self._open_until = 0, None

    def record_failure(self) -> bool:
        """Count a fault; True when this fault opened (or re-opened) the breaker."""
        with self._lock:
            self._consecutive += 1
            if self._consecutive < self.failures:
                return False
            self._open_until = self._clock() + self.cooldown_s
            return True


_MAGIC = b"FRV1"
_HEADER = struct.Struct("<4s3sB")  # magic, numpy dtype str ("<f4"), ndim; then ndim uint32 dims


def encode_vector(vec: np.ndarray) -> bytes:
    """``vec`` as bytes with a dtype/shape header, so a reader can refuse what it cannot decode."""
    shape = struct.pack(f"<{vec.ndim}I", *vec.shape)
    return _HEADER.pack(_MAGIC, vec.dtype.str.encode("ascii"), vec.ndim) + shape + vec.tobytes()


def decode_vector(blob: bytes) -> np.ndarray:
    """Inverse of ``encode_vector``; ``ValueError`` for anything that is not a whole encoded vector."""
    if len(blob) < _HEADER.size:
        raise ValueError(f"cached value of {len(blob)} bytes is shorter than the header")
    magic, dtype_str, ndim = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise ValueError(f"cached value does not start with {_MAGIC!r}")
    dtype = np.dtype(dtype_str.decode("ascii"))
    shape = struct.unpack_from(f"<{ndim}I", blob, _HEADER.size)
    start = _HEADER.size + 4 * ndim
    if len(blob) - start != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"cached value holds {len(blob) - start} data bytes, its header says {shape} {dtype}")
    return np.frombuffer(blob, dtype=dtype, offset=start).reshape(shape)


class RedisCache(UserVectorCache):
    """User vectors in Redis under ``prefix + user_id``, written with a TTL (``SET ... PX``).

    redis-py's own retries are turned off: a cache lookup that fails should fail within one
    ``socket_timeout`` and let the breaker decide, not back off and retry inside a request.
    Constructing the client does not connect, so a server that is down at start-up is just a run of
    misses until it comes back.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        prefix: str = "feedrank:uvec:",
        socket_timeout: float = 0.05,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 5.0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__()
        if not ttl_s > 0:
            raise ValueError(f"RedisCache needs ttl_s > 0, got {ttl_s}")
        self.prefix, self.ttl_ms = prefix, max(1, round(ttl_s * 1000))
        self._client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
        )
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s, clock)

    def _call(self, what: str, op: Callable[[], T], n_keys: int) -> tuple[bool, T | None]:
        """Run one Redis round trip behind the breaker: ``(True, result)`` or ``(False, None)``."""
        if not self.breaker.allow():
            self._count("short_circuits", n_keys)
            return False, None
        try:
            result = op()
        except (redis.RedisError, OSError) as exc:
            self._count("errors", n_keys)
            if self.breaker.record_failure():
                log.warning("redis cache %s failed (%s); skipping redis for %.1f s", what, exc, self.breaker.cooldown_s)
            return False, None
        self.breaker.record_success()
        return True, result

    def get_many(self, user_ids: Sequence[str]) -> list[np.ndarray | None]:
        keys = [self.prefix + check_user_id(u) for u in user_ids]
        if not keys:  # MGET with no keys is a Redis error, not an empty answer
            return []
        ok, blobs = self._call("get", lambda: self._client.mget(keys), len(keys))
        if not ok:
            return [None] * len(keys)
        out: list[np.ndarray | None] = []
        for key, blob in zip(keys, blobs):
            if blob is None:
                self._count("misses")
                out.append(None)
                continue
            try:
                out.append(decode_vector(blob))
                self._count("hits")
            except ValueError as exc:
                log.warning("redis cache: unreadable value under %s: %s", key, exc)
                self._count("errors")
                out.append(None)
        return out

    def set_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        blobs = {self.prefix + check_user_id(u): encode_vector(as_user_vector(v, u)) for u, v in vectors.items()}
        if not blobs:
            return

        def write() -> None:
            pipe = self._client.pipeline(transaction=False)
            for key, blob in blobs.items():
                pipe.set(key, blob, px=self.ttl_ms)
            pipe.execute()

        self._call("set", write, 1)

    def invalidate(self, user_id: str) -> bool:
        key = self.prefix + check_user_id(user_id)
        return self._call("invalidate", lambda: self._client.delete(key), 1)[0]

    def close(self) -> None:
        try:
            self._client.close()
        except (redis.RedisError, OSError):  # closing a dead connection is not worth an error
            pass


def make_cache(cfg: CacheConfig) -> UserVectorCache:
    """The cache ``cfg`` describes."""
    if cfg.backend == "memory":
        return MemoryCache(cfg.max_items, cfg.ttl_s)
    return RedisCache(
        cfg.url,
        cfg.ttl_s,
        prefix=cfg.prefix,
        socket_timeout=cfg.socket_timeout_s,
        breaker_failures=cfg.breaker_failures,
        breaker_cooldown_s=cfg.breaker_cooldown_s,
    )
