"""Evaluation metrics: the one implementation used by training, evaluation and the labs.

Every function is pure, takes labels first, accepts numpy arrays, lists or torch tensors (moved to
CPU and converted), and returns a Python ``float`` (or a small frozen dataclass). Everything is
vectorised: per-group metrics sort once by (group, score) and reduce with ``np.bincount``, so a
10M-row evaluation with 1M requests costs a few sorts, not a million Python iterations.

Metrics that are a mean over groups (GAUC, MRR, NDCG/precision/recall/hit@k, and log loss as a
mean over rows) also come as ``<name>_values``: a ``GroupValues`` of per-group values and weights.
The scalar metric is its ``mean()``; the bootstrap re-weights the same values by how often each
group was drawn (``weighted_means``) instead of re-sorting rows for every replicate.

Conventions (each one is a choice; they are tested):

- **Undefined values.** A metric over one set that is undefined raises ``ValueError`` (``auc`` on
  one class, ``normalized_entropy`` with a base rate of 0 or 1), like scikit-learn. A metric that
  averages over groups skips the groups where it is undefined and returns ``nan`` when no group
  qualifies, because in a training loop an evaluation batch without clicks is normal, not a bug.
- **Groups.** ``groups`` is any 1-D array of request (or user) ids, in any order: rows of one group
  need not be contiguous. ``groups=None`` means the whole input is one list.
- **AUC ties** count one half (average ranks), exactly as ``sklearn.metrics.roc_auc_score``.
- **GAUC** is the impression-weighted mean of per-group AUC (the MIND / industry convention):
  a group of 20 impressions weighs 20. Groups whose labels are all positive or all negative are
  skipped because AUC is undefined there. (RecBole weights by positives instead; pass-through
  comparisons must account for that.)
- **Ties, one rule for every metric: the expected value over a uniformly random order of equal
  scores.** AUC counts a tied (positive, negative) pair one half, which is that expectation; the
  ranking metrics (MRR, NDCG, precision/recall/hit@k, here and in ``topk_metrics``) are computed
  exactly under it, not by sampling: a row whose score ties with ``t`` rows of its list (itself
  included) below ``a`` strictly better ones has a rank uniform on ``a+1 .. a+t``, so its share
  of a sum over ranks ``f(rank)`` is ``(F(a+t) - F(a)) / t`` with ``F`` the cumulative sum of
  ``f`` (MRR, NDCG, precision, recall are such sums); hit@k and the first-hit MRR@k of
  ``topk_metrics`` are hypergeometric over the first tie block holding a positive. A model that
  outputs a constant therefore scores exactly what a random ranking scores on average (which is
  what the ``random`` baselines are), neither the worst nor a lucky order, and no result depends
  on the order of the input rows.
- **Ranking averages** are taken over groups with at least one positive (label > 0); groups
  without positives contribute nothing because recall, MRR and NDCG are undefined there.
- **MRR** follows MIND: per group, the mean over its positives of 1/rank; then the mean over groups.
- **NDCG** uses exponential gains ``2**label - 1`` (MIND, LambdaMART) and discounts
  ``1 / log2(rank + 1)``; for binary labels this equals linear gains and ``sklearn.metrics.ndcg_score``.
  Labels may be any non-negative grades; the other ranking metrics require binary labels.
- **k larger than a list** uses the whole list. ``precision_at_k`` still divides by ``k`` (the IR
  and RecBole convention: an engine that returns 3 items for a 10-slot feed filled only 3 of 10),
  ``recall_at_k`` divides by the group's number of positives.
- **Calibration bins** follow ``sklearn.calibration.calibration_curve``: edges ``linspace(0, 1)``
  ("uniform") or quantiles of ``probs`` ("quantile"); a value equal to an inner edge falls in the
  lower bin.

Example::

    >>> from feedrank.evaluate.metrics import auc, group_auc, ndcg_at_k
    >>> auc([0, 1, 1, 0], [0.1, 0.9, 0.4, 0.3])
    1.0
    >>> group_auc([1, 0, 0, 1], [0.9, 0.1, 0.8, 0.2], groups=[7, 7, 8, 8])
    0.5
    >>> round(ndcg_at_k([0, 1], [0.9, 0.1], k=2), 4)
    0.6309
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

#: The tie rule in one line, for reports and metrics.json (details: this module's docstring).
TIE_RULE = ("ties: expected value over a uniformly random order of equal scores (AUC counts a tie 1/2; "
            "MRR, NDCG, precision/recall/hit@k computed exactly under that expectation)")
ArrayLike = Any  # numpy array, torch tensor or sequence of numbers
#: Relevant (or excluded) items per user for ``topk_metrics``: a boolean [n_users, n_items]
#: matrix, a tuple of CSR arrays ``(indptr, indices)``, a ``scipy.sparse`` matrix, or a list with
#: one iterable of item ids per user (a tuple always means CSR, so the two cannot be confused).
ItemSets = Any


# --------------------------------------------------------------------------------------------
# Input handling: one place that turns user input into validated numpy arrays.
# --------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array ({exc})") from exc


def _vector(x: ArrayLike, name: str) -> np.ndarray:
    """A non-empty 1-D array."""
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _first_bad(mask: np.ndarray) -> str:
    bad = np.flatnonzero(mask.ravel())
    return f"{bad.size} value(s), first at flat index {bad[0]}"


def _numeric(x: ArrayLike, name: str) -> np.ndarray:
    """A non-empty 1-D numeric array without NaN (±inf is allowed: it is a valid ordering)."""
    arr = _vector(x, name)
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        nan = np.isnan(arr)
        if nan.any():
            raise ValueError(f"{name} contains NaN: {_first_bad(nan)}")
        return arr
    return arr.astype(np.float64)


def _binary(x: ArrayLike, name: str = "labels") -> np.ndarray:
    """Labels that must be 0/1, as float64 (so they can be bincount weights)."""
    arr = _numeric(x, name)
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise ValueError(f"{name} must be binary (0/1): {_first_bad(bad)} outside {{0, 1}}")
    return arr.astype(np.float64, copy=False)


def _gains(x: ArrayLike, name: str = "labels") -> np.ndarray:
    """Graded relevance labels: finite and non-negative."""
    arr = _numeric(x, name).astype(np.float64, copy=False)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and >= 0: {_first_bad(bad)} are not")
    return arr


def _probabilities(x: ArrayLike, name: str = "probs") -> np.ndarray:
    arr = _numeric(x, name).astype(np.float64, copy=False)
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        raise ValueError(f"{name} must lie in [0, 1]: {_first_bad(bad)} outside")
    return arr


def _groups(x: ArrayLike | None, n: int) -> np.ndarray | None:
    if x is None:
        return None
    arr = _vector(x, "groups")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"groups contains NaN: {_first_bad(np.isnan(arr))}")
    _same_length(n, groups=arr)
    return arr


def _same_length(n: int, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        if arr.shape[0] != n:
            raise ValueError(f"length mismatch: labels has {n} rows but {name} has {arr.shape[0]}")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _choice(value: str, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Sorting rows within groups.
# --------------------------------------------------------------------------------------------


def _sort_codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Order-preserving int64 codes for ``x`` and their number of possible values.

    Small-range integer values (labels, dense request ids) are their own codes, shifted to start
    at 0, which costs no sort; anything else gets its dense rank among the distinct values.
    """
    if x.dtype.kind in "biuf":
        with np.errstate(invalid="ignore"):  # ±inf does not cast to int; it then fails the check
            as_int = x.astype(np.int64)
        if np.array_equal(as_int, x):
            low, high = int(as_int.min()), int(as_int.max())
            if high - low < x.shape[0]:
                return as_int - low, high - low + 1
    order = np.argsort(x)
    xs = x[order]
    codes_sorted = np.concatenate(([0], np.cumsum(xs[1:] != xs[:-1])))
    codes = np.empty(x.shape[0], dtype=np.int64)
    codes[order] = codes_sorted
    return codes, int(codes_sorted[-1]) + 1


