"""The feed pipeline: ``GET /feed`` and ``POST /events`` as plain calls on one ``FeedService``.

``FeedService`` holds what a request needs and builds it once at startup: the two-tower bundle (and
an optional ranker bundle), per-item arrays of the catalogue (ids, publishers, birth times,
popularity, two-tower item vectors), the ANN index, the user-vector cache, the user store and the
serving log. The HTTP layer (``feedrank.serving.app``) only parses and formats.

``feed(user_id, k)``, stage by stage (each timed; the timings go to ``Server-Timing`` and
``/metrics``)::

    user     cache hit                          -> path "cached"
             else the user tower on the stored state (last N engagements strictly before now,
               counters, attributes), cached        -> path "tower"
             else (no stored state, id unknown to the model): the learned default vector, the
               two-tower's output for the OOV user with an empty history -> path "cold_start"
    ann      ANN top ``ann_candidates`` + the ``fresh_candidates`` newest items (+ the
             ``cold_start.popular_candidates`` most clicked, cold start only) (+ the
             ``item2item_candidates`` neighbours of the history, with an item2item bundle); union, each
             candidate tagged with every source that found it ("ann+fresh"); items not yet
             published at ``now`` and (``rerank.remove_seen``) items already shown are dropped
             here, before they cost ranker time
    rank     the ranker's value (``Ranker.score_candidates``, two-tower vectors as inputs) when a
             ranker bundle is loaded, else the two-tower score ``u . v / T``; cold start blends it
             with popularity and freshness (``ColdStartConfig``)
    rerank   ``feedrank.serving.rerank.rerank``: MMR over the two-tower item vectors, per-publisher
             cap, freshness boost; each item gets its reason

``record_events(events)`` validates a POST's events (unknown item -> ``EventError``, nothing logged;
the canonical schema's rules via ``feedrank.data.schema.validate``), appends them to the serving
log, updates the user store and invalidates each user's cached vector, so the next feed recomputes
it from the new history (and no longer shows the item just seen); a retried event (same
``event_id``) is acknowledged, not applied twice. At construction the service replays the serving
log into the store, then reads the log files other workers write every
``store.catch_up_interval_s`` (``feedrank.serving.follow``): the log is the source of truth, so a
restart forgets nothing and every worker's store converges on every accepted event. With a Redis
cache it also publishes events on the event bus (``feedrank.serving.bus``), the millisecond fast
path, and applies other workers' events the same way.

Item vectors and the index are a snapshot of the catalogue at startup: the item tower's freshness
input ages with them until the next restart or index rebuild (``feedrank.index.needs_rebuild``).
``publish_items`` (``POST /items``, ``feedrank.serving.items``) adds new items to that snapshot
while the server runs: their content vectors join the catalogue rows, the ANN index and the fresh
pool, and a journal in the serving log folder brings them back at the next start. Catalogue rows
past the two-tower's vocabulary are published items; the models read them as the OOV item.

Example::

    service = FeedService(load_bundle("runs/demo/bundle"), ServingConfig(), log_dir="runs/demo/log")
    response = service.feed("u17", k=10)
    response.items[0]        # FeedItem(item_id='i803', score=1.93, source='ann', reason='ann; ...')
    service.record_events([EventIn(user_id="u17", item_id="i803", clicked=True, dwell_s=30.0)])
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from feedrank.bundle import (
    Bundle,
    catalogue_born_us,
    catalogue_item_cats,
    catalogue_item_tokens,
    catalogue_vectors,
    popularity_scores,
)
from feedrank.data.schema import EVENT_SCHEMA, TS_TYPE, conform, to_epoch_us, validate
from feedrank.data.user_batch import user_batch
from feedrank.features.build import FeatureConfig
from feedrank.features.counters import scale_counts, shrunk_ctr, user_counters
from feedrank.features.vocab import ITEM_CAT_COLUMNS, OOV, PAD, USER_CAT_COLUMNS, Vocab, lookup_quiet
from feedrank.index import IndexConfig, IndexFileError, ItemIndex, RecallBelowFloorError, build_index, load_index, publish
from feedrank.models.quantize import quantize_ranker
from feedrank.models.ranker import ItemInputs, UserInputs
from feedrank.serving.bus import EventBus
from feedrank.serving.cache import RedisCache, UserVectorCache, make_cache
from feedrank.serving.config import ServingConfig, parse_start_time
from feedrank.serving.metrics import ServiceMetrics
from feedrank.serving.rerank import Candidates, rerank
from feedrank.serving.follow import LogFollower
from feedrank.serving.item2item import Item2ItemSource
from feedrank.serving.items import ItemIn, ItemJournal, SharedLock, item_inputs, item_vectors, items_table
from feedrank.serving.state import EVENT_ID, SERVING_LOG_SCHEMA, EventIn, EventSink, UserStore, UserView, VocabIndex

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
SOURCES = ("ann", "fresh", "popular", "item2item")  # bit i of a candidate's source mask = found by SOURCES[i]
_US_PER_HOUR = 3.6e9
UNKNOWN_PUBLISHER = "(unknown publisher)"


class EventError(ValueError):
    """A POST's events cannot be accepted (unknown item, schema rule); nothing of the POST was logged."""


class FeedRequestError(ValueError):
    """A feed request is invalid (``k`` out of range, empty user id)."""


@dataclass(frozen=True)
class FeedItem:
    item_id: str
    score: float
    source: str
    reason: str
    publisher: str | None


