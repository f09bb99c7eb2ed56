"""Fixtures for tests/serving: a real ``redis-server`` and the cache suite's backend parametrisation.

``redis_url``: a session-wide server (loopback, no persistence, temp dir), flushed for each test.
``redis_server``: a private server for tests that kill, pause or restart it.
``cache_factory`` / ``cache``: parametrised over the memory and redis backends, so one test suite
checks that both honour the same contract. ``cache_factory.advance(s)`` moves time forward: a fake
clock for memory, a real sleep for redis (whose TTLs are kept by the server); ``cache_factory.clock()``
reads the matching clock.

Timeouts on the shared server are generous (``SOCKET_TIMEOUT_S``): on a loaded 2-core machine a
loopback answer can take far longer than usual, and a timeout there would turn a hit into an
error. Tests of a hung server set their own short timeout on a private server.

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
SOCKET_TIMEOUT_S = 10.0  # a healthy server answers in microseconds; only a hang guard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The port picked for redis-server was taken by another process before the server bound it."""


class RedisServer:
    """A ``redis-server`` child process on a loopback port, started and stopped by the tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 60.0) -> None:
        log_path = self.workdir / f"redis-{self.port}.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT,
            )
        client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                client.close()
                tail = log_path.read_text(errors="replace")[-2000:]
                kind = PortTaken if "Address already in use" in tail else RuntimeError
                raise kind(f"redis-server exited with {self.proc.returncode}: {tail}")
            try:
                pid = client.info("server")["process_id"]
                client.close()
                if pid != self.proc.pid:  # another process's server answers on the port we picked
                    self.stop()
                    raise PortTaken(f"port {self.port} is served by process {pid}, not by our redis-server")
                return
            except (redis.ConnectionError, redis.TimeoutError):  # not listening yet, or slow to answer
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


def _started(workdir: Path, attempts: int = 5) -> RedisServer:
    """A started server on a free port. The port is free when picked but another process may bind
    it before redis-server does (other test runs share the machine): then try a fresh port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); Redis cache tests need a real server")
    for _ in range(attempts - 1):
        server = RedisServer(workdir)
        try:
            server.start()
            return server
        except PortTaken:
            continue
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
            cache = RedisCache(self.redis_url, ttl_s=ttl_s, socket_timeout=SOCKET_TIMEOUT_S)
        self.made.append(cache)
        return cache

    def advance(self, seconds: float) -> None:
        if self.backend == "memory":
            self.now += seconds
        else:
            time.sleep(seconds)

    def clock(self) -> float:
        """Seconds on the clock the backend's TTLs follow (fake for memory, real for redis)."""
        return self.now if self.backend == "memory" else time.monotonic()


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


# ------------------------------------------------------------------------------------------------
# feed service fixtures (tests/serving/test_pipeline*.py, test_app*.py, test_state*.py)

import datetime as dt  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

import torch  # noqa: E402

from feedrank.bundle import Bundle, build_catalogue, build_two_tower, load_bundle, save_bundle  # noqa: E402
from feedrank.config import to_dict  # noqa: E402
from feedrank.data.log import read_events  # noqa: E402
from feedrank.data.simulate import simulate  # noqa: E402
from feedrank.data.world import WorldConfig  # noqa: E402
from feedrank.features.vocab import Vocabularies  # noqa: E402
from feedrank.index import IndexConfig  # noqa: E402
from feedrank.models.ranker import Ranker, RankerConfig  # noqa: E402
from feedrank.serving.bus import EventBus  # noqa: E402
from feedrank.serving.config import EventLogConfig, ServingConfig  # noqa: E402
from feedrank.serving.demo import log_end  # noqa: E402
from feedrank.serving.pipeline import FeedService  # noqa: E402

TT_CONFIG = {"two_tower": {"dim": 16, "user_id_dim": 8, "item_id_dim": 16, "cat_dim": 4, "freshness_dim": 4,
                           "hidden": [32], "dropout": 0.0, "max_history_len": 20}}  # fmt: skip


