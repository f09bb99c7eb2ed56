"""``WorldConfig``: every knob of the synthetic news-feed world, in one typed place.

The world has three parts, and the config mirrors them so a YAML file reads like the model it sets:

- the top level: who and what exists (users, items, publishers, topics), when (start date, days),
  and how the catalogue and the population are shaped (activity, popularity tail, fresh arrivals);
- ``response``: how a user reacts to one impression. This *is* the ground truth that later work
  tries to recover, and what a simulated A/B test replays against a model's feeds;
- ``policy``: how the production system that produced the log chose what to show. It is what makes
  the log biased (popular, fresh, roughly on-topic items get shown more) while still covering the
  catalogue.

Example::

    cfg = from_dict(WorldConfig, {"users": 500, "items": 300, "response": {"position_decay": 1.0}})
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0 and math.isfinite(value), f"{name} must be > 0, got {value!r}")


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value >= 0 and math.isfinite(value), f"{name} must be >= 0, got {value!r}")


def _finite(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(math.isfinite(value), f"{name} must be finite, got {value!r}")


@dataclass
class ResponseConfig:
    """The user response model: examination x attraction, then dwell, share and hide.

    ``P(click) = examine(position) * true_affinity(user, item) * freshness(item age)`` with
    ``examine(p) = (1 + p) ** -position_decay`` and ``true_affinity = sigmoid(click_bias +
    affinity_weight * topic_match + quality_weight * item_quality)``, ``topic_match`` being the
    cosine of the user's and the item's topic vectors (0..1).
    """

    click_bias: float = -2.5
    affinity_weight: float = 4.0
    quality_weight: float = 0.5
    position_decay: float = 0.8
    freshness_half_life_h: float = 48.0
    # Old items keep this share of their appeal: evergreen content still gets some clicks.
    freshness_floor: float = 0.2
    # Dwell of a click is lognormal: log-mean rises with topic match and depends on the item type.
    dwell_log_mean: float = 3.4
    dwell_log_sd: float = 0.7
    dwell_affinity_weight: float = 1.0
    type_dwell_log_offset: dict[str, float] = field(
        default_factory=lambda: {"article": 0.0, "video": 0.6, "gallery": -0.4}
    )
    # Shares happen only after a click; hides only on an examined, unclicked impression.
    share_bias: float = -4.5
    share_affinity_weight: float = 3.0
    hide_bias: float = -4.0
    hide_affinity_weight: float = 3.0

    def validate(self) -> None:
        _finite(self, "click_bias", "affinity_weight", "quality_weight", "dwell_log_mean",
                "dwell_affinity_weight", "share_bias", "share_affinity_weight", "hide_bias",
                "hide_affinity_weight")
        _non_negative(self, "position_decay")
        _positive(self, "freshness_half_life_h", "dwell_log_sd")
        _require(0 <= self.freshness_floor <= 1, f"freshness_floor must be in [0, 1], got {self.freshness_floor!r}")
        for name, offset in self.type_dwell_log_offset.items():
            _require(math.isfinite(offset), f"type_dwell_log_offset.{name} must be finite, got {offset!r}")


@dataclass
class PolicyConfig:
    """The logging policy: candidate sources, then a noisy score that orders the feed.

    Each request draws ``candidates`` items from three sources (popular-and-fresh, the user's
    estimated topics, uniform exploration over the catalogue) and shows the ``feed_size`` best by
    ``popularity_weight * log(popularity) + freshness_weight * log(freshness) + interest_weight *
    estimated_match + temperature * Gumbel noise``. The estimate of the user's interests is
    ``(1 - interest_noise) * truth + interest_noise * a random taste``: 0 means production knows
    each user exactly, 1 that it knows nothing about them.
    """

    candidates: int = 40
    topic_share: float = 0.5
    explore_share: float = 0.1
    popularity_weight: float = 0.5
    freshness_weight: float = 1.0
    interest_weight: float = 3.0
    interest_noise: float = 0.5
    temperature: float = 1.0

    def validate(self) -> None:
        _positive(self, "candidates")
        _non_negative(self, "popularity_weight", "freshness_weight", "interest_weight", "temperature")
        for name in ("topic_share", "explore_share", "interest_noise"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"{name} must be in [0, 1], got {value!r}")
        _require(self.topic_share + self.explore_share <= 1,
                 f"topic_share + explore_share must be <= 1, got {self.topic_share + self.explore_share!r}")


@dataclass
class WorldConfig:
    """Size, time span and shape of the synthetic world (see the module docstring)."""

    users: int = 2000
    items: int = 1000
    days: int = 3
    topics: int = 12
    publishers: int = 40
    start_date: str = "2024-01-01"
    seed: int = 0
    # Requests per user per day: Poisson around a per-user rate drawn from a gamma with this mean
    # and shape; a small shape gives the long tail of heavy users that real feeds have.
    requests_per_user_day: float = 1.0
    activity_shape: float = 0.6
    feed_size: int = 10
    # Share of the catalogue created during the window (the rest exists before it, spread over
    # ``prehistory_days``): new items arrive every day, so freshness matters.
    new_item_share: float = 0.5
    prehistory_days: float = 14.0
    # Item popularity ("buzz") is Pareto with this tail exponent, times exp(quality).
    popularity_exponent: float = 1.2
    # Dirichlet concentrations per topic: small values give users few interests, items few topics.
    user_topic_concentration: float = 0.3
    item_topic_concentration: float = 0.2
    publisher_topic_concentration: float = 0.3
    # How much a user's interests lean towards their demographic group's (0 = not at all).
    demographic_strength: float = 0.5
    publisher_quality_sd: float = 0.7
    item_quality_sd: float = 0.5
    item_type_shares: dict[str, float] = field(default_factory=lambda: {"article": 0.7, "video": 0.2, "gallery": 0.1})
    # Rows per written Parquet chunk: bounds memory whatever the size of the world.
    chunk_rows: int = 200_000
    response: ResponseConfig = field(default_factory=ResponseConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def validate(self) -> None:
        _positive(self, "users", "items", "days", "topics", "publishers", "feed_size", "chunk_rows",
                  "requests_per_user_day", "activity_shape", "popularity_exponent",
                  "user_topic_concentration", "item_topic_concentration", "publisher_topic_concentration")
        _non_negative(self, "prehistory_days", "publisher_quality_sd", "item_quality_sd", "seed")
        _require(0 <= self.new_item_share < 1, f"new_item_share must be in [0, 1), got {self.new_item_share!r}")
        _require(0 <= self.demographic_strength <= 1,
                 f"demographic_strength must be in [0, 1], got {self.demographic_strength!r}")
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError as exc:
            raise ValueError(f"start_date must be YYYY-MM-DD, got {self.start_date!r}") from exc
        _require(self.chunk_rows >= self.feed_size, f"chunk_rows ({self.chunk_rows}) must be >= feed_size ({self.feed_size})")
        _require(bool(self.item_type_shares), "item_type_shares must name at least one item type")
        for name, share in self.item_type_shares.items():
            _require(share >= 0 and math.isfinite(share), f"item_type_shares.{name} must be >= 0, got {share!r}")
        _require(sum(self.item_type_shares.values()) > 0, "item_type_shares must not all be 0")
        missing = sorted(set(self.item_type_shares) - set(self.response.type_dwell_log_offset))
        _require(not missing, f"response.type_dwell_log_offset has no entry for item type(s) {missing}")
        # Every request must be able to fill a feed with distinct items that already exist.
        _require(self.items_before_window >= self.feed_size,
                 f"only {self.items_before_window} item(s) exist before the window "
                 f"(items={self.items}, new_item_share={self.new_item_share}); need >= feed_size={self.feed_size}")
        _require(self.policy.candidates >= self.feed_size,
                 f"policy.candidates ({self.policy.candidates}) must be >= feed_size ({self.feed_size})")

    @property
    def items_before_window(self) -> int:
        return self.items - round(self.items * self.new_item_share)

    @property
    def start(self) -> dt.datetime:
        return dt.datetime.combine(dt.date.fromisoformat(self.start_date), dt.time(), tzinfo=dt.timezone.utc)