@dataclass(frozen=True)
class FeedResponse:
    """One feed: the items in order, per-stage milliseconds, the cache outcome and the user-vector path."""

    user_id: str
    items: list[FeedItem]
    timings_ms: dict[str, float]
    cache: str  # hit | miss | error
    path: str  # cached | tower | cold_start
    model_versions: dict[str, str]

    def server_timing(self) -> str:
        """The ``Server-Timing`` header value, e.g. ``user;dur=0.80, ann;dur=0.41, ...``."""
        return ", ".join(f"{stage};dur={ms:.2f}" for stage, ms in self.timings_ms.items())

    def to_dict(self) -> dict[str, Any]:
        """The response body, fields in declaration order, as ``dataclasses.asdict`` makes it (which
        deep-copies every value by generic recursion: ~110 us for 20 items, against ~4 us here)."""
        return {"user_id": self.user_id, "items": [item.__dict__.copy() for item in self.items],
                "timings_ms": dict(self.timings_ms), "cache": self.cache, "path": self.path,
                "model_versions": dict(self.model_versions)}  # fmt: skip


def set_threads(n: int) -> None:
    """Intra-op threads of torch and FAISS for this process (``ServingConfig.torch_threads``).

    One request's tensors are small: extra threads cost more in hand-offs than they save, and
    parallelism comes from serving requests side by side (threadpool, uvicorn workers) instead.
    """
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def history_rows(model: torch.nn.Module, chunk: int = 65_536) -> Tensor:
    """[n_items, item_id_dim]: the two-tower's ``item_tower.embed_history`` of every item index.

    A history item's row is a function of its index alone (its ID row, plus its projected title
    bag when the tower reads titles), so serving computes every row once at startup and a user
    vector gathers its history's rows from here: one lookup instead of an ID lookup, a title bag
    and a projection per history item on every cache miss. Without titles the row is the ID row
    itself, and the ID table is returned as is (no copy). Published items need no rows: a history
    reads them as the OOV item (``_tower_vector``).
    """
    tower = model.item_tower
    if not tower.reads_titles:
        return tower.id_embedding.weight.detach()
    with torch.inference_mode():
        return torch.cat([tower.embed_history(torch.arange(start, min(start + chunk, model.n_items))[None])[0]
                          for start in range(0, model.n_items, chunk)])  # fmt: skip


def make_clock(start_time: str | None) -> Clock:
    """The wall clock (UTC), or one that starts at ``start_time`` and advances in real time."""
    if start_time is None:
        return lambda: dt.datetime.now(dt.timezone.utc)
    start, origin = parse_start_time(start_time), time.monotonic()
    return lambda: start + dt.timedelta(seconds=time.monotonic() - origin)


def vocab_strings(vocab: Vocab) -> np.ndarray:
    """[len(vocab)] object array: the raw id of each index, None for padding, OOV and hash buckets."""
    return np.array([None, None, *vocab.ids, *([None] * vocab.hash_buckets)], dtype=object)


def item_counters(catalogue: pa.Table, features: FeatureConfig) -> np.ndarray:
    """[n_items, 3] float32 item counters of a bundle catalogue (training-window impressions and
    clicks, scaled, and the CTR shrunk to ``features.ctr_prior``, by the functions
    ``point_in_time_counters`` uses), static at serving: the item side of the ranker's inputs,
    computed once."""
    return counter_rows(catalogue["train_impressions"].to_numpy(), catalogue["train_clicks"].to_numpy(), features)


def counter_rows(imps: np.ndarray, clicks: np.ndarray, features: FeatureConfig) -> np.ndarray:
    """[n, 3] float item counters of ``imps`` impressions and ``clicks`` clicks per item."""
    ctr = shrunk_ctr(clicks, imps, features.ctr_prior, features.ctr_prior_weight)
    return np.stack([scale_counts(imps), scale_counts(clicks), ctr], axis=1)


def counter_config(ranker: Bundle) -> FeatureConfig:
    """The CTR prior the ranker was trained with (its bundle's ``features``), the one setting of
    the feature build the serving-side item counters need."""
    return FeatureConfig(**{k: v for k, v in ranker.config.get("features", {}).items()
                            if k in ("ctr_prior", "ctr_prior_weight")})  # fmt: skip


# ------------------------------------------------------------------------------------------------
# startup: the catalogue, the index, the ranker's static inputs


