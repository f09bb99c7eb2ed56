"""The logging policy: the "production system" whose choices the simulated log records.

A realistic log is biased by whoever chose what to show: popular, fresh and roughly on-topic items
are shown far more than the rest, but exploration keeps the whole catalogue in play. The policy
works like a small production stack, vectorised over a block of requests:

1. candidates: ``policy.candidates`` draws per request from three sources (popular-and-fresh, the
   user's *estimated* topics, uniform exploration), each restricted to items that already exist at
   the request time;
2. ranking: a noisy score (popularity, freshness, estimated topic match, Gumbel noise); the best
   ``feed_size`` distinct candidates fill positions 0..feed_size-1 in score order.

Restricting sampling to existing items is exact and cheap: items are kept sorted by creation time,
so the items alive at ``ts`` are a prefix of that order, and a weighted draw from a prefix is one
``searchsorted`` into cumulative weights. The rare request whose candidates hold fewer than
``feed_size`` distinct items (tiny catalogues) is filled by an exhaustive Gumbel-top-k draw over
every live item with the same score, so every feed is complete and duplicate-free.
"""

from __future__ import annotations

import numpy as np

from feedrank.data.world.world import World, _dirichlet_rows, _unit_rows

_US_PER_DAY = 86_400 * 1_000_000
# Rows x items scored at once in the exhaustive fallback (bounds its memory to ~100 MB).
_EXHAUSTIVE_BLOCK = 1 << 22


