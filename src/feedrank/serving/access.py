"""Who may call the feed service, and how often: an optional API key and a per-client rate limit.

Plain classes, no HTTP: ``feedrank.serving.app`` turns a refusal into 401 or 429 and counts it.
Both are off by default (``AuthConfig``, ``RateLimitConfig``), which suits the default loopback bind.

Example::

    keys = ApiKeyCheck("s3cret")
    keys.allows("s3cret"), keys.allows("guess"), keys.allows(None)      # True, False, False

    limiter = RateLimiter(RateLimitConfig(enabled=True, rate_per_s=1, burst=2), clock=lambda: 0.0)
    [limiter.wait_s("10.0.0.7") for _ in range(3)]                      # [0.0, 0.0, 1.0]: the third waits 1 s
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from feedrank.serving.config import AuthConfig, RateLimitConfig


class ApiKeyCheck:
    """Compares a request's key with the configured one in constant time (no timing oracle)."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("the API key must not be empty")
        self._key = key.encode()

    @classmethod
    def from_config(cls, cfg: AuthConfig, environ: dict[str, str] | None = None) -> ApiKeyCheck | None:
        """The check ``cfg`` asks for (None: no API key), the key read from ``cfg.api_key_env``.

        A named variable that is unset or empty is an error, not "no key": a typo in the
        deployment must not open the service.
        """
        if cfg.api_key_env is None:
            return None
        key = (os.environ if environ is None else environ).get(cfg.api_key_env, "")
        if not key:
            raise ValueError(f"serving.auth.api_key_env names {cfg.api_key_env!r}, which is unset or empty")
        return cls(key)

    def allows(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self._key)


class RateLimiter:
    """A token bucket per client: ``burst`` tokens, refilled at ``rate_per_s``; thread-safe.

    Buckets live in an LRU of at most ``max_clients``: a client dropped from it comes back with
    a full bucket, which bounds memory at the cost of forgetting the least recently seen clients.
    """

    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: RateLimitConfig) -> RateLimiter | None:
        return cls(cfg) if cfg.enabled else None

    def wait_s(self, client: str) -> float:
        """0.0 and one token spent when ``client`` may go now, else the seconds until it may."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(client, (float(self.cfg.burst), now))
            tokens = min(float(self.cfg.burst), tokens + (now - at) * self.cfg.rate_per_s)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.cfg.rate_per_s
            self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            if len(self._buckets) > self.cfg.max_clients:
                self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