@dataclass
class CatalogueArrays:
    """Per-item arrays indexed by two-tower item index (catalogue row), built once."""

    item_ids: np.ndarray  # fixed-width str ("" for rows that are not items): numpy sorts these in C,
    #                       where object arrays of str compare in Python (rerank dedupes by id)
    rankable: np.ndarray  # rows with an item id
    publishers: np.ndarray  # object raw publisher (None when unknown)
    publisher_groups: np.ndarray  # str publishers, unknown as one group: what the per-publisher cap counts
    item_types: np.ndarray
    categories: np.ndarray
    created_ts: pa.Array  # as in the catalogue (may be null)
    born_us: np.ndarray  # int64 created (else first seen) epoch-us; int64 max for non-items
    popularity: np.ndarray  # float32 in [0, 1]: training-click percentile (0 for non-items)
    popular_rows: np.ndarray  # rankable rows, most popular first
    fresh_rows: np.ndarray  # rankable rows, newest first
    fresh_born_neg: np.ndarray  # -born_us of fresh_rows: ascending, for searchsorted without a copy
    vectors: np.ndarray  # [n_items, dim] float32 two-tower item vectors (zeros for non-items)

    @classmethod
    def build(cls, bundle: Bundle, at: dt.datetime) -> CatalogueArrays:
        cat, vocabs = bundle.catalogue, bundle.vocabs
        n = cat.num_rows
        item_ids = cat["item_id"].fill_null("").to_numpy(zero_copy_only=False).astype(str)
        rankable = np.flatnonzero(cat["item_id"].is_valid().to_numpy(zero_copy_only=False))
        if rankable.size == 0:
            raise ValueError(f"{bundle.path}: the catalogue has no items to serve")
        raw = {c: vocab_strings(vocabs.item_cats[c])[cat[f"{c}_idx"].to_numpy()] for c in ITEM_CAT_COLUMNS}
        born_us = catalogue_born_us(cat, missing=np.iinfo(np.int64).max)
        popularity = np.zeros(n, np.float32)
        popularity[rankable] = popularity_scores(cat, rankable) / rankable.size
        popular_rows = rankable[np.argsort(-popularity[rankable], kind="stable")]
        fresh_rows = rankable[np.argsort(-born_us[rankable], kind="stable")]
        vectors = np.zeros((n, bundle.model.cfg.dim), np.float32)
        vectors[rankable] = catalogue_vectors(bundle.model, cat, at, rankable).numpy()
        groups = np.where(np.equal(raw["publisher"], None), UNKNOWN_PUBLISHER, raw["publisher"]).astype(str)
        return cls(item_ids, rankable, raw["publisher"], groups, raw["item_type"], raw["category"],
                   cat["created_ts"].combine_chunks(), born_us, popularity, popular_rows, fresh_rows, -born_us[fresh_rows],
                   vectors)  # fmt: skip

    def extended(self, items: pa.Table, born_us: np.ndarray, vectors: np.ndarray) -> CatalogueArrays:
        """These arrays plus one row per published item (``feedrank.serving.items.JOURNAL_SCHEMA``
        rows), appended after the last row: no popularity, in the fresh pool by birth time."""
        n, m = len(self.item_ids), items.num_rows
        new_rows = np.arange(n, n + m)
        rankable = np.concatenate([self.rankable, new_rows])
        raw = {c: items[c].to_numpy(zero_copy_only=False).astype(object) for c in ITEM_CAT_COLUMNS}
        all_born = np.concatenate([self.born_us, born_us])
        fresh_rows = rankable[np.argsort(-all_born[rankable], kind="stable")]
        groups = np.where(np.equal(raw["publisher"], None), UNKNOWN_PUBLISHER, raw["publisher"]).astype(str)
        item_ids = np.concatenate([self.item_ids.astype(object), items["item_id"].to_numpy(zero_copy_only=False)]).astype(str)
        return CatalogueArrays(
            item_ids, rankable, np.concatenate([self.publishers, raw["publisher"]]),
            np.concatenate([self.publisher_groups.astype(object), groups]).astype(str),
            np.concatenate([self.item_types, raw["item_type"]]), np.concatenate([self.categories, raw["category"]]),
            pa.concat_arrays([self.created_ts, items["created_ts"].combine_chunks()]), all_born,
            np.concatenate([self.popularity, np.zeros(m, np.float32)]), self.popular_rows, fresh_rows,
            -all_born[fresh_rows], np.concatenate([self.vectors, vectors.astype(np.float32)]),
        )  # fmt: skip

    def newest(self, now_us: int, n: int) -> np.ndarray:
        """The ``n`` newest items already published at ``now_us``."""
        first = int(np.searchsorted(self.fresh_born_neg, -now_us, side="left"))
        return self.fresh_rows[first : first + n]


def load_or_build_index(vectors: np.ndarray, item_ids: np.ndarray, cfg: IndexConfig, index_dir: str | None,
                        model_version: str) -> tuple[ItemIndex, str]:  # fmt: skip
    """The ANN index over ``vectors`` (rows ``item_ids``) and how it was obtained.

    Loaded from ``index_dir`` when its manifest names ``model_version``, its kind is ``cfg.kind``
    and it holds exactly ``item_ids``; else built, and published to ``index_dir`` behind the recall
    gate (a gate failure is logged and the fresh index still serves: better than none).
    """
    if index_dir is not None and Path(index_dir).exists():
        try:
            index = load_index(index_dir)
        except (IndexFileError, OSError) as exc:
            log.warning("index at %s not usable (%s); rebuilding", index_dir, exc)
        else:
            same_items = index.size == len(item_ids) and bool(np.array_equal(index.item_ids, item_ids))
            if index.model_version == model_version and index.cfg.kind == cfg.kind and same_items:
                index.tune(nprobe=cfg.nprobe, ef_search=cfg.ef_search)
                return index, f"loaded from {index_dir}"
            log.info("index at %s is for another model, kind or catalogue; rebuilding", index_dir)
    index = build_index(vectors, item_ids, cfg, model_version)
    if index_dir is None:
        return index, "built"
    try:
        publish(index, index_dir, cfg, vectors)
    except (RecallBelowFloorError, IndexFileError, OSError) as exc:
        log.warning("index not saved to %s: %s", index_dir, exc)
        return index, "built (not saved)"
    return index, f"built and saved to {index_dir}"