@dataclass
class ServingWorld:
    """A tiny simulated log and two untrained (seeded) bundles over it: serving needs shapes, not skill."""

    log: Path
    two_tower: Bundle
    ranker: Bundle  # kind "ranker", taking the two-tower vectors as inputs
    start: dt.datetime  # just after the log's last event


@pytest.fixture(scope="session")
def serving_world(tmp_path_factory) -> ServingWorld:
    root = tmp_path_factory.mktemp("serving_world")
    simulate(WorldConfig(users=200, items=120, days=3, seed=1), root / "log")
    events = read_events(root / "log")
    vocabs = Vocabularies.build(events)
    catalogue = build_catalogue(events, vocabs)
    torch.manual_seed(0)
    model = build_two_tower(TT_CONFIG, vocabs)
    two_tower = load_bundle(save_bundle(root / "two_tower", kind="two_tower", model=model, config=TT_CONFIG,
                                        vocabs=vocabs, catalogue=catalogue))  # fmt: skip
    rcfg = RankerConfig(dim=8, hidden=[32], two_tower_dim=16, dropout=0.0, max_history_len=20)
    ranker = Ranker(rcfg, vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes, 2, 3)
    ranker_bundle = load_bundle(save_bundle(root / "ranker", kind="ranker", model=ranker, config={"ranker": to_dict(rcfg)},
                                            vocabs=vocabs, catalogue=catalogue))  # fmt: skip
    return ServingWorld(root / "log", two_tower, ranker_bundle, log_end(root / "log"))


class TickingClock:
    """A clock that moves 1 ms forward on every read: strictly increasing, so an event posted at
    one read is strictly before the next feed's "now", and runs are reproducible."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(milliseconds=1)
        return self.now


def serving_config(tmp_path: Path, **overrides) -> ServingConfig:
    """Small-catalogue settings: an exact (flat) index, the serving log under ``tmp_path``."""
    base = ServingConfig(ann_candidates=60, fresh_candidates=20, k_default=10, k_max=50,
                         index=IndexConfig(kind="flat"), event_log=EventLogConfig(dir=str(tmp_path / "serving_log")))  # fmt: skip
    return replace(base, **overrides)


@pytest.fixture
def shared_clock(serving_world) -> TickingClock:
    """One clock for services that stand for the workers of one server (they read one wall clock)."""
    return TickingClock(serving_world.start)


@pytest.fixture(params=["memory", "redis"])
def cache_backend(request) -> str:
    """The user-vector cache backend a pipeline/app test runs against (Redis: the shared server)."""
    return request.param


@pytest.fixture
def make_service(serving_world, tmp_path, request):
    """``make_service(cache=None, ranker=True, log=True, clock=None, bus=None, **cfg_overrides)`` -> a
    FeedService with a ``TickingClock`` from the end of the log (or ``clock``: services that stand
    for workers of one server share one); closed after the test."""
    made: list[FeedService] = []

    def make(cache: UserVectorCache | None = None, ranker: bool = True, log: bool = True,
             clock: TickingClock | None = None, bus: EventBus | None = None, **overrides) -> FeedService:  # fmt: skip
        service = FeedService(serving_world.two_tower, serving_config(tmp_path, **overrides),
                              ranker=serving_world.ranker if ranker else None,
                              log_dir=serving_world.log if log else None, cache=cache,
                              clock=clock or TickingClock(serving_world.start), bus=bus)  # fmt: skip
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


@pytest.fixture
def backend_cache(cache_backend, request) -> UserVectorCache:
    """A fresh cache of ``cache_backend`` (memory, or Redis on the shared server, flushed)."""
    if cache_backend == "memory":
        cache: UserVectorCache = MemoryCache(max_items=1000, ttl_s=600)
    else:
        cache = RedisCache(request.getfixturevalue("redis_url"), ttl_s=600, socket_timeout=SOCKET_TIMEOUT_S)
    yield cache
    cache.close()


@pytest.fixture
def serving_cfg(tmp_path):
    """``serving_cfg(**overrides)`` -> the tests' ``ServingConfig`` (serving log under ``tmp_path``)."""
    return lambda **overrides: serving_config(tmp_path, **overrides)