class LoggingPolicy:
    """Chooses the feed for each request. Build once per world; call ``start_day`` then ``choose``."""

    def __init__(self, world: World, rng: np.random.Generator):
        self.world = world
        c = world.config
        p = c.policy
        # What production believes about each user: the truth blurred towards a random taste.
        noise = _dirichlet_rows(rng, np.full(world.user_topics.shape, c.user_topic_concentration))
        self.user_estimate = (1 - p.interest_noise) * world.user_topics + p.interest_noise * noise  # rows sum to 1
        self._user_unit = _unit_rows(self.user_estimate)
        self._item_unit = _unit_rows(world.item_topics)
        self._log_popularity = np.log(world.item_popularity)
        self.by_creation = np.argsort(world.item_created_us, kind="stable")
        self._created_sorted = world.item_created_us[self.by_creation]
        # Per-day sampling tables, filled by start_day.
        self._popular_cdf: np.ndarray | None = None
        self._topic_cdf: np.ndarray | None = None
        self._topic_base: np.ndarray | None = None

    def start_day(self, day_start_us: int) -> None:
        """Refresh the sampling weights with the day's freshness (evaluated at noon)."""
        w = self.world
        n = w.n_items
        age_h = np.maximum(w.item_age_h(self.by_creation, day_start_us + _US_PER_DAY // 2), 0.0)
        weight = w.item_popularity[self.by_creation] * w.freshness(age_h)
        self._popular_cdf = np.cumsum(weight)
        # One flat cumulative array over (topic, item-by-creation): row t is offset by t * n, so a
        # draw from topic t's live prefix is a single searchsorted for every candidate at once.
        topical = (weight[None, :] * w.item_topics[self.by_creation].T).ravel()
        self._topic_cdf = np.cumsum(topical)
        self._topic_base = np.concatenate([[0.0], self._topic_cdf[n - 1 :: n][:-1]])

    def choose(self, user_idx: np.ndarray, ts_us: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Item indices ``[requests, feed_size]`` shown to ``user_idx`` at ``ts_us``, by position."""
        if self._popular_cdf is None:
            raise RuntimeError("LoggingPolicy.choose called before start_day")
        c = self.world.config
        n_req = len(user_idx)
        alive = np.searchsorted(self._created_sorted, ts_us, side="right")  # live prefix length
        if n_req and alive.min() < c.feed_size:
            raise ValueError(f"only {int(alive.min())} item(s) exist at a request time; feed_size is {c.feed_size}")
        cand = self._candidates(user_idx, alive, rng)  # [R, C] item indices
        match = np.matmul(self._item_unit[cand], self._user_unit[user_idx][:, :, None])[..., 0]
        score = self._score(cand, ts_us[:, None], match, rng)
        # Each item at most once per feed: keep the first of equal candidates, drop the rest.
        order = np.argsort(cand, axis=1, kind="stable")
        sorted_cand = np.take_along_axis(cand, order, axis=1)
        dup_sorted = np.zeros_like(sorted_cand, dtype=bool)
        dup_sorted[:, 1:] = sorted_cand[:, 1:] == sorted_cand[:, :-1]
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        score[dup] = -np.inf

        top = np.argsort(-score, axis=1, kind="stable")[:, : c.feed_size]
        feed = np.take_along_axis(cand, top, axis=1)
        short = np.flatnonzero(~np.isfinite(np.take_along_axis(score, top[:, -1:], axis=1)[:, 0]))
        if short.size:
            feed[short] = self._exhaustive(user_idx[short], ts_us[short], rng)
        return feed

    def _candidates(self, user_idx: np.ndarray, alive: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = self.world.config.policy
        n_req = len(user_idx)
        n_topic = round(p.candidates * p.topic_share)
        n_explore = round(p.candidates * p.explore_share)
        n_popular = p.candidates - n_topic - n_explore
        last = alive[:, None] - 1

        popular_cdf = self._popular_cdf
        u = rng.random((n_req, n_popular)) * popular_cdf[last]
        popular = _search(popular_cdf, u)

        n = self.world.n_items
        topic_cdf = np.cumsum(self.user_estimate[user_idx], axis=1)
        pick = rng.random((n_req, n_topic, 1)) * topic_cdf[:, None, -1:]
        topic = np.minimum((topic_cdf[:, None, :] <= pick).sum(axis=2), topic_cdf.shape[1] - 1)
        base = self._topic_base[topic]
        top = self._topic_cdf[topic * n + last]
        u = base + rng.random((n_req, n_topic)) * (top - base)
        topical = _search(self._topic_cdf, u) - topic * n

        explore = (rng.random((n_req, n_explore)) * alive[:, None]).astype(np.int64)
        # Float edge cases (zero-weight tails) must never reach past the live prefix.
        by_creation = np.minimum(np.concatenate([popular, topical, explore], axis=1), last)
        return self.by_creation[by_creation]

    def _score(self, item_idx: np.ndarray, ts_us: np.ndarray, match: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Production's ranking score; ``match`` is the estimated topic match, shaped like the result.

        Gumbel noise makes the ranking a sample (Gumbel-top-k) rather than a fixed order.
        """
        w = self.world
        p = w.config.policy
        fresh = np.maximum(w.freshness(w.item_age_h(item_idx, ts_us)), 1e-12)
        return (
            p.popularity_weight * self._log_popularity[item_idx]
            + p.freshness_weight * np.log(fresh)
            + p.interest_weight * match
            + p.temperature * rng.gumbel(size=match.shape)
        )

    def _exhaustive(self, user_idx: np.ndarray, ts_us: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gumbel-top-k over every live item for a few requests (exact, duplicate-free)."""
        w = self.world
        f = w.config.feed_size
        items = np.arange(w.n_items)[None, :]
        rows = max(1, _EXHAUSTIVE_BLOCK // w.n_items)
        out = np.empty((len(user_idx), f), dtype=np.int64)
        for s in range(0, len(user_idx), rows):
            t = ts_us[s : s + rows, None]
            match = self._user_unit[user_idx[s : s + rows]] @ self._item_unit.T
            score = self._score(items, t, match, rng)
            score[w.item_created_us[None, :] > t] = -np.inf
            top = np.argpartition(-score, f - 1, axis=1)[:, :f]
            top_score = np.take_along_axis(score, top, axis=1)
            out[s : s + rows] = np.take_along_axis(top, np.argsort(-top_score, axis=1, kind="stable"), axis=1)
        return out


def _search(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``searchsorted(cdf, u, side="right")``, several times faster by searching sorted keys.

    NumPy reuses the previous key's position when keys ascend, which turns random probes into
    cache-friendly sweeps of ``cdf``; the argsort costs less than the cache misses it saves.
    """
    flat = u.ravel()
    order = np.argsort(flat)
    out = np.empty(flat.shape, dtype=np.int64)
    out[order] = np.searchsorted(cdf, flat[order], side="right")
    return out.reshape(u.shape)