@dataclass
class RankerInputs:
    """The ranker bundle's view of the two-tower catalogue: per two-tower row, the ranker's item
    index, categoricals, counters and (when the ranker reads titles) title tokens, static and
    gathered per request; and its id lookups.

    The per-row inputs are one record per row (``rows``, a numpy structured array) rather than a
    table per input: a request's candidates are a few hundred rows scattered over the catalogue,
    and on a large one each gathered row is a cache miss, so one record of 30-60 bytes per
    candidate costs one or two misses where four tables cost four or more.
    """

    bundle: Bundle
    rows: np.ndarray  # [n_tt_items] records: item (int64), cats [n_item_cats], counters [n_item_counters], tokens [T]
    users: VocabIndex
    user_cats: dict[str, VocabIndex]
    use_vectors: bool
    cross_columns: list[int]  # positions in ``cats`` of the ranker's ``cross_counters`` columns, found once

    @classmethod
    def build(cls, ranker: Bundle, two_tower: Bundle) -> RankerInputs:
        model = ranker.model
        if model.n_user_counters not in (0, 2) or model.n_item_counters not in (0, 3):
            raise ValueError(f"{ranker.path}: the ranker reads {model.n_user_counters} user and {model.n_item_counters} "
                             "item counters; serving provides 2 and 3 (feedrank.features.COUNTER_COLUMNS)")  # fmt: skip
        tt_dim = two_tower.model.cfg.dim
        if model.cfg.two_tower_dim not in (0, tt_dim):
            raise ValueError(f"{ranker.path}: the ranker takes two-tower vectors of dim {model.cfg.two_tower_dim}, "
                             f"the two-tower bundle {two_tower.path} makes dim {tt_dim}")  # fmt: skip
        idx = lookup_quiet(ranker.vocabs.items, two_tower.catalogue["item_id"])
        idx[PAD] = PAD
        counters = item_counters(ranker.catalogue, counter_config(ranker))[idx][:, : model.n_item_counters]
        tokens = catalogue_item_tokens(ranker.catalogue).numpy()[idx] if model.reads_titles else None
        return cls(
            bundle=ranker, rows=pack_rows(idx, catalogue_item_cats(ranker.catalogue).numpy()[idx], counters, tokens),
            users=VocabIndex(ranker.vocabs.users), user_cats={c: VocabIndex(v) for c, v in ranker.vocabs.user_cats.items()},
            use_vectors=model.cfg.two_tower_dim > 0,
            cross_columns=[ITEM_CAT_COLUMNS.index(c) for c in model.cross_counters],
        )  # fmt: skip

    @property
    def item_idx(self) -> np.ndarray:
        """[n_tt_items] the ranker's item index of each two-tower row (a view)."""
        return self.rows["item"]

    def items(self, rows: np.ndarray, age_h: np.ndarray, vectors: np.ndarray) -> ItemInputs:
        """The ranker's inputs for the candidate ``rows`` (``vectors``: their two-tower vectors)."""
        got = self.rows[rows]  # the one gather
        column = lambda name: torch.from_numpy(got[name].astype(np.int64))  # noqa: E731
        return ItemInputs(
            item=column("item"), item_cats=column("cats"), item_age_h=torch.from_numpy(age_h.astype(np.float32)),
            counters=torch.from_numpy(np.ascontiguousarray(got["counters"])),
            vectors=torch.from_numpy(vectors) if self.use_vectors else None,
            tokens=column("tokens") if "tokens" in got.dtype.names else None,
        )  # fmt: skip

    def extended(self, items: pa.Table) -> RankerInputs:
        """These inputs plus one row per published item: OOV index, its content in the ranker's
        vocabularies, the counters of an item without impressions."""
        inputs = item_inputs(self.bundle, items)
        zeros = np.zeros(items.num_rows, np.int64)
        counters = counter_rows(zeros, zeros, counter_config(self.bundle))[:, : self.bundle.model.n_item_counters]
        old, has_tokens = self.rows, "tokens" in self.rows.dtype.names
        tokens = cat_padded(torch.from_numpy(old["tokens"].astype(np.int64)), inputs.tokens).numpy() if has_tokens else None
        return dataclasses.replace(self, rows=pack_rows(
            np.concatenate([old["item"], inputs.item.numpy()]), np.concatenate([old["cats"], inputs.item_cats.numpy()]),
            np.concatenate([old["counters"], counters]), tokens,
        ))  # fmt: skip


