"""Prometheus metrics of the feed service: one registry per ``FeedService``.

A registry per service (not the process-global default) keeps several services in one process
(tests, a benchmark) from sharing or double-registering counters. With several uvicorn workers each
worker exposes its own numbers on ``/metrics`` (a scrape reaches one worker); aggregate them with
``prometheus_client``'s multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) if one endpoint must see all.

Exposed:

- ``feedrank_stage_seconds{stage}``: histogram per pipeline stage (user, ann, rank, rerank);
- ``feedrank_feed_seconds``: histogram of the whole ``feed`` call;
- ``feedrank_feed_requests_total{path}``: feeds by path (cached, tower, cold_start);
- ``feedrank_cold_start_total``: feeds served by the cold-start fallback;
- ``feedrank_feed_over_budget_total``: feeds slower than ``serving.latency_budget_ms``;
- ``feedrank_cache_lookups_total{outcome}``: user-vector cache hit / miss / error. There is no
  ratio gauge (one since start hides a cache that just went cold): let Prometheus take the rate,
  ``sum(rate(feedrank_cache_lookups_total{outcome="hit"}[5m])) / sum(rate(feedrank_cache_lookups_total[5m]))``;
- ``feedrank_events_total{outcome}``: events accepted or rejected by ``POST /events``;
  ``duplicate``: a retried ``event_id`` acknowledged but not applied again; ``from_peers``:
  accepted by another worker and applied here over Redis (``feedrank.serving.bus``); ``from_log``:
  applied from the serving log (the startup replay and the catch-up of other workers' files,
  ``feedrank.serving.follow``).
  ``rejected`` counts every event of a refused POST (400, 413, 415, 422); a body that could not be
  read as events (cut short, not JSON, too large, wrong content type) counts as one;
- ``feedrank_http_refused_total{route,status}``: requests to ``/feed`` and ``/events`` answered
  with a 4xx by the HTTP boundary (400 body cut short, 401 no or wrong API key, 413, 415, 422,
  429 rate limited).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("user", "ann", "rank", "rerank")
CACHE_OUTCOMES = ("hit", "miss", "error")
PATHS = ("cached", "tower", "cold_start")
# the 4xx each route can answer with (``feedrank.serving.app``)
REFUSALS = {"/feed": (401, 422, 429), "/events": (400, 401, 413, 415, 422, 429)}

# Serving latencies live between a fraction of a millisecond and a few hundred.
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The service's counters and histograms, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram("feedrank_stage_seconds", "Time per feed pipeline stage", ["stage"],
                                       buckets=_BUCKETS, registry=r)  # fmt: skip
        self.feed_seconds = Histogram("feedrank_feed_seconds", "Time of a whole feed request", buckets=_BUCKETS, registry=r)
        self.feed_requests = Counter("feedrank_feed_requests", "Feeds served, by user-vector path", ["path"], registry=r)
        self.cold_starts = Counter("feedrank_cold_start", "Feeds served by the cold-start fallback", registry=r)
        self.over_budget = Counter("feedrank_feed_over_budget", "Feeds slower than the latency budget", registry=r)
        self.cache_lookups = Counter("feedrank_cache_lookups", "User-vector cache lookups by outcome", ["outcome"], registry=r)
        self.events = Counter("feedrank_events", "Events by outcome: this worker's POST /events, or from peers", ["outcome"], registry=r)
        self.refused = Counter("feedrank_http_refused", "Requests refused with a 4xx, by route and status",
                               ["route", "status"], registry=r)  # fmt: skip
        for stage in STAGES:  # every series exists from the start (a 0 is information)
            self.stage_seconds.labels(stage)
        for path in PATHS:
            self.feed_requests.labels(path)
        for outcome in CACHE_OUTCOMES:
            self.cache_lookups.labels(outcome)
        for outcome in ("accepted", "rejected", "from_peers"):
            self.events.labels(outcome)
        for route, statuses in REFUSALS.items():
            for status in statuses:
                self.refused.labels(route, str(status))

    def observe_feed(self, timings_ms: dict[str, float], total_ms: float, path: str, cache: str, budget_ms: float) -> None:
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(stage).observe(ms / 1000.0)
        self.feed_seconds.observe(total_ms / 1000.0)
        self.feed_requests.labels(path).inc()
        if path == "cold_start":
            self.cold_starts.inc()
        if total_ms > budget_ms:
            self.over_budget.inc()
        self.cache_lookups.labels(cache).inc()

    def observe_refusal(self, route: str, status: int) -> None:
        """A 4xx the HTTP boundary sent; only the routes and statuses of ``REFUSALS`` are counted
        (a 404 for any path a scanner tries would grow the label set without bound)."""
        if status in REFUSALS.get(route, ()):
            self.refused.labels(route, str(status)).inc()

    def exposition(self) -> bytes:
        """The text format ``GET /metrics`` returns."""
        return generate_latest(self.registry)
