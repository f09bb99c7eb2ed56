"""Point-in-time counters, freshness and the logQ sampling correction: pure numpy functions.

All inputs are per-row arrays of the example table: ``user_code``/``item_code`` are dense codes of
the raw ids (not vocabulary indices), ``rank`` the dense time rank from ``history.dense_rank``.
Counts only ever include rows strictly before the row's own timestamp (see ``history``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from feedrank.features.history import EventIndex

#: Counter columns, in the order ``Batch.counters`` stacks them.
COUNTER_COLUMNS = ("user_impressions", "user_clicks", "item_impressions", "item_clicks", "item_ctr")

_US_PER_HOUR = 3_600_000_000


class PointInTimeCounters:
    """User and item impression/click counters carried across time-ordered chunks of the log.

    A chunk's rows see the counts of every earlier chunk (held here, O(users + items)) plus those
    of their own chunk strictly before their timestamp. Chunks must come in time order and never
    split a timestamp (``feedrank.features.chunks``), so "earlier chunk" implies "strictly before".
    """

    def __init__(self, prior_ctr: float, prior_weight: float):
        self.prior_ctr, self.prior_weight = prior_ctr, prior_weight
        self._seen = {f"{who}_{what}": np.zeros(0, np.int64) for who in ("user", "item") for what in ("impressions", "clicks")}

    def chunk(self, user_code: np.ndarray, item_code: np.ndarray, rank: np.ndarray, n_ranks: int,
              clicked: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
        """The ``COUNTER_COLUMNS`` of one chunk's rows (``rank``: dense time ranks within the chunk);
        then the chunk's rows are added to the carried counts."""
        clicked = np.asarray(clicked, dtype=bool)
        counts = {}
        for who, code in (("user", user_code), ("item", item_code)):
            for what, rows in (("impressions", slice(None)), ("clicks", clicked)):
                name = f"{who}_{what}"
                before = EventIndex(code[rows], rank[rows], n_ranks).count_before(code, rank)
                seen = self._seen[name]
                size = max(len(seen), int(code.max()) + 1 if len(code) else 0)
                grown = np.zeros(size, np.int64)
                grown[: len(seen)] = seen
                counts[name] = before + grown[code]
                self._seen[name] = grown + np.bincount(code[rows], minlength=size)
        out = {name: scale_counts(c) for name, c in counts.items()}
        out["item_ctr"] = shrunk_ctr(counts["item_clicks"], counts["item_impressions"], self.prior_ctr, self.prior_weight)
        return {name: out[name] for name in COUNTER_COLUMNS}


def point_in_time_counters(
    user_code: np.ndarray,
    item_code: np.ndarray,
    rank: np.ndarray,
    n_ranks: int,
    clicked: np.ndarray,
    prior_ctr: float,
    prior_weight: float,
) -> dict[str, np.ndarray]:
    """User and item impression/click counts before each row, log1p-scaled, and the item CTR: the
    rows as one chunk of ``PointInTimeCounters``.

    The CTR is shrunk towards a fixed ``prior_ctr`` with the weight of ``prior_weight`` pseudo
    impressions: ``(clicks + w * p) / (impressions + w)``. The prior is a constant from the config,
    not the log's overall CTR, because the overall CTR includes rows after most impressions and
    would leak the future into early examples. The CTR is already in [0, 1] and is not log-scaled.
    """
    return PointInTimeCounters(prior_ctr, prior_weight).chunk(user_code, item_code, rank, n_ranks, clicked)


def scale_counts(counts: np.ndarray) -> np.ndarray:
    """float32 ``log1p`` of impression/click counts: the scale every count counter is fed to models at.

    Computed in float64 and rounded once, so training (``point_in_time_counters``), evaluation and
    serving (``user_counters``, the serving item counters) give bit-identical inputs for a count.
    """
    return np.log1p(np.asarray(counts, dtype=np.float64)).astype(np.float32)


def shrunk_ctr(clicks: np.ndarray, impressions: np.ndarray, prior_ctr: float, prior_weight: float) -> np.ndarray:
    """float32 CTR shrunk towards ``prior_ctr`` by ``prior_weight`` pseudo-impressions:
    ``(clicks + w * p) / (impressions + w)``, from raw (not log-scaled) counts.

    Already in [0, 1], so it is not log-scaled; an item never shown gets ``prior_ctr`` (when w > 0).
    """
    clicks = np.asarray(clicks, dtype=np.float64)
    impressions = np.asarray(impressions, dtype=np.float64)
    return ((clicks + prior_weight * prior_ctr) / (impressions + prior_weight)).astype(np.float32)


def user_counters(impressions: np.ndarray | int, clicks: np.ndarray | int) -> np.ndarray:
    """The user counters (``user_impressions, user_clicks``, the leading ``COUNTER_COLUMNS``) of
    raw counts, scaled as training scales them: ``[..., 2]`` float32 (``[2]`` for one user)."""
    return scale_counts(np.stack([impressions, clicks], axis=-1))


