"""``World``: the synthetic population, catalogue and response model, with its ground truth.

Everything a model could hope to learn is an explicit array here, so later work can measure how much
of it a model recovers: each user's topic interests (``user_topics``), each item's topic mix,
publisher and quality, and the response model that turns them into clicks, dwell, shares and hides.
``respond`` is a plain function of those arrays, so a simulated A/B test can show the same users a
model's feeds instead of the logging policy's and get outcomes from the same ground truth.

Generation is deterministic from ``config.seed``; ``save``/``load_world`` keep the truth beside the
log in ``OUT/truth/`` (Parquet arrays + ``world.json`` with the config), so it survives the process.

Example::

    world = World.generate(WorldConfig(users=100, items=50))
    world.true_affinity(np.array([0, 0]), np.array([3, 7]))      # P(click | examined, fresh), shape [2]
    out = world.respond(users, items, positions, ts_us, np.random.default_rng(0))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedrank.config import from_dict, to_dict
from feedrank.data.schema import EVENT_SCHEMA, ITEM_SCHEMA, TS_TYPE, USER_SCHEMA
from feedrank.data.world.config import WorldConfig

TRUTH_DIR = "truth"
_FORMAT_VERSION = 1
_US_PER_DAY = 86_400 * 1_000_000
_US_PER_HOUR = 3_600 * 1_000_000

_NEWS_TOPICS = (
    "politics", "business", "technology", "science", "health", "sports", "entertainment", "music",
    "movies", "travel", "food", "fashion", "autos", "finance", "weather", "world", "education",
    "gaming", "lifestyle", "environment",
)
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
_AGE_SHARES = (0.18, 0.27, 0.22, 0.18, 0.15)
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "NG")
_COUNTRY_SHARES = (0.30, 0.10, 0.10, 0.08, 0.18, 0.10, 0.08, 0.06)
# Items lean this much towards their publisher's topics (the rest is spread evenly).
_PUBLISHER_TOPIC_PULL = 0.8
# Titles are bags of topic words ("sports17 world3 ..."): a weak text signal that cold-start
# (content-based) models can learn from, drawn from the item's own topic mix.
_TITLE_WORDS = 6
_WORDS_PER_TOPIC = 40


def topic_names(n: int) -> list[str]:
    """Readable names for ``n`` topics: news categories first, then ``topic<k>``."""
    return [_NEWS_TOPICS[k] if k < len(_NEWS_TOPICS) else f"topic{k}" for k in range(n)]


def prefixed_ids(prefix: str, idx: np.ndarray) -> pa.Array:
    """String IDs ``prefix<idx>`` built in Arrow (no per-row Python)."""
    return pc.binary_join_element_wise(prefix, pa.array(np.asarray(idx, dtype=np.int64)).cast(pa.string()), "")


@dataclass
class Outcomes:
    """What happened to each impression (arrays of the impressions' shape)."""

    clicked: np.ndarray  # bool
    dwell_s: np.ndarray  # float32, 0 when not clicked
    shared: np.ndarray  # bool, only when clicked
    hidden: np.ndarray  # bool, only when examined and not clicked


@dataclass(eq=False)
class World:
    """Ground truth of a synthetic feed world. Build with ``World.generate`` or ``load_world``."""

    config: WorldConfig
    # users
    user_topics: np.ndarray  # [U, K] float32, rows sum to 1: true interests
    user_activity: np.ndarray  # [U] float64 expected requests per day
    user_age: np.ndarray  # [U] int8 index into AGE_BUCKETS
    user_country: np.ndarray  # [U] int8 index into COUNTRIES
    # publishers
    publisher_topics: np.ndarray  # [P, K] float32, rows sum to 1: editorial focus
    publisher_quality: np.ndarray  # [P] float32
    # items
    item_topics: np.ndarray  # [I, K] float32, rows sum to 1
    item_publisher: np.ndarray  # [I] int32
    item_type: np.ndarray  # [I] int8 index into item_types
    item_created_us: np.ndarray  # [I] int64 microseconds since the Unix epoch, UTC
    item_quality: np.ndarray  # [I] float32 (publisher quality + item noise)
    item_popularity: np.ndarray  # [I] float64 > 0, heavy-tailed "buzz" (used by the logging policy)
    item_title: pa.Array  # [I] string

    def __post_init__(self) -> None:
        self.topic_names = topic_names(self.config.topics)
        self.item_types = list(self.config.item_type_shares)
        self._user_unit = _unit_rows(self.user_topics)
        self._item_unit = _unit_rows(self.item_topics)
        offsets = self.config.response.type_dwell_log_offset
        self._type_dwell_offset = np.array([offsets[t] for t in self.item_types], dtype=np.float32)
        self._items_table: pa.Table | None = None
        self._users_table: pa.Table | None = None

    def __repr__(self) -> str:  # the arrays would drown the useful part
        c = self.config
        return f"World(users={self.n_users}, items={self.n_items}, topics={c.topics}, publishers={c.publishers}, seed={c.seed})"

    @property
    def n_users(self) -> int:
        return self.user_topics.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_topics.shape[0]

    # ---------------------------------------------------------------- generation

    @classmethod
    def generate(cls, config: WorldConfig) -> World:
        """Draw a world from ``config``; the same config (seed included) gives the same world."""
        config.validate()
        c = config
        rng = np.random.default_rng([c.seed, 0])
        k = c.topics

        # Demographic groups have their own topic tastes; a user's interests lean towards the mean
        # of their age group's and country's tastes, so demographics carry real signal.
        user_age = rng.choice(len(AGE_BUCKETS), size=c.users, p=_AGE_SHARES).astype(np.int8)
        user_country = rng.choice(len(COUNTRIES), size=c.users, p=_COUNTRY_SHARES).astype(np.int8)
        age_taste = rng.dirichlet(np.full(k, 0.5), size=len(AGE_BUCKETS))
        country_taste = rng.dirichlet(np.full(k, 0.5), size=len(COUNTRIES))
        group_taste = (age_taste[user_age] + country_taste[user_country]) / 2
        lean = (1 - c.demographic_strength) / k + c.demographic_strength * group_taste
        user_topics = _dirichlet_rows(rng, c.user_topic_concentration * k * lean)
        user_activity = rng.gamma(c.activity_shape, c.requests_per_user_day / c.activity_shape, size=c.users)

        publisher_topics = rng.dirichlet(np.full(k, c.publisher_topic_concentration), size=c.publishers)
        publisher_quality = rng.normal(0.0, c.publisher_quality_sd, size=c.publishers)
        publisher_size = rng.dirichlet(np.ones(c.publishers))

        item_publisher = rng.choice(c.publishers, size=c.items, p=publisher_size).astype(np.int32)
        pull = _PUBLISHER_TOPIC_PULL * publisher_topics[item_publisher] + (1 - _PUBLISHER_TOPIC_PULL) / k
        item_topics = _dirichlet_rows(rng, c.item_topic_concentration * k * pull)
        type_shares = np.array(list(c.item_type_shares.values()), dtype=np.float64)
        item_type = rng.choice(len(type_shares), size=c.items, p=type_shares / type_shares.sum()).astype(np.int8)
        item_quality = publisher_quality[item_publisher] + rng.normal(0.0, c.item_quality_sd, size=c.items)
        item_popularity = (rng.pareto(c.popularity_exponent, size=c.items) + 1.0) * np.exp(item_quality)
        item_created_us = _creation_times(rng, c)
        item_title = topic_text(rng, item_topics, topic_names(k))

        return cls(
            config=c,
            user_topics=user_topics.astype(np.float32),
            user_activity=user_activity,
            user_age=user_age,
            user_country=user_country,
            publisher_topics=publisher_topics.astype(np.float32),
            publisher_quality=publisher_quality.astype(np.float32),
            item_topics=item_topics.astype(np.float32),
            item_publisher=item_publisher,
            item_type=item_type,
            item_created_us=item_created_us,
            item_quality=item_quality.astype(np.float32),
            item_popularity=item_popularity,
            item_title=item_title,
        )

    # ---------------------------------------------------------------- ground truth

    def topic_match(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Cosine of user interests and item topics (0..1); arrays broadcast like numpy."""
        u = self._user_unit[self._check_index(user_idx, self.n_users, "user_idx")]
        i = self._item_unit[self._check_index(item_idx, self.n_items, "item_idx")]
        return np.einsum("...k,...k->...", u, i)

    def true_affinity(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """P(click | the user examines a fresh item): the noise-free, position-free click utility.

        ``user_idx`` and ``item_idx`` broadcast like numpy arrays, so ``true_affinity(u[:, None],
        np.arange(world.n_items)[None, :])`` scores a block of users against the whole catalogue.
        """
        return self._attraction(self.topic_match(user_idx, item_idx), item_idx)

    def _attraction(self, match: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        r = self.config.response
        return _sigmoid(r.click_bias + r.affinity_weight * match + r.quality_weight * self.item_quality[item_idx])

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """P(the user looks at the slot): the position-bias curve ``(1 + position) ** -decay``."""
        positions = np.asarray(positions)
        if positions.size and positions.min() < 0:
            raise ValueError(f"positions must be >= 0, got {int(positions.min())}")
        return np.power(1.0 + positions, -self.config.response.position_decay)

    def freshness(self, age_h: np.ndarray) -> np.ndarray:
        """Appeal multiplier of an item ``age_h`` hours old: halves every half-life down to a floor.

        Items that do not exist yet (negative age) have no appeal: nothing engages with them.
        """
        r = self.config.response
        age_h = np.asarray(age_h, dtype=np.float64)
        decayed = r.freshness_floor + (1 - r.freshness_floor) * np.exp2(-np.maximum(age_h, 0) / r.freshness_half_life_h)
        return np.where(age_h >= 0, decayed, 0.0)

    def item_age_h(self, item_idx: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
        return (np.asarray(ts_us, dtype=np.int64) - self.item_created_us[item_idx]) / _US_PER_HOUR

    def respond(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        positions: np.ndarray,
        ts: np.ndarray,
        rng: np.random.Generator,
    ) -> Outcomes:
        """Simulate users' reactions to impressions (all arrays broadcast to one shape).

        ``ts`` is microseconds since the Unix epoch (int64) or ``datetime64``. One uniform decides
        both examination and click (click if ``u < examine * attract``, examined-but-skipped if
        ``examine * attract <= u < examine``), so the click probability is exactly the product.
        """
        try:
            user_idx, item_idx, positions, ts_us = np.broadcast_arrays(
                np.asarray(user_idx), np.asarray(item_idx), np.asarray(positions), _as_us(ts)
            )
        except ValueError as exc:
            raise ValueError(
                f"respond: user_idx, item_idx, positions and ts must have one shape; got "
                f"{np.shape(user_idx)}, {np.shape(item_idx)}, {np.shape(positions)}, {np.shape(ts)}"
            ) from exc
        r = self.config.response
        shape = user_idx.shape
        match = self.topic_match(user_idx, item_idx)
        examine = self.examination(positions)
        attract = self._attraction(match, item_idx) * self.freshness(self.item_age_h(item_idx, ts_us))

        u = rng.random(shape)
        clicked = u < examine * attract
        skipped = ~clicked & (u < examine)
        log_dwell = (
            r.dwell_log_mean
            + r.dwell_affinity_weight * (match - 0.5)
            + self._type_dwell_offset[self.item_type[item_idx]]
            + r.dwell_log_sd * rng.standard_normal(shape)
        )
        dwell_s = np.where(clicked, np.exp(log_dwell), 0.0).astype(np.float32)
        shared = clicked & (rng.random(shape) < _sigmoid(r.share_bias + r.share_affinity_weight * match))
        hidden = skipped & (rng.random(shape) < _sigmoid(r.hide_bias + r.hide_affinity_weight * (1 - match)))
        return Outcomes(clicked=clicked, dwell_s=dwell_s, shared=shared, hidden=hidden)

    # ---------------------------------------------------------------- IDs and tables

    def user_index(self, user_ids: pa.Array | list[str]) -> np.ndarray:
        """Map ``u<idx>`` strings back to indices; an unknown ID raises naming it."""
        return _parse_ids(user_ids, "u", self.n_users, "user")

    def item_index(self, item_ids: pa.Array | list[str]) -> np.ndarray:
        """Map ``i<idx>`` strings back to indices; an unknown ID raises naming it."""
        return _parse_ids(item_ids, "i", self.n_items, "item")

    def items_table(self) -> pa.Table:
        """The catalogue in ``ITEM_SCHEMA``, row ``i`` = item index ``i`` (cached: events take from it)."""
        if self._items_table is None:
            dominant = self.item_topics.argmax(axis=1)
            self._items_table = pa.Table.from_arrays(
                [
                    prefixed_ids("i", np.arange(self.n_items)),
                    prefixed_ids("p", self.item_publisher),
                    pa.array(self.item_types).take(self.item_type),
                    pa.array(self.item_created_us, TS_TYPE),
                    self.item_title,
                    pa.nulls(self.n_items, pa.string()),  # abstract: the world writes titles only
                    pa.array(self.topic_names).take(dominant),
                ],
                schema=ITEM_SCHEMA,
            )
        return self._items_table

    def users_table(self) -> pa.Table:
        """User metadata in ``USER_SCHEMA``, row ``u`` = user index ``u``."""
        if self._users_table is None:
            self._users_table = pa.Table.from_arrays(
                [
                    prefixed_ids("u", np.arange(self.n_users)),
                    pa.array(AGE_BUCKETS).take(self.user_age),
                    pa.array(COUNTRIES).take(self.user_country),
                ],
                schema=USER_SCHEMA,
            )
        return self._users_table

    def impressions_table(
        self,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        ts_us: np.ndarray,
        positions: np.ndarray,
        request_ids: pa.Array,
        outcomes: Outcomes,
    ) -> pa.Table:
        """Canonical log rows (``EVENT_SCHEMA``) for impressions and their outcomes (1-D arrays).

        Item and user metadata are denormalised from the world, as every reader does: the one
        builder of simulated log rows, for the simulated log and for simulated A/B tests alike.
        """
        items, users = self.items_table().take(pa.array(item_idx)), self.users_table().take(pa.array(user_idx))
        n = len(item_idx)
        columns = {
            "user_id": users["user_id"],
            "item_id": items["item_id"],
            "ts": pa.array(np.asarray(ts_us, dtype=np.int64)).cast(TS_TYPE),
            "request_id": request_ids,
            "position": pa.array(np.asarray(positions, dtype=np.int32)),
            **{name: pa.array(getattr(outcomes, name)) for name in ("clicked", "dwell_s", "shared", "hidden")},
            **{c: items[c] for c in ("publisher", "item_type", "created_ts", "title", "abstract", "category")},
            **{c: users[c] for c in ("age_bucket", "country")},
            "rating": pa.nulls(n, pa.float32()),
            "scroll_pct": pa.nulls(n, pa.float32()),
        }
        return pa.table(columns, schema=EVENT_SCHEMA)

    # ---------------------------------------------------------------- persistence

    def save(self, out_dir: str | Path) -> Path:
        """Write the truth to ``out_dir/truth/`` (Parquet + ``world.json``); returns that folder."""
        truth = Path(out_dir) / TRUTH_DIR
        truth.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "topics": _matrix(self.user_topics),
            "activity": self.user_activity,
            "age": self.user_age,
            "country": self.user_country,
        }), truth / "users.parquet")
        pq.write_table(pa.table({
            "topics": _matrix(self.item_topics),
            "publisher": self.item_publisher,
            "item_type": self.item_type,
            "created_us": self.item_created_us,
            "quality": self.item_quality,
            "popularity": self.item_popularity,
            "title": self.item_title,
        }), truth / "items.parquet")
        pq.write_table(pa.table({
            "topics": _matrix(self.publisher_topics),
            "quality": self.publisher_quality,
        }), truth / "publishers.parquet")
        meta = {
            "format_version": _FORMAT_VERSION,
            "config": to_dict(self.config),
            "topic_names": self.topic_names,
            "item_types": self.item_types,
            "age_buckets": list(AGE_BUCKETS),
            "countries": list(COUNTRIES),
        }
        (truth / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
        return truth

    def _check_index(self, idx: np.ndarray, n: int, name: str) -> np.ndarray:
        idx = np.asarray(idx)
        if idx.size == 0:
            return idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{name} must be integer indices, got dtype {idx.dtype}")
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise IndexError(f"{name}: {int(bad.sum())} index(es) outside [0, {n}), e.g. {int(idx[bad].flat[0])}")
        return idx


def load_world(out_dir: str | Path) -> World:
    """Read the world saved by ``World.save`` (``out_dir/truth/``); names any missing file."""
    truth = Path(out_dir) / TRUTH_DIR
    meta_path = truth / "world.json"
    for path in (meta_path, truth / "users.parquet", truth / "items.parquet", truth / "publishers.parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"no saved world: missing {path}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {_FORMAT_VERSION}")
    config = from_dict(WorldConfig, meta["config"])
    users = pq.read_table(truth / "users.parquet")
    items = pq.read_table(truth / "items.parquet")
    publishers = pq.read_table(truth / "publishers.parquet")
    if (users.num_rows, items.num_rows, publishers.num_rows) != (config.users, config.items, config.publishers):
        raise ValueError(
            f"{truth}: {users.num_rows} users, {items.num_rows} items, {publishers.num_rows} publishers saved, "
            f"but world.json says {config.users}, {config.items}, {config.publishers}"
        )
    return World(
        config=config,
        user_topics=_from_matrix(users["topics"]),
        user_activity=users["activity"].to_numpy(),
        user_age=users["age"].to_numpy(),
        user_country=users["country"].to_numpy(),
        publisher_topics=_from_matrix(publishers["topics"]),
        publisher_quality=publishers["quality"].to_numpy(),
        item_topics=_from_matrix(items["topics"]),
        item_publisher=items["publisher"].to_numpy(),
        item_type=items["item_type"].to_numpy(),
        item_created_us=items["created_us"].to_numpy(),
        item_quality=items["quality"].to_numpy(),
        item_popularity=items["popularity"].to_numpy(),
        item_title=items["title"].combine_chunks(),
    )


# -------------------------------------------------------------------- helpers


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)


def _dirichlet_rows(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per row of ``alpha`` (numpy's ``dirichlet`` takes one alpha only).

    A tiny floor keeps a row from being all zeros when every small-alpha gamma underflows.
    """
    g = rng.standard_gamma(alpha) + 1e-12
    return g / g.sum(axis=1, keepdims=True)


def _creation_times(rng: np.random.Generator, c: WorldConfig) -> np.ndarray:
    """Items before the window spread over ``prehistory_days``; new ones arrive during it."""
    start_us = int(c.start.timestamp()) * 1_000_000
    n_old = c.items_before_window
    old = start_us - (rng.random(n_old) * c.prehistory_days * _US_PER_DAY).astype(np.int64)
    new = start_us + (rng.random(c.items - n_old) * c.days * _US_PER_DAY).astype(np.int64)
    created = np.concatenate([old, new])
    return created[rng.permutation(c.items)]  # new items do not all sit at the end of the index


def topic_text(rng: np.random.Generator, item_topics: np.ndarray, names: list[str], n_words: int = _TITLE_WORDS) -> pa.Array:
    """``n_words`` words per item, each from a topic drawn from the item's own topic mix: the
    world's titles, and (longer) the abstracts a MIND-format fixture of the world writes."""
    n, k = item_topics.shape
    cdf = np.cumsum(item_topics, axis=1)
    u = rng.random((n, n_words)) * cdf[:, -1:]
    topics = np.minimum((cdf[:, None, :] <= u[:, :, None]).sum(axis=2), k - 1)
    word = rng.integers(0, _WORDS_PER_TOPIC, size=(n, n_words))
    vocab = pc.binary_join_element_wise(
        pa.array(np.repeat(names, _WORDS_PER_TOPIC)),
        pa.array(np.tile(np.arange(_WORDS_PER_TOPIC), k)).cast(pa.string()),
        "",
    )
    columns = [vocab.take(topics[:, j] * _WORDS_PER_TOPIC + word[:, j]) for j in range(n_words)]
    return pc.binary_join_element_wise(*columns, " ")


def _as_us(ts: np.ndarray) -> np.ndarray:
    ts = np.asarray(ts)
    if np.issubdtype(ts.dtype, np.datetime64):
        return ts.astype("datetime64[us]").astype(np.int64)
    if not np.issubdtype(ts.dtype, np.integer):
        raise TypeError(f"ts must be int64 microseconds since the epoch or datetime64, got dtype {ts.dtype}")
    return ts.astype(np.int64)


def _matrix(m: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(m).ravel()), m.shape[1])


def _from_matrix(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.values.to_numpy().reshape(len(arr), arr.type.list_size)


def _parse_ids(ids: pa.Array | list[str], prefix: str, n: int, what: str) -> np.ndarray:
    ids = pa.array(ids, pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    ok = pc.fill_null(pc.match_substring_regex(ids, f"^{prefix}[0-9]{{1,18}}$"), False)
    bad = ids.filter(pc.invert(ok))
    if len(bad):
        raise KeyError(f"{len(bad)} {what} id(s) not of the form {prefix}<index>, e.g. {bad[0].as_py()!r}")
    idx = np.asarray(pc.utf8_slice_codeunits(ids, 1).cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    out = idx >= n
    if out.any():
        raise KeyError(f"{int(out.sum())} unknown {what} id(s) (world has {n}), e.g. {prefix}{int(idx[out][0])}")
    return idx
