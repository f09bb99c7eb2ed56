"""Typed settings of the feed service (YAML section ``serving``).

Loaded like every other config (``load_yaml(ServingConfig, path, section="serving")``): an unknown
key fails naming it. The cache, index and re-ranker keep their own dataclasses (``CacheConfig``,
``IndexConfig``, ``RerankConfig``) and appear here as nested sections; ``rerank.k`` is only the
fallback, each request's ``k`` replaces it.

Example YAML::

    serving:
      ann_candidates: 400
      fresh_candidates: 100
      k_default: 20
      k_max: 100
      cache: {backend: redis, url: "redis://127.0.0.1:6379/0", ttl_s: 600}
      index: {kind: hnsw, ef_search: 128}
      rerank: {mmr_lambda: 0.8, per_publisher_cap: 3}
      cold_start: {model_weight: 1.0, popular_weight: 0.5, fresh_weight: 0.3}
      event_log: {dir: serving_log, durable: true}
      store: {max_live_users: 100000, catch_up_interval_s: 1.0}
      limits: {max_dwell_s: 86400, max_future_s: 300, max_past_days: 7, max_json_depth: 8}
      auth: {api_key_env: FEEDRANK_API_KEY}          # default null: no API key
      rate_limit: {enabled: true, rate_per_s: 50, burst: 100}   # default off
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from feedrank.index.config import IndexConfig
from feedrank.serving.cache import CacheConfig
from feedrank.serving.rerank import RerankConfig


@dataclass
class ColdStartConfig:
    """How the feed of a user the service knows nothing about is scored (``feedrank.serving.pipeline``).

    The cold-start score of a candidate is
    ``model_weight * minmax(model score) + popular_weight * popularity + fresh_weight * freshness``:
    the model score is the ranker's value (or the two-tower score) of the *learned default* user
    (OOV id, empty history), min-max scaled over the request's candidates; ``popularity`` is the
    item's training-click percentile in the catalogue, in [0, 1]; ``freshness`` is
    ``0.5 ** (age_h / fresh_half_life_h)``. Candidates come from ANN on the default user vector,
    the ``popular_candidates`` most clicked items and the newest items.
    """

    model_weight: float = 1.0
    popular_weight: float = 0.5
    fresh_weight: float = 0.3
    fresh_half_life_h: float = 24.0
    popular_candidates: int = 100

    def validate(self) -> None:
        for name in ("model_weight", "popular_weight", "fresh_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.model_weight + self.popular_weight + self.fresh_weight <= 0:
            raise ValueError("at least one of model_weight, popular_weight, fresh_weight must be > 0")
        if not (math.isfinite(self.fresh_half_life_h) and self.fresh_half_life_h > 0):
            raise ValueError(f"fresh_half_life_h must be finite and > 0, got {self.fresh_half_life_h}")
        if self.popular_candidates < 0:
            raise ValueError(f"popular_candidates must be >= 0, got {self.popular_candidates}")


@dataclass
class EventLogConfig:
    """Where and how ``POST /events`` rows are written (``feedrank.serving.state.EventSink``).

    ``durable: true`` (the default) writes every POST's rows to their own Parquet file, fsynced,
    before the response: an accepted event is never lost, at the cost of one small file per POST
    (compact them offline). ``durable: false`` buffers rows and flushes when ``flush_rows`` are
    waiting or the oldest is ``flush_interval_s`` old, and at shutdown: a crash (not a clean stop)
    loses at most that buffer.
    """

    dir: str = "serving_log"
    durable: bool = True
    flush_rows: int = 10_000
    flush_interval_s: float = 5.0

    def validate(self) -> None:
        if not self.dir:
            raise ValueError("dir must be a non-empty path")
        if self.flush_rows < 1:
            raise ValueError(f"flush_rows must be >= 1, got {self.flush_rows}")
        if not self.flush_interval_s > 0:
            raise ValueError(f"flush_interval_s must be > 0, got {self.flush_interval_s}")


# ------------------------------------------------------------------------------------------------
# the HTTP boundary (feedrank.serving.app): request limits, API key, rate limit


@dataclass
class RequestLimits:
    """What ``POST /events`` accepts beyond the field types (``feedrank.serving.validation``).

    ``max_dwell_s``: the longest dwell an event may report (default 24 h; longer is a client bug,
    not a reader). ``ts`` must lie within ``[now - max_past_days, now + max_future_s]`` of the
    service clock (``start_time`` or the wall clock): a small allowance for client clock skew
    ahead, a late-delivery window behind, so a bad client clock never writes a ``date=9999-12-31``
    partition. ``max_json_depth``: bodies nested deeper are refused before they are parsed (an
    event list is depth 2).
    """

    max_dwell_s: float = 86_400.0
    max_future_s: float = 300.0
    max_past_days: float = 7.0
    max_json_depth: int = 8

    def validate(self) -> None:
        for name in ("max_dwell_s", "max_future_s", "max_past_days"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if self.max_json_depth < 2:
            raise ValueError(f"max_json_depth must be >= 2 (a list of event objects), got {self.max_json_depth}")


@dataclass
class AuthConfig:
    """Optional API key on ``GET /feed`` and ``POST /events`` (``feedrank.serving.access``).

    Off by default (``api_key_env: null``). Set ``api_key_env`` to the name of an environment
    variable holding the key (the key itself stays out of YAML files and ``/healthz``); requests
    must then send it in the ``header`` header, compared in constant time, else 401.
    ``/healthz`` and ``/metrics`` stay open for probes and scrapers.
    """

    api_key_env: str | None = None
    header: str = "X-API-Key"

    def validate(self) -> None:
        if self.api_key_env is not None and not self.api_key_env:
            raise ValueError("api_key_env must name an environment variable (or be null: no API key)")
        if not self.header:
            raise ValueError("header must be a non-empty header name")


@dataclass
class RateLimitConfig:
    """Optional per-client token bucket on ``GET /feed`` and ``POST /events`` (``feedrank.serving.access``).

    Off by default (``enabled: false``), which suits the default loopback bind (``--host
    127.0.0.1``); turn it on when the server is reachable from other hosts. Each client address
    (the socket peer: behind a proxy that is the proxy, so limit there instead) may make ``burst``
    requests at once and ``rate_per_s`` a second on average; over that -> 429 with
    ``Retry-After``. At most ``max_clients`` buckets are kept (least recently seen dropped first).
    """

    enabled: bool = False
    rate_per_s: float = 50.0
    burst: int = 100
    max_clients: int = 100_000

    def validate(self) -> None:
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"rate_per_s must be finite and > 0, got {self.rate_per_s}")
        for name in ("burst", "max_clients"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class StoreConfig:
    """How the per-worker user store stays bounded and in step with the serving log
    (``feedrank.serving.state.UserStore``, ``feedrank.serving.follow``).

    ``max_live_users``: records of users touched by live events kept in memory (LRU); an evicted
    user is rebuilt from the seeded snapshot and the store's compact journal of live events on the
    next touch, so eviction loses nothing. ``catch_up_interval_s``: how often a worker reads the
    serving-log files it has not applied yet (other workers' events, including those the Redis
    event bus could not deliver); the whole log is replayed once at startup.
    """

    max_live_users: int = 100_000
    catch_up_interval_s: float = 1.0

    def validate(self) -> None:
        if self.max_live_users < 1:
            raise ValueError(f"max_live_users must be >= 1, got {self.max_live_users}")
        if not (math.isfinite(self.catch_up_interval_s) and self.catch_up_interval_s > 0):
            raise ValueError(f"catch_up_interval_s must be finite and > 0, got {self.catch_up_interval_s}")


@dataclass
class ServingConfig:
    """Every setting of ``feedrank serve`` (YAML section ``serving``).

    ``start_time`` replays a past log: the service's clock starts at that instant and advances in
    real time, so item ages, "history strictly before now" and event timestamps stay consistent
    with a synthetic or archived log (None: the wall clock). ``index_dir``: load the ANN index from
    there when its manifest's ``model_version`` is the two-tower bundle's version, else build it
    from the catalogue vectors at startup and save it there (None: always build, never save).
    ``latency_budget_ms`` does not cut requests short; requests over it are counted in
    ``/metrics`` (``feedrank_feed_over_budget_total``) so an alert can watch it.
    """

    ann_candidates: int = 400
    fresh_candidates: int = 100
    item2item_candidates: int = 200  # from the item2item source, when an item2item bundle is served
    k_default: int = 20
    k_max: int = 100
    history_len: int = 50
    max_seen: int = 2000  # per user: the most recent distinct items kept as "seen"
    max_events_per_post: int = 1000
    max_body_bytes: int = 1_000_000
    latency_budget_ms: float = 50.0
    torch_threads: int = 1  # per worker: one request's tensors are small, threads only add overhead
    # the ranker as served: "none" (fp32) or a feedrank.models.quantize mode ("int8": large Linear
    # layers int8 and int8 embedding tables); `feedrank lab quantize` measures size, latency and the
    # holdout AUC/NDCG change of each on your ranker before you turn one on
    quantize: str = "none"
    start_time: str | None = None
    index_dir: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    event_log: EventLogConfig = field(default_factory=EventLogConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    # the HTTP boundary
    limits: RequestLimits = field(default_factory=RequestLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)

    def validate(self) -> None:
        for name in ("ann_candidates", "k_default", "k_max", "max_events_per_post", "max_body_bytes", "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fresh_candidates", "item2item_candidates", "history_len", "max_seen"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.k_default > self.k_max:
            raise ValueError(f"k_default ({self.k_default}) must be <= k_max ({self.k_max})")
        if not self.latency_budget_ms > 0:
            raise ValueError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        if self.start_time is not None:
            parse_start_time(self.start_time)
        from feedrank.models.quantize import QUANTIZE_MODES  # here: loading a config needs no torch

        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        for part in (self.cache, self.index, self.rerank, self.cold_start, self.event_log, self.store):
            part.validate()
        for part in (self.limits, self.auth, self.rate_limit):
            part.validate()


def parse_start_time(value: str) -> dt.datetime:
    """``start_time`` as an aware UTC datetime (a naive ISO-8601 string is taken as UTC)."""
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"start_time must be ISO-8601, got {value!r}") from exc
    return parsed.replace(tzinfo=dt.timezone.utc) if parsed.tzinfo is None else parsed.astimezone(dt.timezone.utc)