def item_age_hours(ts_us: np.ndarray, created_us: np.ndarray, created_valid: np.ndarray, item_code: np.ndarray,
                   first_seen: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Hours since the item was created, at each impression; never negative.

    When ``created_ts`` is null the item's first impression among the given rows stands in for its
    creation: it is always at or before the row's own timestamp, so it leaks nothing, but on a log
    that starts after the item was published it understates the age. Impressions logged before
    the stated creation time (clock skew) get age 0. ``first_seen`` (int64 per item code, int64 max
    for unseen; updated in place) carries first impressions across time-ordered chunks: an item's
    first impression is at or before any of its rows, so it is known by the row's own chunk.
    """
    n_codes = int(item_code.max()) + 1 if len(item_code) else 0
    if first_seen is None:
        first_seen = np.full(n_codes, np.iinfo(np.int64).max, dtype=np.int64)
    if len(first_seen) < n_codes:
        raise ValueError(f"item_age_hours: first_seen holds {len(first_seen)} items, codes go up to {n_codes - 1}")
    np.minimum.at(first_seen, item_code, ts_us)
    born = np.where(created_valid, created_us, first_seen[item_code])
    return (np.maximum(ts_us - born, 0) / _US_PER_HOUR).astype(np.float32)


def item_logq(engagements: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """log q per item code: the item's add-one-smoothed share of engagements in the window.

    ``q = (e_item + 1) / (E + V)`` with ``e_item`` the item's engagements among rows in the window
    (``engagements``, per item code), ``E`` all engagements there and ``V`` the distinct items
    shown there (``shown``, per item code); an item never shown in the window gets ``1 / (E + V)``.
    Smoothing keeps the log finite for items without engagements. This is a training-window
    constant for the sampled-softmax correction, not a feature: it is not point-in-time and must
    not be fed to a model as an input. Rows take ``item_logq(...)[item_code]``.
    """
    engagements = np.asarray(engagements, dtype=np.int64)
    denom = engagements.sum() + np.asarray(shown, dtype=bool).sum()
    if denom == 0:
        raise ValueError("item_logq: the window has no rows")
    return np.log((engagements + 1) / denom).astype(np.float32)


def cross_counter_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """Example columns of the user x item-categorical counters of ``columns`` (item categorical log
    columns, e.g. ``("category",)``): ``user_<column>_impressions``, ``user_<column>_clicks`` per
    column, in that order, which is the order ``Batch.cross_counters`` stacks them."""
    return tuple(f"user_{col}_{what}" for col in columns for what in ("impressions", "clicks"))


class CrossCounters:
    """User x item-categorical counters: the user's impressions and clicks on items of the row's
    category (publisher, ...) strictly before the row, over the whole log, carried across chunks.

    Why: a history is the last few clicks (median 4 on the demo world), while these count every
    impression, so a per-category click rate also learns from what the user was shown and skipped;
    a new item has a category from its first impression. Values are keyed by their vocabulary index
    (the index serving knows for a candidate; OOV values share one count), users by their dense
    code. State: one dense ``[users, values]`` int32 table of impressions and one of clicks per
    column, allocated once (every user code is known from the counting pass): 8 bytes per user and
    value, e.g. 10M users x 20 categories = 1.6 GB, so a column of thousands of values wants hashing
    (``features.categorical.hash_buckets`` / ``max_size``) first. The same chunk rules
    as ``PointInTimeCounters`` make the output independent of the chunk size.
    """

    def __init__(self, columns: Sequence[str], n_users: int, sizes: Sequence[int]):
        if len(columns) != len(sizes):
            raise ValueError(f"CrossCounters: {len(columns)} column(s) but {len(sizes)} vocabulary size(s)")
        self.columns = tuple(columns)
        self._seen = [np.zeros((2, n_users, size), np.int32) for size in sizes]  # 8 bytes a (user, value)

    def chunk(self, user_code: np.ndarray, values: Sequence[np.ndarray], rank: np.ndarray, n_ranks: int,
              clicked: np.ndarray) -> dict[str, np.ndarray]:  # fmt: skip
        """The ``cross_counter_columns`` of one chunk's rows, log1p-scaled; ``values[j]`` holds the
        vocabulary index of column ``j`` per row. Then the chunk's rows are added to the carried counts."""
        clicked = np.asarray(clicked, dtype=bool)
        out = {}
        for col, value, seen in zip(self.columns, values, self._seen):
            if len(value) and (value.min() < 0 or value.max() >= seen.shape[2]):
                raise ValueError(f"CrossCounters: {col} indices outside [0, {seen.shape[2]})")
            # a dense code per (user, value) pair of the chunk, for the within-chunk counts
            _, code = np.unique(user_code * seen.shape[2] + value, return_inverse=True)
            for slot, (what, rows) in enumerate((("impressions", slice(None)), ("clicks", clicked))):
                before = EventIndex(code[rows], rank[rows], n_ranks).count_before(code, rank)
                out[f"user_{col}_{what}"] = scale_counts(before + seen[slot, user_code, value])
                np.add.at(seen[slot], (user_code[rows], value[rows]), 1)
        return {name: out[name] for name in cross_counter_columns(self.columns)}