def pack_rows(item: np.ndarray, cats: np.ndarray, counters: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """[n] records of ``RankerInputs.rows`` from per-input arrays of n rows (``tokens`` None: the
    ranker does not read titles, no field). Categorical and token indices are stored as int32
    (their vocabularies are far smaller), widened back per request; the item index stays int64,
    as ``item_idx`` maps the history with it as is."""
    fields = [("item", np.int64), ("cats", np.int32, (cats.shape[1],)), ("counters", np.float32, (counters.shape[1],))]
    if tokens is not None:
        fields.append(("tokens", np.int32, (tokens.shape[1],)))
    rows = np.empty(len(item), np.dtype(fields))
    rows["item"], rows["cats"], rows["counters"] = item, cats, counters
    if tokens is not None:
        rows["tokens"] = tokens
    return rows


def sorted_hits(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions in ``sorted_values`` (ascending, distinct) of the ``queries`` found there: where
    ``np.isin(sorted_values, queries)`` is true, by binary search, without the sorts of both arrays
    that ``isin`` does (a quarter of the ann stage's numpy time on 500 candidates and 60 seen)."""
    if len(sorted_values) == 0:
        return np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(sorted_values, queries), len(sorted_values) - 1)
    return at[sorted_values[at] == queries]


def cat_padded(a: Tensor, b: Tensor) -> Tensor:
    """Rows of ``a`` then ``b`` ([N, T] token tensors, right-padded with 0), padded to one width."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in (a, b)])


# ------------------------------------------------------------------------------------------------
# the service


class FeedService:
    """Everything a feed request needs, loaded once; see the module docstring.

    ``cache`` and ``clock`` default to ``make_cache(cfg.cache)`` and ``make_clock(cfg.start_time)``;
    tests inject their own. ``log_dir`` seeds the user store from a canonical log.
    """

    def __init__(
        self,
        two_tower: Bundle,
        cfg: ServingConfig,
        ranker: Bundle | None = None,
        log_dir: str | Path | None = None,
        cache: UserVectorCache | None = None,
        clock: Clock | None = None,
        bus: EventBus | None = None,
        item2item: Bundle | None = None,
    ) -> None:
        cfg.validate()
        if two_tower.kind != "two_tower":
            raise ValueError(f"{two_tower.path}: expected a two_tower bundle, got kind {two_tower.kind!r}")
        if ranker is not None and ranker.kind != "ranker":
            raise ValueError(f"{ranker.path}: expected a ranker bundle, got kind {ranker.kind!r}")
        self.cfg, self.two_tower, self.ranker_bundle = cfg, two_tower, ranker
        self.clock = clock or make_clock(cfg.start_time)
        started = self.clock()
        self.model = two_tower.model.eval()
        self.catalogue = CatalogueArrays.build(two_tower, started)
        rankable = self.catalogue.rankable
        self.index, self.index_origin = load_or_build_index(
            self.catalogue.vectors[rankable], self.catalogue.item_ids[rankable], cfg.index, cfg.index_dir,
            two_tower.version,
        )  # fmt: skip
        self.index_rows = rankable  # index position -> catalogue row (the index holds rankable rows in order)
        self.items = VocabIndex(two_tower.vocabs.items)
        self.users = VocabIndex(two_tower.vocabs.users)
        self.user_cats = {c: VocabIndex(v) for c, v in two_tower.vocabs.user_cats.items()}
        if ranker is not None and cfg.quantize != "none":
            ranker = dataclasses.replace(ranker, model=quantize_ranker(ranker.model.eval(), cfg.quantize))
        self.ranker = RankerInputs.build(ranker, two_tower) if ranker is not None else None
        self.item2item = Item2ItemSource(item2item, two_tower) if item2item is not None else None
        self.cache = cache if cache is not None else make_cache(cfg.cache)
        # Users whose cached vector could not be invalidated (Redis down or paused): a hit for them
        # may predate their last event, so their feeds skip the cache until an invalidate succeeds.
        self._stale: set[str] = set()
        if log_dir is not None and Path(log_dir).resolve() == Path(cfg.event_log.dir).resolve():
            raise ValueError(f"the seeding log and serving.event_log.dir are the same folder ({log_dir}): the serving "
                             "log is replayed on top of the seeding log, so every served event would count twice")  # fmt: skip
        max_live = cfg.store.max_live_users
        # the user x item-categorical counts a ranker reads (features.cross_counters), by its vocabularies
        cross = {c: ranker.vocabs.item_cats[c] for c in ranker.model.cross_counters} if ranker is not None else {}
        self.store = (
            UserStore.from_log(log_dir, two_tower.vocabs.items, cfg.history_len, cfg.max_seen, end=started,
                               max_live_users=max_live, cross=cross)
            if log_dir is not None
            else UserStore(two_tower.vocabs.items, cfg.history_len, cfg.max_seen, max_live_users=max_live, cross=cross)
        )  # fmt: skip
        self.metrics = ServiceMetrics()
        # Published items first: the serving log's events may be about them.
        self._published: dict[str, int] = {}  # item id -> catalogue row, items published to this process
        self._publish_lock, self._index_lock = threading.Lock(), SharedLock()
        self.journal = ItemJournal(cfg.event_log.dir)
        self._sync_items(self.journal.read_new())
        # The serving log is the source of truth: replay it now (a restart forgets nothing that was
        # accepted), then catch up on the files other workers write (feedrank.serving.follow).
        self.follower = LogFollower(cfg.event_log.dir)
        self.sink = EventSink(cfg.event_log, on_written=self.follower.mark)
        self.replayed = self._catch_up()
        self.follower.start(self._apply_from_log, cfg.store.catch_up_interval_s)
        self.journal.start(self._sync_items, cfg.store.catch_up_interval_s)  # items other workers published
        # Workers that share a Redis cache also pass events over Redis: milliseconds instead of the
        # catch-up interval (feedrank.serving.bus).
        if bus is None and cfg.cache.backend == "redis":
            bus = EventBus(cfg.cache.url, publish_timeout_s=cfg.cache.socket_timeout_s)
        self.bus = bus
        if bus is not None:
            bus.start(self._apply_peer_events)
        self._cache_lock = threading.Lock()
        self.temperature = float(self.model.temperature())
        self.history_rows = history_rows(self.model)
        cold = UserView("", {c: None for c in USER_CAT_COLUMNS}, np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0, False)
        self.default_vector = self._tower_vector(cold, known_user=False)

    # ---------------------------------------------------------------------------------- feed

    @property
    def model_versions(self) -> dict[str, str]:
        versions = {"two_tower": self.two_tower.version}
        if self.ranker_bundle is not None:
            versions["ranker"] = self.ranker_bundle.version
        if self.item2item is not None:
            versions["item2item"] = self.item2item.bundle.version
        return versions

    def check_k(self, k: int | None) -> int:
        k = self.cfg.k_default if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.cfg.k_max:
            raise FeedRequestError(f"k must be an integer in [1, {self.cfg.k_max}], got {k!r}")
        return k

    def feed(self, user_id: str, k: int | None = None) -> FeedResponse:
        """The feed of ``user_id`` (``k`` items, default ``cfg.k_default``); see the module docstring."""
        if not isinstance(user_id, str) or not user_id:
            raise FeedRequestError(f"user_id must be a non-empty string, got {user_id!r}")
        k = self.check_k(k)
        start = time.perf_counter()
        now = self.clock()
        now_us = to_epoch_us(now)
        timings: dict[str, float] = {}
        mark = start

        def lap(stage: str) -> None:
            nonlocal mark
            t = time.perf_counter()
            timings[stage] = (t - mark) * 1000.0
            mark = t

        view = self.store.view(user_id, now)
        stale = user_id in self._stale and not self._invalidate(user_id)
        vector, cache_outcome = (None, "error") if stale else self._cached_vector(user_id)
        if vector is not None:
            path = "cached"
        elif view.stored or self.users.known(user_id):
            path = "tower"
            vector = self._tower_vector(view, known_user=True)
            if not stale:
                self.cache.set(user_id, vector)
        else:
            path, vector = "cold_start", self.default_vector
        lap("user")

        rows, sources = self._candidates(vector, view, now_us, cold=path == "cold_start")
        lap("ann")

        age_h = np.maximum(now_us - self.catalogue.born_us[rows], 0) / _US_PER_HOUR
        vectors = self.catalogue.vectors[rows]  # gathered once: the ranker's input and MMR's similarities
        scores = self._scores(rows, vectors, vector, view, age_h)
        if path == "cold_start":
            scores = self._cold_start_blend(scores, rows, age_h)
        lap("rank")

        items = self._rerank(rows, vectors, scores, age_h, sources, k)
        lap("rerank")

        total_ms = (time.perf_counter() - start) * 1000.0
        self.metrics.observe_feed(timings, total_ms, path, cache_outcome, self.cfg.latency_budget_ms)
        return FeedResponse(user_id, items, {**timings, "total": total_ms}, cache_outcome, path, self.model_versions)

    def _cached_vector(self, user_id: str) -> tuple[np.ndarray | None, str]:
        """The cached vector (or None) and the lookup's outcome, read from the cache's counters
        (the cache never raises; the lock makes the before/after difference this call's own)."""
        with self._cache_lock:
            before = self.cache.stats()
            vector = self.cache.get(user_id)
            after = self.cache.stats()
        if vector is not None:
            return vector, "hit"
        failed = (after.errors - before.errors) + (after.short_circuits - before.short_circuits)
        return None, "error" if failed else "miss"

    def _tower_vector(self, view: UserView, known_user: bool) -> np.ndarray:
        """The two-tower user vector of ``view``'s state (``known_user`` False: the OOV id)."""
        history = view.history[-self.model.cfg.max_history_len :] if len(view.history) else view.history
        history = np.where(history < self.model.n_items, history, OOV)  # published items: the OOV item
        batch = user_batch(
            np.array([self.users(view.user_id) if known_user else OOV], dtype=np.int64),
            np.array([[self.user_cats[c](view.cats[c]) for c in USER_CAT_COLUMNS]], dtype=np.int64),
            np.array([0, len(history)]), history, user_counters(view.impressions, view.clicks)[None],
            len(ITEM_CAT_COLUMNS),
        )  # fmt: skip
        with torch.inference_mode():  # TwoTower.user_vectors, its history rows gathered from the table
            history_emb = self.history_rows[batch.history]
            return self.model.user_tower(batch.user, batch.user_cats, batch.counters, history_emb, batch.history_mask)[0].numpy()

    def _candidates(self, vector: np.ndarray, view: UserView, now_us: int, cold: bool) -> tuple[np.ndarray, np.ndarray]:
        """Candidate rows and their source labels: ANN + fresh (+ popular when cold, + item2item when
        loaded), deduplicated, published by ``now``, not already seen."""
        with self._index_lock.reading():  # publish_items adds to the index (FAISS: no search during an add)
            k = min(self.cfg.ann_candidates, self.index.size)
            _, positions = self.index.search(vector[None], k)
            ann = self.index_rows[positions[0][positions[0] >= 0]]
        found = [ann, self.catalogue.newest(now_us, self.cfg.fresh_candidates),
                 self.catalogue.popular_rows[: self.cfg.cold_start.popular_candidates if cold else 0]]  # fmt: skip
        if self.item2item is not None:
            found.append(self.item2item.candidates(view.history, self.cfg.item2item_candidates))
        rows = np.concatenate(found)
        bits = np.concatenate([np.full(len(part), 1 << i, np.int64) for i, part in enumerate(found)])
        unique, inverse = np.unique(rows, return_inverse=True)
        mask = np.zeros(len(unique), np.int64)
        np.bitwise_or.at(mask, inverse, bits)
        keep = self.catalogue.born_us[unique] <= now_us
        if self.cfg.rerank.remove_seen and len(view.seen):
            keep[sorted_hits(unique, view.seen)] = False
        return unique[keep], _SOURCE_LABELS[mask[keep]]

    def _scores(self, rows: np.ndarray, vectors: np.ndarray, vector: np.ndarray, view: UserView, age_h: np.ndarray) -> np.ndarray:
        """Scores of the candidate ``rows`` (``vectors``: their two-tower item vectors)."""
        if len(rows) == 0:
            return np.zeros(0)
        if self.ranker is None:
            return vectors @ vector / self.temperature
        r = self.ranker
        model = r.bundle.model
        history = r.item_idx[view.history[-model.cfg.max_history_len :]] if len(view.history) else view.history
        user = UserInputs(
            user=torch.tensor(r.users(view.user_id)),
            user_cats=torch.tensor([r.user_cats[c](view.cats[c]) for c in USER_CAT_COLUMNS]),
            history=torch.from_numpy(np.ascontiguousarray(history)),
            counters=torch.from_numpy(user_counters(view.impressions, view.clicks)[: model.n_user_counters]),
            vector=torch.from_numpy(np.array(vector, np.float32)) if r.use_vectors else None,
        )  # fmt: skip
        items = r.items(rows, age_h, vectors)
        if model.cross_counters:  # the user's counts on each candidate's value of those columns
            values = items.item_cats[:, r.cross_columns].numpy()
            items = dataclasses.replace(items, cross_counters=torch.from_numpy(view.cross_counters(values)))
        with torch.inference_mode():
            return model.score_candidates(user, items)["value"].numpy().astype(np.float64)

    def _cold_start_blend(self, scores: np.ndarray, rows: np.ndarray, age_h: np.ndarray) -> np.ndarray:
        """``ColdStartConfig``'s blend of the model score with popularity and freshness."""
        c = self.cfg.cold_start
        if len(scores) == 0:
            return scores
        lo, hi = scores.min(), scores.max()
        model = np.ones_like(scores) if hi == lo else (scores - lo) / (hi - lo)
        fresh = np.exp2(-age_h / c.fresh_half_life_h)
        return c.model_weight * model + c.popular_weight * self.catalogue.popularity[rows] + c.fresh_weight * fresh

    def _rerank(self, rows: np.ndarray, vectors: np.ndarray, scores: np.ndarray, age_h: np.ndarray, sources: np.ndarray,
                k: int) -> list[FeedItem]:  # fmt: skip
        cat = self.catalogue
        candidates = Candidates(cat.item_ids[rows], scores, vectors, cat.publisher_groups[rows], age_h, sources)
        # seen items were dropped before ranking (they would only have cost ranker time)
        result = rerank(candidates, seen=[], cfg=dataclasses.replace(self.cfg.rerank, k=k, remove_seen=False))
        return [FeedItem(str(p.item_id), p.score, p.source, p.reason,
                         None if p.publisher == UNKNOWN_PUBLISHER else str(p.publisher))
                for p in result.picks]  # fmt: skip

    # ---------------------------------------------------------------------------------- events

    def record_events(self, events: Sequence[EventIn]) -> int:
        """Validate, log and apply one POST's events (all or none); returns how many were accepted.

        An event whose ``(user_id, event_id)`` this worker already applied (a retried POST) is
        accepted again without being logged or applied twice. Raises ``EventError`` naming the
        first offending event (by position) or schema rule.
        """
        try:
            table, rows = self._event_table(events)
        except EventError:
            self.metrics.events.labels("rejected").inc(len(events))
            raise
        fresh = self.store.unapplied(table)
        if not fresh.all():
            self.metrics.events.labels("duplicate").inc(int((~fresh).sum()))
            table, rows = table.filter(pa.array(fresh)), rows[fresh]
        if table.num_rows:
            self.sink.write(table)
            self._apply(table, rows)
            self.metrics.events.labels("accepted").inc(table.num_rows)
            if self.bus is not None:
                self.bus.publish(table)
        return len(events)

    def _apply(self, table: pa.Table, rows: np.ndarray) -> int:
        """Events into the user store, and their users' cached vectors out of the cache; returns
        how many were new to the store (the others were applied before: bus, log, retry)."""
        applied = self.store.apply(table, rows)
        for user_id in dict.fromkeys(table["user_id"].filter(pa.array(applied)).to_pylist()):
            self._invalidate(user_id)
        return int(applied.sum())

    def _invalidate(self, user_id: str) -> bool:
        """Drop ``user_id``'s cached vector; remember the user as stale while that fails."""
        if self.cache.invalidate(user_id):
            self._stale.discard(user_id)
            return True
        self._stale.add(user_id)
        return False

    def _apply_peer_events(self, table: pa.Table) -> None:
        """Events another worker accepted and logged, delivered by the bus (``feedrank.serving.bus``)."""
        self.metrics.events.labels("from_peers").inc(self._apply_foreign(table, "another worker"))

    def _apply_from_log(self, table: pa.Table) -> None:
        """Serving-log rows this worker had not applied (``feedrank.serving.follow``)."""
        self.metrics.events.labels("from_log").inc(self._apply_foreign(table, "the serving log"))

    def _catch_up(self) -> int:
        """Apply the serving-log files not applied yet, now; returns the events new to the store."""
        table = self.follower.poll()
        if table is None:
            return 0
        applied = self._apply_foreign(table, "the serving log")
        self.metrics.events.labels("from_log").inc(applied)
        return applied

    def _apply_foreign(self, table: pa.Table, source: str) -> int:
        """Apply events that were validated and logged elsewhere; returns how many were new.

        Events for items this two-tower version does not know (a worker serving another version,
        a log written before a model change) are dropped (logged): an item outside this catalogue
        can be neither history nor a candidate here.
        """
        self._sync_items(self.journal.read_new())  # the events may be about items another worker published
        ids = table["item_id"].to_pylist()
        rows = np.array([self._row_of(i) for i in ids], np.int64)
        known = rows >= 0
        if not known.all():
            log.warning("dropped %d events from %s: items unknown to two-tower %s",
                        int((~known).sum()), source, self.two_tower.version[:12])  # fmt: skip
            table, rows = table.filter(pa.array(known)), rows[known]
        return self._apply(table, rows) if table.num_rows else 0

    def _event_table(self, events: Sequence[EventIn]) -> tuple[pa.Table, np.ndarray]:
        if not events:
            raise EventError("no events: send one event or a non-empty list")
        if len(events) > self.cfg.max_events_per_post:
            raise EventError(f"{len(events)} events in one request; at most {self.cfg.max_events_per_post}")
        rows = np.empty(len(events), np.int64)
        for i, event in enumerate(events):
            row = self._row_of(event.item_id)
            if row < 0 or not self.catalogue.item_ids[row]:
                raise EventError(f"events[{i}].item_id: unknown item {event.item_id!r}: not in the catalogue of "
                                 f"two-tower model {self.two_tower.version[:12]}")  # fmt: skip
            rows[i] = row
        now = self.clock()
        request_id = f"srv-{uuid.uuid4().hex}"
        cats = {c: [] for c in USER_CAT_COLUMNS}
        for event in events:
            view_cats = self.store.view(event.user_id, now).cats
            for c in USER_CAT_COLUMNS:
                cats[c].append(view_cats[c])
        ts = [now if e.ts is None else (e.ts.replace(tzinfo=dt.timezone.utc) if e.ts.tzinfo is None else e.ts) for e in events]
        cat = self.catalogue
        table = pa.table({
            "user_id": [e.user_id for e in events],
            "item_id": [e.item_id for e in events],
            "ts": pa.array(ts, TS_TYPE),
            "request_id": [e.request_id or request_id for e in events],
            "position": pa.array([e.position for e in events], pa.int32()),
            "clicked": [e.clicked for e in events],
            "dwell_s": pa.array([e.dwell_s for e in events], pa.float32()),
            "shared": [e.shared for e in events],
            "hidden": [e.hidden for e in events],
            "publisher": pa.array(cat.publishers[rows], pa.string()),
            "item_type": pa.array(cat.item_types[rows], pa.string()),
            "category": pa.array(cat.categories[rows], pa.string()),
            "created_ts": cat.created_ts.take(pa.array(rows)),
            **{c: pa.array(v, pa.string()) for c, v in cats.items()},
        })  # fmt: skip
        table = conform(table)
        report = validate(table)
        if not report.ok:
            raise EventError("; ".join(str(v) for v in report.violations))
        event_ids = pa.array([e.event_id or uuid.uuid4().hex for e in events], pa.string())
        return table.cast(EVENT_SCHEMA).append_column(SERVING_LOG_SCHEMA.field(EVENT_ID), event_ids), rows

    # ---------------------------------------------------------------------------------- items

    def _row_of(self, item_id: str) -> int:
        """The catalogue row of ``item_id``: its two-tower index, else its published row; -1 if neither."""
        row = self.items.index_of(item_id)
        return row if row >= 0 else self._published.get(item_id, -1)

    def publish_items(self, items: Sequence[ItemIn]) -> dict[str, int]:
        """Persist, embed and index new items (``POST /items``, ``feedrank.serving.items``); items
        already in the catalogue are acknowledged as ``known``, not published twice."""
        if not items:
            raise EventError("no items: send one item or a non-empty list")
        with self._publish_lock:
            new = list({i.item_id: i for i in items if self._row_of(i.item_id) < 0}.values())
            if new:
                table = items_table(new, self.clock())
                self.journal.write(table)  # on disk before it is served: a restart keeps it
                self._add_items(table)
        return {"published": len(new), "known": len(items) - len(new)}

    def _sync_items(self, table: pa.Table) -> None:
        """Journal rows written by another worker (or before a restart) into this process, skipping
        ids it knows already."""
        with self._publish_lock:
            ids = table["item_id"].to_pylist()
            first = {i: k for k, i in reversed(list(enumerate(ids)))}
            keep = [k for i, k in first.items() if self._row_of(i) < 0]
            if keep:
                self._add_items(table.take(pa.array(sorted(keep), pa.int64())))

    def _add_items(self, table: pa.Table) -> None:
        """Published items (``JOURNAL_SCHEMA`` rows) into the catalogue, the ranker's inputs, the
        index and the fresh pool. The order keeps concurrent feeds consistent: rows exist before
        the index can return them."""
        if table.num_rows == 0:
            return
        born_us = table["created_ts"].cast(pa.int64()).to_numpy()
        age_h = np.maximum(table["published_ts"].cast(pa.int64()).to_numpy() - born_us, 0) / _US_PER_HOUR
        vectors = item_vectors(self.two_tower, item_inputs(self.two_tower, table), age_h)
        first = len(self.catalogue.item_ids)
        self.catalogue = self.catalogue.extended(table, born_us, vectors)
        if self.ranker is not None:
            self.ranker = self.ranker.extended(table)
        rows = np.arange(first, first + table.num_rows)
        with self._index_lock.writing():
            self.index_rows = np.concatenate([self.index_rows, rows])
            self.index.add(vectors, table["item_id"].to_numpy(zero_copy_only=False))
        self._published.update(zip(table["item_id"].to_pylist(), rows.tolist()))

    # ---------------------------------------------------------------------------------- admin

    def health(self) -> dict[str, Any]:
        """What ``GET /healthz`` reports: models, index, cache backend, store and log."""
        stats = self.cache.stats()
        breaker = getattr(self.cache, "breaker", None)
        return {
            "status": "ok",
            "models": self.model_versions,
            "ranker_quantize": self.cfg.quantize,
            "index": {"kind": self.index.cfg.kind, "size": self.index.size, "model_version": self.index.model_version,
                      "origin": self.index_origin},  # fmt: skip
            "cache": {
                "backend": "redis" if isinstance(self.cache, RedisCache) else "memory",
                "status": "degraded" if breaker is not None and breaker.is_open else "ok",
                **dataclasses.asdict(stats),
            },
            "users": len(self.store),
            "store": self.store.stats(),
            "catch_up": {"replayed_at_start": self.replayed, "files_read": self.follower.files_read,
                         "rows_read": self.follower.rows_read, "unreadable": self.follower.unreadable,
                         "last_poll_age_s": None if self.follower.last_poll is None else time.time() - self.follower.last_poll},  # fmt: skip
            "event_bus": None if self.bus is None else {
                "subscribed": self.bus.subscribed, "published": self.bus.published,
                "publish_errors": self.bus.publish_errors, "received": self.bus.received, "dropped": self.bus.dropped,
            },
            "pid": os.getpid(),  # which worker answered (each uvicorn worker is one process)
            "event_log": {"dir": str(self.sink.root), "rows_written": self.sink.rows_written, "durable": self.cfg.event_log.durable},
            "clock": self.clock().isoformat(),
        }

    def close(self) -> None:
        """Stop the event bus and the catch-up, flush the serving log and release the cache (at shutdown)."""
        if self.bus is not None:
            self.bus.close()
        self.follower.close()
        self.journal.close()
        self.sink.close()
        self.cache.close()


def _labels() -> np.ndarray:
    """Source label of every source bit mask: "ann", "fresh", "ann+fresh", ..."""
    return np.array(["+".join(s for i, s in enumerate(SOURCES) if mask >> i & 1) for mask in range(1 << len(SOURCES))], dtype=object)


_SOURCE_LABELS = _labels()