def _lexsort(keys: Sequence[np.ndarray]) -> np.ndarray:
    """Order rows by ``keys`` (last key primary, as ``np.lexsort``); rows equal on every key may
    come in any order.

    Why not ``np.lexsort``: it runs one stable merge sort per key, while numpy's default argsort
    is SIMD-vectorised. Folding the keys' codes into one int64 and sorting that once is about 3x
    faster on 10M rows (benchmarks/metrics_speed.py). Falls back to ``np.lexsort`` if the codes
    cannot fit in an int64.
    """
    if len(keys) == 1:
        return np.argsort(keys[0])
    combined = np.zeros(keys[0].shape[0], dtype=np.int64)
    capacity = 1
    for key in reversed(keys):  # primary key first, so it ends up in the high "digits"
        codes, n_values = _sort_codes(key)
        capacity *= n_values  # Python int: cannot overflow
        if capacity >= 2**62:
            return np.lexsort(keys)
        combined = combined * n_values + codes
    return np.argsort(combined)


@dataclass(frozen=True)
class _Ranked:
    """Rows reordered by (group, score descending), each with its tie block.

    ``above`` counts the rows of the group that score strictly higher and ``tied`` the rows that
    score the same, the row itself included. Under a uniformly random order of equal scores the
    row's rank is uniform on ``above + 1 .. above + tied``: ``expected`` turns that into the exact
    expectation of any per-rank quantity, which is how every ranking metric treats ties.
    """

    labels: np.ndarray  # [n] float64 labels in ranked order (ties in any order)
    group: np.ndarray  # [n] int64 group index 0..n_groups-1 of each ranked row
    above: np.ndarray  # [n] int64 rows of the group scoring strictly higher
    tied: np.ndarray  # [n] int64 rows of the group with this score (>= 1)
    block: np.ndarray  # [n] int64 tie block index of each ranked row (blocks in ranked order)
    ids: np.ndarray  # [n_groups] the group id of each group index (ascending)

    def per_group(self, weights: np.ndarray) -> np.ndarray:
        return np.bincount(self.group, weights=weights, minlength=self.ids.shape[0])

    def expected(self, cumulative: np.ndarray) -> np.ndarray:
        """Per row, E[f(rank)] over random tie orders, from ``cumulative = _cumulative(f)``."""
        return _expected(self.above, self.tied, cumulative)

    def first_positive_block(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(group index, above, tied, positives) of each group's best tie block holding a positive."""
        positives = np.bincount(self.block, weights=self.labels > 0)
        starts = np.flatnonzero(np.diff(self.block, prepend=-1))  # first ranked row of each block
        with_positive = starts[positives > 0]  # in ranked order, so a group's best block comes first
        groups, first = np.unique(self.group[with_positive], return_index=True)
        rows = with_positive[first]
        return groups, self.above[rows], self.tied[rows], positives[self.block[rows]]


def _cumulative(f: np.ndarray) -> np.ndarray:
    """``F[n] = f[0] + ... + f[n-1]`` (``F[0] = 0``) for a per-rank quantity ``f[r - 1]`` of ranks
    ``1 .. len(f)``; ranks beyond ``len(f)`` count 0 (a cut at k)."""
    return np.concatenate(([0.0], np.cumsum(f, dtype=np.float64)))


def _expected(above: np.ndarray, tied: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """E[f(rank)] for a rank uniform on ``above + 1 .. above + tied``: ``(F(a + t) - F(a)) / t``."""
    last = cumulative.shape[0] - 1
    return (cumulative[np.minimum(above + tied, last)] - cumulative[np.minimum(above, last)]) / tied


def _first_hit(above: np.ndarray, tied: np.ndarray, positives: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For a block of ``tied`` items ranked after ``above`` others, ``positives`` of them relevant,
    in uniformly random order: P(the first relevant item has rank <= k) and E[1/that rank, 0 if > k].

    ``none[j]`` = P(none of the first j slots of the block is relevant) =
    prod_{i<j} (t - p - i) / (t - i); the first relevant slot is j with probability none[j-1] - none[j].
    """
    t, p = tied.astype(np.float64), positives.astype(np.float64)
    reach = np.clip(k - above, 0, tied)  # slots of the block inside the top k
    none_before = np.ones(t.shape[0])
    reciprocal = np.zeros(t.shape[0])
    for j in range(1, int(reach.max(initial=0)) + 1):
        inside = j <= reach
        none = none_before * np.clip((t - p - (j - 1)) / np.maximum(t - (j - 1), 1.0), 0.0, 1.0)
        reciprocal += np.where(inside, (none_before - none) / (above + j), 0.0)
        none_before = np.where(inside, none, none_before)
    return 1.0 - none_before, reciprocal


def _group_index(sorted_groups: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group index of each row of a group-sorted array, and the start row of each group."""
    if sorted_groups is None:
        return np.zeros(n, dtype=np.int64), np.zeros(1, dtype=np.int64)
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_groups[1:], sorted_groups[:-1], out=new_group[1:])
    return np.cumsum(new_group) - 1, np.flatnonzero(new_group)


def _group_ids(sorted_groups: np.ndarray | None, starts: np.ndarray) -> np.ndarray:
    """The id of each group of a group-sorted array; ``groups=None`` is one list with id 0."""
    return np.zeros(1, dtype=np.int64) if sorted_groups is None else sorted_groups[starts]


def _tie_blocks(sorted_scores: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tie blocks of a group-then-score-sorted array: a block is a run of equal scores inside one
    group. Returns each row's block index and each block's first row."""
    n = sorted_scores.shape[0]
    new_block = np.empty(n, dtype=bool)
    new_block[0] = True
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new_block[1:])
    new_block[starts] = True
    return np.cumsum(new_block) - 1, np.flatnonzero(new_block)


def _rank(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None) -> _Ranked:
    """Rank rows within their group by score, descending, and find each row's tie block."""
    order = _lexsort([-scores] if groups is None else [-scores, groups])
    sorted_groups = None if groups is None else groups[order]
    n = order.shape[0]
    group, starts = _group_index(sorted_groups, n)
    block, block_start = _tie_blocks(scores[order], starts)
    block_size = np.diff(np.append(block_start, n))
    return _Ranked(labels=labels[order], group=group, above=block_start[block] - starts[group],
                   tied=block_size[block], block=block, ids=_group_ids(sorted_groups, starts))  # fmt: skip


def _ranking_inputs(
    labels: ArrayLike, scores: ArrayLike, groups: ArrayLike | None, graded: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    y = _gains(labels) if graded else _binary(labels)
    s = _numeric(scores, "scores")
    _same_length(y.shape[0], scores=s)
    return y, s, _groups(groups, y.shape[0])


# --------------------------------------------------------------------------------------------
# Per-group values: every metric that is a mean over groups is the mean of a GroupValues.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupValues:
    """A metric that is a weighted mean over groups, stopped before the mean: one value per group.

    Why it exists: a group's value depends on that group's rows only, so a bootstrap that draws
    groups with replacement does not need to re-sort any rows; it re-weights these values by how
    often each group was drawn (``weighted_means``). Every grouped metric in this module is
    ``<metric>_values(...).mean()``, so the full-sample metric and its replicates share one
    computation and cannot drift apart.

    The arrays line up with ``group_ids`` (ascending; ``[0]`` when ``groups`` was None). Undefined
    groups (GAUC: one class only; ranking metrics: no positive) keep their slot with
    ``defined == False`` and a nan value, and weigh nothing.
    """

    group_ids: np.ndarray  # [G] distinct group ids, ascending
    values: np.ndarray  # [G] float64 value of each group; nan where undefined
    weights: np.ndarray  # [G] float64 weight of the group in the mean: 1, or its rows (impressions)
    defined: np.ndarray  # [G] bool: the groups the mean includes

    def terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight * value, weight) per group, both 0 where undefined: any mean is a ratio of their
        (count-weighted) sums."""
        weights = np.where(self.defined, self.weights, 0.0)
        return np.where(self.defined, self.values, 0.0) * weights, weights

    def mean(self) -> float:
        """The metric on the full input (every group counted once); nan if no group is defined."""
        return float(weighted_means([self], np.ones((1, self.group_ids.shape[0])))[0, 0])


def weighted_means(parts: Sequence[GroupValues], counts: ArrayLike) -> np.ndarray:
    """[R, len(parts)]: each part's mean when group ``j`` counts ``counts[r, j]`` times.

    ``counts`` is [R, G] over the parts' shared groups (e.g. how often a bootstrap replicate drew
    each group); a row of ones gives the full-sample metric. Each mean is
    ``sum_j c_j w_j v_j / sum_j c_j w_j`` over the defined groups, nan where that weight is 0. All
    R rows and all parts cost one matrix product; identical term columns (the same model given
    twice, or the denominators that models share) are computed once, which also makes a paired
    delta between identical models exactly 0 whatever the BLAS kernel does.
    """
    if not parts:
        raise ValueError("parts is empty: give at least one GroupValues")
    ids = parts[0].group_ids
    if any(not np.array_equal(p.group_ids, ids) for p in parts[1:]):
        raise ValueError("all parts must have the same group_ids (compute them on the same groups)")
    counts = _to_numpy(counts, "counts").astype(np.float64, copy=False)
    if counts.ndim != 2 or counts.shape[1] != ids.shape[0]:
        raise ValueError(f"counts must have shape [n_resamples, n_groups={ids.shape[0]}], got {counts.shape}")
    if np.isnan(counts).any() or (counts < 0).any():
        raise ValueError("counts must be non-negative numbers (how often each group counts)")
    columns: dict[bytes, int] = {}  # term bytes -> column of ``unique``
    unique: list[np.ndarray] = []
    where = []
    for term in (t for p in parts for t in p.terms()):
        key = term.tobytes()
        if key not in columns:
            columns[key] = len(unique)
            unique.append(term)
        where.append(columns[key])
    sums = (counts @ np.stack(unique, axis=1))[:, where]  # [R, 2 * n_parts]: num, den, num, den...
    numerators, denominators = sums[:, 0::2], sums[:, 1::2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominators > 0, numerators / denominators, np.nan)


def _averaged(ids: np.ndarray, values: np.ndarray, defined: np.ndarray) -> GroupValues:
    """Per-group values of a metric that weighs every defined group equally."""
    return GroupValues(ids, np.where(defined, values, np.nan), np.ones(ids.shape[0]), defined)


def _row_groups(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct group ids (ascending) and each row's index into them."""
    if groups is None:
        return np.zeros(1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ids, index = np.unique(groups, return_inverse=True)
    return ids, index.ravel()


# --------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------


def _auc_per_group(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group (Mann-Whitney) AUC with average ranks for ties; also group sizes and ids.

    AUC = (sum of the positives' ascending ranks - P(P+1)/2) / (P * N). Groups with P = 0 or
    N = 0 get nan.
    """
    n = labels.shape[0]
    order = _lexsort([scores] if groups is None else [scores, groups])
    sorted_groups = None if groups is None else groups[order]
    group, starts = _group_index(sorted_groups, n)
    block, block_start = _tie_blocks(scores[order], starts)  # every row in a block: its average position
    block_end = np.append(block_start[1:], n) - 1
    avg_rank = (block_start + block_end)[block] / 2.0 - starts[group] + 1.0

    y = labels[order]
    n_groups = starts.shape[0]
    positives = np.bincount(group, weights=y, minlength=n_groups)
    sizes = np.bincount(group, minlength=n_groups).astype(np.float64)
    negatives = sizes - positives
    rank_sum = np.bincount(group, weights=y * avg_rank, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    aucs[(positives == 0) | (negatives == 0)] = np.nan
    return aucs, sizes, _group_ids(sorted_groups, starts)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC; ties count one half. Equals ``sklearn.metrics.roc_auc_score``.

    Raises ``ValueError`` when ``labels`` hold a single class (AUC is undefined).
    """
    y = _binary(labels)
    s = _numeric(scores, "scores")
    _same_length(y.shape[0], scores=s)
    value = _auc_per_group(y, s, None)[0][0]
    if np.isnan(value):
        raise ValueError("auc is undefined: labels contain only one class")
    return float(value)


def group_auc_values(
    labels: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike,
    weighting: Literal["impressions", "uniform"] = "impressions",
) -> GroupValues:
    """Per-group AUC, weighted by group size ("impressions") or 1 ("uniform"); groups with one
    class only are undefined."""
    _choice(weighting, "weighting", ("impressions", "uniform"))
    if groups is None:
        raise ValueError("groups is required for group_auc (use auc for a single list)")
    y, s, g = _ranking_inputs(labels, scores, groups)
    aucs, sizes, ids = _auc_per_group(y, s, g)
    weights = sizes if weighting == "impressions" else np.ones(ids.shape[0])
    return GroupValues(ids, aucs, weights, ~np.isnan(aucs))


def group_auc(
    labels: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike,
    weighting: Literal["impressions", "uniform"] = "impressions",
) -> float:
    """Mean of per-group AUC, weighted by group size ("impressions") or equally ("uniform").

    Groups that are all-positive or all-negative are skipped (AUC is undefined there); returns
    nan when no group has both classes.
    """
    return group_auc_values(labels, scores, groups, weighting).mean()


# --------------------------------------------------------------------------------------------
# Ranking metrics over groups (requests)
# --------------------------------------------------------------------------------------------


def mrr_values(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike | None = None) -> GroupValues:
    """Per group: the mean of 1/rank over its positives; undefined without a positive."""
    ranked = _rank(*_ranking_inputs(labels, scores, groups))
    positives = ranked.per_group(ranked.labels)
    harmonic = _cumulative(1.0 / np.arange(1, int((ranked.above + ranked.tied).max()) + 1))
    reciprocal = ranked.per_group(ranked.labels * ranked.expected(harmonic))
    with np.errstate(invalid="ignore"):
        return _averaged(ranked.ids, reciprocal / positives, positives > 0)


def mrr(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike | None = None) -> float:
    """Mean reciprocal rank (MIND): per group the mean of 1/rank over its positives, then the
    mean over groups with a positive."""
    return mrr_values(labels, scores, groups).mean()


def _discount(rank: np.ndarray) -> np.ndarray:
    return 1.0 / np.log2(rank + 1.0)


def ndcg_values(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> GroupValues:
    """Per-group NDCG@k (see ``ndcg_at_k``); undefined where the ideal DCG is 0 (no positive)."""
    k = _positive_int(k, "k")
    y, s, g = _ranking_inputs(labels, scores, groups, graded=True)
    ranked = _rank(y, s, g)
    discounts = _cumulative(_discount(np.arange(1, k + 1, dtype=np.float64)))
    dcg = ranked.per_group((np.exp2(ranked.labels) - 1.0) * ranked.expected(discounts))
    # Ideal ranking: the same rows ordered by label descending within the group. Ranking by the
    # labels themselves (scores := labels) gives exactly that order (and the same group order);
    # rows tied there have equal gains, so averaging over their orders changes nothing.
    ideal = _rank(y, y, g)
    idcg = ideal.per_group((np.exp2(ideal.labels) - 1.0) * ideal.expected(discounts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return _averaged(ranked.ids, dcg / idcg, idcg > 0)


def dcg_values(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> GroupValues:
    """Per-group DCG@k, not normalised (gains ``2**label - 1``, discounts ``1/log2(rank + 1)``),
    defined for every group: a list without a positive is worth 0, not undefined.

    With ``label = log2(1 + dwell seconds)`` the gain is the dwell itself, and the DCG is the time
    a user who examines rank r with probability ``1/log2(r + 1)`` spends on the list as ranked:
    the evaluation's expected time spent per feed."""
    k = _positive_int(k, "k")
    ranked = _rank(*_ranking_inputs(labels, scores, groups, graded=True))
    discounts = _cumulative(_discount(np.arange(1, k + 1, dtype=np.float64)))
    dcg = ranked.per_group((np.exp2(ranked.labels) - 1.0) * ranked.expected(discounts))
    return _averaged(ranked.ids, dcg, np.ones(ranked.ids.shape[0], dtype=bool))


def dcg_at_k(labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None) -> float:
    """Mean over groups of the unnormalised DCG@k (``dcg_values``)."""
    return dcg_values(labels, scores, k, groups).mean()


def ndcg_at_k(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> float:
    """NDCG@k with gains ``2**label - 1`` (binary or graded labels), averaged over groups that
    have a positive. The ideal DCG uses the group's own labels sorted descending, cut at k."""
    return ndcg_values(labels, scores, k, groups).mean()


def _hits_at_k(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: positives among the top k, positives overall, and the group ids."""
    k = _positive_int(k, "k")
    ranked = _rank(*_ranking_inputs(labels, scores, groups))
    hits = ranked.per_group(ranked.labels * ranked.expected(_cumulative(np.ones(k))))
    return hits, ranked.per_group(ranked.labels), ranked.ids


def precision_values(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> GroupValues:
    """Per group: positives among the top k divided by k; undefined without a positive."""
    hits, positives, ids = _hits_at_k(labels, scores, k, groups)
    return _averaged(ids, hits / k, positives > 0)


def precision_at_k(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> float:
    """Positives among the top k divided by k (even when the list is shorter than k)."""
    return precision_values(labels, scores, k, groups).mean()


def recall_values(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> GroupValues:
    """Per group: positives among the top k divided by its positives; undefined without one."""
    hits, positives, ids = _hits_at_k(labels, scores, k, groups)
    with np.errstate(invalid="ignore"):
        return _averaged(ids, hits / positives, positives > 0)


def recall_at_k(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> float:
    """Positives among the top k divided by the group's number of positives."""
    return recall_values(labels, scores, k, groups).mean()


def hit_values(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> GroupValues:
    """Per group: P(a positive is in the top k) over random tie orders (1 or 0 without ties);
    undefined without a positive."""
    k = _positive_int(k, "k")
    ranked = _rank(*_ranking_inputs(labels, scores, groups))
    group, above, tied, positives = ranked.first_positive_block()
    hit = np.zeros(ranked.ids.shape[0])
    hit[group] = _first_hit(above, tied, positives, k)[0]
    return _averaged(ranked.ids, hit, ranked.per_group(ranked.labels) > 0)


def hit_at_k(
    labels: ArrayLike, scores: ArrayLike, k: int, groups: ArrayLike | None = None
) -> float:
    """Share of groups with at least one positive in the top k."""
    return hit_values(labels, scores, k, groups).mean()


# --------------------------------------------------------------------------------------------
# Probability quality: log loss, normalised entropy, calibration
# --------------------------------------------------------------------------------------------


def _probability_inputs(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _binary(labels)
    p = _probabilities(probs)
    _same_length(y.shape[0], probs=p)
    return y, p


def _check_eps(eps: float) -> float:
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    return eps


def _row_log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log); probabilities are clipped to [eps, 1 - eps] so a
    single confident mistake costs -log(eps) instead of infinity."""
    return _log_loss(*_probability_inputs(labels, probs), _check_eps(eps))


def _log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    return float(np.mean(_row_log_loss(y, p, eps)))


def log_loss_values(
    labels: ArrayLike, probs: ArrayLike, groups: ArrayLike | None = None, eps: float = 1e-7
) -> GroupValues:
    """Per group: the mean row log loss, weighted by the group's rows, so that the mean over
    groups is the log loss over all rows (a sum of row losses over a sum of rows)."""
    _check_eps(eps)
    y, p = _probability_inputs(labels, probs)
    ids, index = _row_groups(_groups(groups, y.shape[0]), y.shape[0])
    rows = np.bincount(index, minlength=ids.shape[0]).astype(np.float64)
    losses = np.bincount(index, weights=_row_log_loss(y, p, eps), minlength=ids.shape[0])
    return GroupValues(ids, losses / rows, rows, np.ones(ids.shape[0], dtype=bool))


def base_rate_values(labels: ArrayLike, groups: ArrayLike | None = None) -> GroupValues:
    """Per group: the share of positive labels (CTR), weighted by the group's rows, so that the
    mean over groups is the overall base rate (what normalised entropy divides by)."""
    y = _binary(labels)
    ids, index = _row_groups(_groups(groups, y.shape[0]), y.shape[0])
    rows = np.bincount(index, minlength=ids.shape[0]).astype(np.float64)
    positives = np.bincount(index, weights=y, minlength=ids.shape[0])
    return GroupValues(ids, positives / rows, rows, np.ones(ids.shape[0], dtype=bool))


def normalized_entropy_of(log_loss: ArrayLike, base_rate: ArrayLike) -> np.ndarray:
    """NE from its two ingredients, elementwise: log loss over the entropy of the base rate; nan
    where the base rate is 0 or 1. The bootstrap uses it on resampled means, without the rows."""
    loss = np.asarray(log_loss, dtype=np.float64)
    rate = np.asarray(base_rate, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        base_entropy = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))
        return np.where((rate > 0) & (rate < 1), loss / base_entropy, np.nan)


def normalized_entropy(labels: ArrayLike, probs: ArrayLike) -> float:
    """Log loss divided by the entropy of the base rate (He et al. 2014, "Practical lessons from
    predicting clicks on ads at Facebook"): 1.0 means no better than always predicting the mean
    CTR, lower is better.

    Raises ``ValueError`` when the base rate is 0 or 1: that entropy is 0 and NE is undefined.
    """
    y, p = _probability_inputs(labels, probs)
    rate = float(y.mean())
    if rate in (0.0, 1.0):
        raise ValueError(f"normalized_entropy is undefined: the base rate of labels is {rate:g}")
    return float(normalized_entropy_of(_log_loss(y, p), rate))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Calibration by bin. Empty bins keep their row with ``count == 0`` and nan means, so the
    arrays always have ``n_bins`` entries and line up with ``edges``."""

    edges: np.ndarray  # [n_bins + 1] bin edges
    mean_predicted: np.ndarray  # [n_bins] mean of probs in the bin
    observed_rate: np.ndarray  # [n_bins] mean of labels in the bin
    counts: np.ndarray  # [n_bins] int64 rows in the bin


def reliability_curve(
    labels: ArrayLike,
    probs: ArrayLike,
    n_bins: int = 10,
    strategy: Literal["uniform", "quantile"] = "uniform",
) -> ReliabilityCurve:
    """Mean prediction against observed rate per probability bin (same bins as
    ``sklearn.calibration.calibration_curve``, which drops the empty ones)."""
    n_bins = _positive_int(n_bins, "n_bins")
    _choice(strategy, "strategy", ("uniform", "quantile"))
    y, p = _probability_inputs(labels, probs)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
    else:
        edges = np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1))
    bins = np.searchsorted(edges[1:-1], p)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_predicted = np.bincount(bins, weights=p, minlength=n_bins) / counts
        observed_rate = np.bincount(bins, weights=y, minlength=n_bins) / counts
    return ReliabilityCurve(edges, mean_predicted, observed_rate, counts)


def expected_calibration_error(
    labels: ArrayLike,
    probs: ArrayLike,
    n_bins: int = 10,
    strategy: Literal["uniform", "quantile"] = "uniform",
) -> float:
    """Sum over bins of (bin share of rows) * |mean predicted - observed rate|."""
    curve = reliability_curve(labels, probs, n_bins, strategy)
    filled = curve.counts > 0
    gaps = np.abs(curve.mean_predicted[filled] - curve.observed_rate[filled])
    return float(np.sum(curve.counts[filled] * gaps) / curve.counts.sum())


# --------------------------------------------------------------------------------------------
# Full-catalogue top-k retrieval metrics (RecBole definitions)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopKResult:
    """Per-user top-k metrics averaged over the users with at least one relevant item."""

    k: int
    n_users: int  # users evaluated (with at least one relevant item)
    recall: float
    precision: float
    ndcg: float
    mrr: float
    hit: float

    def as_dict(self) -> dict[str, float]:
        """Flat ``{"recall@10": ...}`` mapping for logs and JSON results."""
        names = ("recall", "precision", "ndcg", "mrr", "hit")
        return {f"{name}@{self.k}": getattr(self, name) for name in names}


@dataclass(frozen=True)
class _Pairs:
    """(user, item) pairs as two parallel int64 arrays, in any order, duplicates allowed."""

    users: np.ndarray
    items: np.ndarray


def _item_pairs(sets: ItemSets, n_users: int, name: str) -> _Pairs:
    """Normalise any supported per-user item-set format into (user, item) pair arrays."""
    if hasattr(sets, "tocsr"):  # scipy.sparse
        csr = sets.tocsr()
        sets = (csr.indptr, csr.indices)
    if isinstance(sets, tuple) and len(sets) == 2:
        indptr = _to_numpy(sets[0], f"{name} indptr").astype(np.int64, copy=False)
        items = _to_numpy(sets[1], f"{name} indices")
        if indptr.ndim != 1 or indptr.shape[0] != n_users + 1:
            raise ValueError(f"{name} indptr must have n_users + 1 = {n_users + 1} entries, got shape {indptr.shape}")
        if indptr[0] != 0 or indptr[-1] != items.shape[0] or np.any(np.diff(indptr) < 0):
            raise ValueError(f"{name} indptr must start at 0, never decrease and end at len(indices) = {items.shape[0]}")
        users = np.repeat(np.arange(n_users), np.diff(indptr))
    elif isinstance(sets, (np.ndarray, torch.Tensor)):
        matrix = _to_numpy(sets, name)
        if matrix.ndim != 2 or matrix.shape[0] != n_users:
            raise ValueError(f"{name} matrix must have shape [n_users={n_users}, n_items], got {matrix.shape}")
        if matrix.dtype != np.bool_:
            raise ValueError(f"{name} matrix must be boolean, got dtype {matrix.dtype}")
        users, items = np.nonzero(matrix)
    elif isinstance(sets, list):
        if len(sets) != n_users:
            raise ValueError(f"{name} has {len(sets)} item sets for {n_users} users")
        lengths = np.fromiter(map(len, sets), dtype=np.int64, count=n_users)
        items = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=int(lengths.sum()))
        users = np.repeat(np.arange(n_users), lengths)
    else:
        raise ValueError(f"{name}: unsupported type {type(sets).__name__}")
    if not np.issubdtype(items.dtype, np.integer):
        raise ValueError(f"{name} item ids must be integers, got dtype {items.dtype}")
    if items.size and items.min() < 0:
        raise ValueError(f"{name} item ids must be >= 0: {_first_bad(items < 0)} negative")
    return _Pairs(users.astype(np.int64), items.astype(np.int64, copy=False))


class _PairSet:
    """Membership test for (user, item) pairs by binary search over int64 keys."""

    def __init__(self, pairs: _Pairs, stride: int):
        self.stride = stride
        self.keys = np.unique(pairs.users * stride + pairs.items)  # duplicates count once

    def count_per_user(self, n_users: int) -> np.ndarray:
        return np.bincount(self.keys // self.stride, minlength=n_users)

    def contains(self, ranked: np.ndarray) -> np.ndarray:
        """[n_users, m] bool: is ``ranked[u, j]`` in user u's set (empty slots -1 never are)."""
        users = np.arange(ranked.shape[0])[:, None]
        keys = users * self.stride + ranked
        pos = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        found = self.keys[pos] == keys if self.keys.size else np.zeros(keys.shape, dtype=bool)
        return found & (ranked >= 0)


def _drop_excluded(ranked: np.ndarray, excluded: _PairSet, k: int) -> np.ndarray:
    """Remove excluded ids from each ranked row, keep the order, refill from the tail."""
    is_excluded = excluded.contains(ranked)
    keep_order = np.argsort(is_excluded, axis=1, kind="stable")  # kept items first, in order
    compacted = np.where(is_excluded, -1, ranked)
    return np.take_along_axis(compacted, keep_order, axis=1)[:, :k]


def tie_blocks(scores: ArrayLike, rows: ArrayLike, cols: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(above, tied) of the cells ``scores[rows, cols]`` within their row: how many items of the row
    score strictly higher, and how many score the same (the cell included).

    That is all the tie rule (module docstring) needs to know about a relevant item of a
    full-catalogue ranking; one sort per row and two binary searches per cell, never a [cells,
    items] comparison. A cell scoring -inf (an excluded item) is never retrieved: ``above`` is the
    row length.
    """
    s = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    s = s.detach().cpu()
    if s.dtype in (torch.float16, torch.bfloat16) or not s.is_floating_point():
        s = s.float()
    r = torch.as_tensor(_to_numpy(rows, "rows"), dtype=torch.int64)
    c = torch.as_tensor(_to_numpy(cols, "cols"), dtype=torch.int64)
    n_items = s.shape[1]
    if r.numel() == 0:
        return np.zeros(0, dtype=np.int64), np.ones(0, dtype=np.int64)
    order = torch.argsort(r, stable=True)
    r_sorted = r[order]
    counts = torch.bincount(r_sorted, minlength=s.shape[0])
    slot = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r_sorted]
    values = torch.full((s.shape[0], int(counts.max())), math.inf, dtype=s.dtype)
    values[r_sorted, slot] = s[r_sorted, c[order]]
    ascending = torch.sort(s, dim=1).values
    left = torch.searchsorted(ascending, values)[r_sorted, slot]
    right = torch.searchsorted(ascending, values, right=True)[r_sorted, slot]
    above, tied = torch.empty_like(r), torch.empty_like(r)
    above[order], tied[order] = n_items - right, right - left
    retrievable = torch.isfinite(s[r, c])
    return torch.where(retrievable, above, n_items).numpy(), torch.where(retrievable, tied, 1).numpy()


def topk_values(
    users: ArrayLike, above: ArrayLike, tied: ArrayLike, n_relevant: ArrayLike, k: int
) -> dict[str, GroupValues]:
    """Per-user recall, precision, NDCG, MRR and hit at k, from each relevant item's tie block.

    ``users``, ``above`` and ``tied`` give one entry per (user, relevant item) pair that the ranking
    holds (``tie_blocks``; a ranked id list gives ``above`` = its 0-based position, ``tied`` = 1;
    a pair ranked at or below k may be left out); ``n_relevant[u]`` counts user u's relevant items,
    ranked or not. Values are expectations over random tie orders (module docstring); users
    without a relevant item are undefined. Keys ``recall``, ``precision``, ``ndcg``, ``mrr``, ``hit``.
    """
    k = _positive_int(k, "k")
    n_rel = _to_numpy(n_relevant, "n_relevant").astype(np.float64)
    user = _to_numpy(users, "users").astype(np.int64)
    a = _to_numpy(above, "above").astype(np.int64)
    t = _to_numpy(tied, "tied").astype(np.int64)
    n_users = n_rel.shape[0]
    per_user = lambda w: np.bincount(user, weights=w, minlength=n_users)  # noqa: E731
    discounts = _discount(np.arange(1, k + 1, dtype=np.float64))
    hits = per_user(_expected(a, t, _cumulative(np.ones(k))))
    dcg = per_user(_expected(a, t, _cumulative(discounts)))
    ideal = _cumulative(discounts)[np.minimum(n_rel, k).astype(np.int64)]
    hit, reciprocal = np.zeros(n_users), np.zeros(n_users)
    if user.size:
        # Each user's best-ranked tie block holding a relevant item: the smallest ``above`` (equal
        # ``above`` means equal score, so one block), and how many relevant items share it.
        order = np.lexsort((a, user))
        first = np.flatnonzero(np.diff(user[order], prepend=-1))
        best = np.repeat(a[order][first], np.diff(np.append(first, order.size)))
        in_block = np.bincount(user[order], weights=a[order] == best, minlength=n_users)
        rows = order[first]
        hit[user[rows]], reciprocal[user[rows]] = _first_hit(a[rows], t[rows], in_block[user[rows]], k)
    ids, defined = np.arange(n_users), n_rel > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "recall": _averaged(ids, hits / n_rel, defined),
            "precision": _averaged(ids, hits / k, defined),
            "ndcg": _averaged(ids, dcg / ideal, defined),
            "mrr": _averaged(ids, reciprocal, defined),
            "hit": _averaged(ids, hit, defined),
        }


def topk_metrics(
    ranked_or_scores: ArrayLike,
    relevant: ItemSets,
    k: int,
    exclude: ItemSets | None = None,
) -> TopKResult:
    """Recall, precision, NDCG, MRR and hit rate at k over a full catalogue, per user averaged.

    ``ranked_or_scores`` is either a float score matrix [n_users, n_items] (ties, at the cut or
    above it, follow the module's rule: the expectation over random orders of equal scores) or an
    integer matrix of ranked item ids [n_users, m >= k], best first, e.g. from
    ``torch.topk(...).indices`` or a FAISS search (-1 marks an empty slot), which has no ties.
    ``relevant`` and ``exclude`` give one item set per user (see ``ItemSets``). Excluded items
    (typically the user's training interactions) are removed before the cut at k: with ranked ids,
    pass m > k so the list can be refilled.

    Definitions match RecBole (``recbole/evaluator/metrics.py``): recall = hits / |relevant|,
    precision = hits / k, MRR = 1 / rank of the first hit (0 if none in the top k), hit = any hit,
    NDCG binary with the ideal DCG over min(k, |relevant|) positions. Users without relevant
    items are skipped (RecBole's loader drops them); all values are nan if none remain.
    """
    k = _positive_int(k, "k")
    matrix = _to_numpy(ranked_or_scores, "ranked_or_scores")
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"ranked_or_scores must be a non-empty 2-D matrix, got shape {matrix.shape}")
    is_scores = np.issubdtype(matrix.dtype, np.floating)
    if not is_scores and not np.issubdtype(matrix.dtype, np.integer):
        raise ValueError(f"ranked_or_scores must be float scores or integer item ids, got dtype {matrix.dtype}")
    n_users = matrix.shape[0]

    relevant_pairs = _item_pairs(relevant, n_users, "relevant")
    excluded_pairs = None if exclude is None else _item_pairs(exclude, n_users, "exclude")
    all_items = [relevant_pairs.items] + ([] if excluded_pairs is None else [excluded_pairs.items])
    if is_scores:
        if np.isnan(matrix).any():
            raise ValueError(f"ranked_or_scores contains NaN: {_first_bad(np.isnan(matrix))}")
        stride = matrix.shape[1]
        for name, items in zip(("relevant", "exclude"), all_items):
            if items.size and items.max() >= stride:
                raise ValueError(f"{name} has item id {items.max()} but the score matrix has {stride} items")
    else:
        _check_ranked_ids(matrix, k)
        stride = 1 + max([0, int(matrix.max())] + [int(items.max()) for items in all_items if items.size])
    if n_users * stride >= 2**63:
        raise ValueError(f"too many (user, item) pairs to index: {n_users} users x {stride} items")

    relevant_set = _PairSet(relevant_pairs, stride)
    pair_users, pair_items = relevant_set.keys // stride, relevant_set.keys % stride  # distinct pairs
    if is_scores:
        scores = matrix.astype(np.float64)
        if excluded_pairs is not None:
            scores[excluded_pairs.users, excluded_pairs.items] = -np.inf
        above, tied = tie_blocks(scores, pair_users, pair_items)
    else:
        ranked = matrix.astype(np.int64, copy=False)
        ranked = _drop_excluded(ranked, _PairSet(excluded_pairs, stride), k) if excluded_pairs is not None else ranked[:, :k]
        pair_users, above = np.nonzero(relevant_set.contains(ranked))
        tied = np.ones_like(above)
    values = topk_values(pair_users, above, tied, relevant_set.count_per_user(n_users), k)
    return TopKResult(k=k, n_users=int(values["recall"].defined.sum()), **{name: v.mean() for name, v in values.items()})


def _check_ranked_ids(ranked: np.ndarray, k: int) -> None:
    if ranked.shape[1] < k:
        raise ValueError(f"ranked_or_scores has {ranked.shape[1]} ranked ids per user, fewer than k = {k}")
    if ranked.min() < -1:
        raise ValueError(f"ranked_or_scores item ids must be >= 0 (or -1 for an empty slot): {_first_bad(ranked < -1)}")
    row_sorted = np.sort(ranked, axis=1)
    duplicated = (row_sorted[:, 1:] == row_sorted[:, :-1]) & (row_sorted[:, 1:] >= 0)
    if duplicated.any():
        user = int(np.flatnonzero(duplicated.any(axis=1))[0])
        raise ValueError(f"ranked_or_scores repeats an item id in the list of user {user}")
