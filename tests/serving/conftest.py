"""Fixtures for tests/serving: a real ``redis-server`` and the cache suite's backend parametrisation.

``redis_url``: a session-wide server (loopback, no persistence, temp dir), flushed for each test.
``redis_server``: a private server for tests that kill, pause or restart it.
``cache_factory`` / ``cache``: parametrised over the memory and redis backends, so one test suite
checks that both honour the same contract. ``cache_factory.advance(s)`` moves time forward: a fake
clock for memory, a real sleep for redis (whose TTLs are kept by the server).

Redis tests are skipped, with the reason, only when ``redis-server`` is not installed
(``apt-get install redis-server``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from feedrank.serving.cache import MemoryCache, RedisCache, UserVectorCache

REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A ``redis-server`` child process on a loopback port, started and stopped by the tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                                   f"{(self.workdir / f'redis-{self.port}.log').read_text()[-2000:]}")
            try:
                client.ping()
                client.close()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s} s")
                time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (SIGKILL: a crash, not a clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server: connections stay open but nothing answers (a hung server)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)


def _started(workdir: Path) -> RedisServer:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); Redis cache tests need a real server")
    server = RedisServer(workdir)
    server.start()
    return server


@pytest.fixture(scope="session")
def _shared_redis(tmp_path_factory):
    server = _started(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(_shared_redis) -> str:
    client = redis.Redis.from_url(_shared_redis.url)
    client.flushall()
    client.close()
    return _shared_redis.url


@pytest.fixture
def redis_server(tmp_path):
    server = _started(tmp_path)
    yield server
    server.stop()


class CacheFactory:
    """Makes caches of one backend and moves their time forward."""

    def __init__(self, backend: str, redis_url: str | None) -> None:
        self.backend, self.redis_url = backend, redis_url
        self.now = 1000.0
        self.made: list[UserVectorCache] = []

    def make(self, ttl_s: float = 60.0, max_items: int = 1000) -> UserVectorCache:
        if self.backend == "memory":
            cache = MemoryCache(max_items=max_items, ttl_s=ttl_s, clock=lambda: self.now)
        else:
            cache = RedisCache(self.redis_url, ttl_s=ttl_s, socket_timeout=1.0)
        self.made.append(cache)
        return cache

    def advance(self, seconds: float) -> None:
        if self.backend == "memory":
            self.now += seconds
        else:
            time.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
def cache_factory(request):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    factory = CacheFactory(request.param, url)
    yield factory
    for cache in factory.made:
        cache.close()


@pytest.fixture
def cache(cache_factory) -> UserVectorCache:
    return cache_factory.make()
