"""The re-ranker: the last step of ``GET /feed``, between the ranker's scores and the response.

Plain functions, callable without HTTP. The rules run in a fixed order:

1. **Clean the input.** Duplicate item ids (the same item retrieved by two sources, say "ann" and
   "popular") keep their highest-scored copy; the drops are counted in the result.
2. **Remove seen** items (``remove_seen``): the user's already-seen ids never come back.
3. **Freshness boost**, additive in ranker-score units: ``boost * 0.5 ** (age_h / half_life_h)``,
   so an item ``half_life_h`` old gets half the boost of a brand-new one. Negative ages (clock
   skew: an item "created" after the request) count as age 0, like ``features.counters``.
4. **MMR with a per-publisher cap.** Greedy over the ``k`` output slots; each slot takes the
   candidate maximising ``lambda * relevance - (1 - lambda) * max cosine similarity to the items
   already picked``, among candidates whose publisher has fewer than ``per_publisher_cap`` picks
   (the cap counts within the ``k`` returned items). When every remaining candidate's publisher is
   full (too few publishers for the cap), the slot takes the best remaining candidate anyway and its
   reason says so: a short feed is worse than a feed with one publisher too many.

**Why relevance is min-max normalised to [0, 1] before MMR.** Cosine similarity lives in [-1, 1],
while ranker scores are logits or probabilities of any scale. Mixing them raw would make
``mmr_lambda`` mean different things for different rankers (a ranker whose logits span 20 units
would drown any diversity term). Min-max over the request's candidates makes lambda a scale-free
trade-off, and makes the result invariant to any increasing affine change of the scores.

Each step is vectorised over the candidates (the running max-similarity is updated with one
matrix-vector product per slot) and does only what the next choice needs; the reasons are derived
afterwards from the per-step rows in whole-array operations. A call costs O(k * n * d) numpy work
and O(k) short Python steps.

Each pick carries a ``reason`` naming its source and every rule that moved it, e.g.
``"ann; freshness boost +0.120; moved down by MMR (similar to i42, cos 0.97)"``.

Example::

    >>> import numpy as np
    >>> cands = Candidates(item_ids=["a", "b", "c"], scores=[0.9, 0.8, 0.1],
    ...                    vectors=np.eye(3, dtype=np.float32)[[0, 0, 1]], publishers=["p", "q", "r"],
    ...                    age_h=[5.0, 5.0, 5.0], sources=["ann", "ann", "popular"])
    >>> result = rerank(cands, seen=[], cfg=RerankConfig(k=3, mmr_lambda=0.5, per_publisher_cap=None))
    >>> [p.item_id for p in result.picks]     # "b" duplicates "a", so the different "c" goes first
    ['a', 'c', 'b']
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

ArrayLike = Any  # numpy array or sequence


@dataclass
class RerankConfig:
    """Re-ranking rules (section ``rerank`` of a YAML config)."""

    k: int = 20  # items returned
    mmr_lambda: float = 0.8  # relevance vs diversity: 1.0 = relevance only, 0.0 = diversity only
    per_publisher_cap: int | None = 3  # max items of one publisher among the k returned; None = no cap
    freshness_boost: float = 0.0  # added to the score of a brand-new item, in ranker-score units
    freshness_half_life_h: float = 24.0  # age at which the boost has halved
    remove_seen: bool = True  # drop the user's already-seen items

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda must be in [0, 1], got {self.mmr_lambda}")
        if self.per_publisher_cap is not None and self.per_publisher_cap < 1:
            raise ValueError(f"per_publisher_cap must be >= 1 or null, got {self.per_publisher_cap}")
        if not (math.isfinite(self.freshness_boost) and self.freshness_boost >= 0):
            raise ValueError(f"freshness_boost must be finite and >= 0, got {self.freshness_boost}")
        if not (math.isfinite(self.freshness_half_life_h) and self.freshness_half_life_h > 0):
            raise ValueError(f"freshness_half_life_h must be finite and > 0, got {self.freshness_half_life_h}")


@dataclass
class Candidates:
    """One request's candidates, one row per candidate; converted to numpy and checked on creation.

    ``vectors`` are the item embeddings used for similarity ([n, d]; ``rerank`` normalises them
    again, so that the dot product is the cosine; an all-zero vector is similar to nothing). ``age_h`` is the
    item's age in hours at request time. ``sources`` tags the retrieval source ("ann", "fresh", ...).
    Raises ``ValueError`` naming the array on mismatched lengths, wrong shapes or non-finite values.
    """

    item_ids: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray
    publishers: np.ndarray
    age_h: np.ndarray
    sources: np.ndarray

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.publishers = np.asarray(self.publishers)
        self.age_h = np.asarray(self.age_h, dtype=np.float64)
        self.sources = np.asarray(self.sources)
        if self.vectors.size == 0 and self.vectors.ndim == 1:  # [] for no candidates
            self.vectors = self.vectors.reshape(0, 0)
        one_d = ("item_ids", "scores", "publishers", "age_h", "sources")
        for name in one_d:
            if getattr(self, name).ndim != 1:
                raise ValueError(f"{name}: expected a 1-D array, got shape {getattr(self, name).shape}")
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors: expected a 2-D [n, dim] array, got shape {self.vectors.shape}")
        lengths = {name: len(getattr(self, name)) for name in (*one_d[:2], "vectors", *one_d[2:])}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"candidate arrays differ in length: {', '.join(f'{k}={v}' for k, v in lengths.items())}")
        for name in ("scores", "age_h", "vectors"):
            values = getattr(self, name)
            if np.isfinite(values).all():  # one pass per request; the counts only for the message
                continue
            if n_nan := int(np.isnan(values).sum()):
                raise ValueError(f"{name}: {n_nan} NaN value(s)")
            raise ValueError(f"{name}: {int(np.isinf(values).sum())} infinite value(s)")

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Candidates:
        """The candidates at ``index`` (integer positions or a boolean mask), in that order.

        Rows of checked arrays need no second check: the copy skips ``__post_init__`` (whose
        NaN scans would otherwise run again for every take of a request).
        """
        out = object.__new__(Candidates)
        for name in ("item_ids", "scores", "vectors", "publishers", "age_h", "sources"):
            setattr(out, name, getattr(self, name)[index])
        return out


@dataclass(frozen=True)
class Pick:
    """One returned item. ``score`` is the ranker score plus the freshness boost."""

    item_id: Any
    score: float
    publisher: Any
    source: str
    reason: str


@dataclass(frozen=True)
class RerankResult:
    picks: list[Pick]  # in feed order
    duplicates_dropped: int  # candidate rows dropped as copies of a higher-scored row of the same item
    seen_removed: int  # distinct candidates dropped because the user had seen them
    held_by_cap: list[Any]  # ids that MMR preferred over a pick but whose publisher was full (debug)
    cap_relaxed: int  # picks placed over the publisher cap because too few publishers were left

    @property
    def item_ids(self) -> list[Any]:
        return [p.item_id for p in self.picks]


def freshness_boost(age_h: np.ndarray, boost: float, half_life_h: float) -> np.ndarray:
    """``boost * 0.5 ** (age_h / half_life_h)``, with negative ages (clock skew) taken as 0."""
    return boost * np.exp2(-np.maximum(np.asarray(age_h, dtype=np.float64), 0.0) / half_life_h)


def _unique(values: np.ndarray, name: str, **outputs: bool) -> tuple[np.ndarray, ...]:
    """``np.unique(values, **outputs)`` (ask only for the outputs used: each costs a pass over the
    request); ids must be sortable."""
    try:
        return np.unique(values, **outputs)
    except TypeError as exc:  # e.g. None among strings
        raise ValueError(f"{name}: ids must be of one comparable type without None: {exc}") from exc


def dedupe(item_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions of the highest-scored row of each distinct item id (first row on ties), in input order."""
    order = np.argsort(-scores, kind="stable")
    _, first = _unique(item_ids[order], "item_ids", return_index=True)
    return np.sort(order[first])


@dataclass
class _Trace:
    """What happened to each candidate during MMR, for the reasons (indices into the candidates)."""

    passed_near: np.ndarray  # [n] the pick it was most similar to when a less relevant one first beat it; -1 if never
    passed_cos: np.ndarray  # [n] that similarity
    promoted: np.ndarray  # [n] bool: picked before a more relevant eligible candidate
    held: np.ndarray  # [n] bool: preferred by MMR over a pick but its publisher was full
    relaxed: np.ndarray  # [n] bool: picked over the publisher cap


def mmr_select(
    relevance: np.ndarray, vectors: np.ndarray, publisher: np.ndarray, k: int, mmr_lambda: float, cap: int | None
) -> tuple[np.ndarray, _Trace]:
    """Greedy MMR with a hard per-publisher cap: the positions of up to ``k`` picks, in order.

    ``relevance`` in [0, 1], ``vectors`` L2-normalised, ``publisher`` integer codes. Ties go to the
    lowest position, so callers pass candidates sorted by relevance. See the module docstring.

    The greedy choice is sequential, so each step does only what the next choice needs, in five
    numpy calls over the candidates and no per-candidate Python: the penalty and the objective of
    every candidate, its argmax, the similarity of every candidate to the pick (one matrix-vector
    product, into row ``step`` of ``sims``) and the running max similarity (into row ``step`` of
    ``running``). Candidates that cannot be picked hold ``-inf`` in ``open_term`` (the relevance
    term of the others), so the argmax needs no mask; it changes only on a pick and when a
    publisher fills up (counted in Python ints). Everything the reasons need (each step's objective
    and eligibility) follows from ``running``, the pick order and the step each publisher filled
    at, and ``_trace`` derives it afterwards in whole-array operations.
    """
    n = len(relevance)
    steps = min(k, n)
    cap = n if cap is None else cap
    diversity = 1.0 - mmr_lambda
    relevance_term = mmr_lambda * relevance
    open_term = relevance_term.copy()  # relevance term of who can be picked now, -inf for the others
    sims = np.empty((steps, n), dtype=np.float32)  # row s: cosine of every candidate to pick s
    running = np.empty((steps, n), dtype=np.float32)  # row s: max cosine to picks 0..s
    penalty = np.empty(n, dtype=np.float32)
    objective = np.empty(n, dtype=np.float64)
    picks = np.empty(steps, dtype=np.int64)
    codes = publisher.tolist()
    left = np.bincount(publisher).tolist()  # per publisher: candidates not picked yet
    picked = [0] * len(left)
    filled_at = np.full(len(left), steps, dtype=np.int64)  # step of each publisher's cap-th pick
    n_open = n  # candidates not picked whose publisher is below the cap
    relaxed_from = steps  # first step with no open candidate: from then on, the best remaining
    for step in range(steps):
        if n_open == 0 and relaxed_from == steps:  # every remaining publisher full: best remaining
            relaxed_from = step
            open_term = relevance_term.copy()
            open_term[picks[:step]] = -np.inf
        if step:
            np.multiply(running[step - 1], diversity, out=penalty)
            p = int(np.subtract(open_term, penalty, out=objective).argmax())
        else:
            p = int(open_term.argmax())
        picks[step] = p
        open_term[p] = -np.inf
        pub = codes[p]
        left[pub] -= 1
        picked[pub] += 1
        if step < relaxed_from:
            n_open -= 1
            if picked[pub] == cap:
                filled_at[pub] = step
                n_open -= left[pub]
                open_term[publisher == pub] = -np.inf
        np.dot(vectors, vectors[p], out=sims[step])
        if step:
            np.maximum(running[step - 1], sims[step], out=running[step])
        else:
            running[0] = sims[0]
    return picks, _trace(relevance, relevance_term, diversity, publisher, picks, sims, running, filled_at, relaxed_from)


def _trace(relevance: np.ndarray, relevance_term: np.ndarray, diversity: float, publisher: np.ndarray,
           picks: np.ndarray, sims: np.ndarray, running: np.ndarray, filled_at: np.ndarray,
           relaxed_from: int) -> _Trace:  # fmt: skip
    """The reasons of ``mmr_select``'s picks, whole-array, from its per-step rows (``[steps, n]``):
    each step's objective (the relevance term less the penalty of the running max before it, as
    the loop computed it) and eligibility (not picked before the step, and the publisher's cap not
    reached before it, unless the step is relaxed)."""
    steps, n = sims.shape
    trace = _Trace(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.float32),
                   np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))  # fmt: skip
    if steps == 0:
        return trace
    step_no = np.arange(steps)[:, None]
    pick_step = np.full(n, steps, dtype=np.int64)
    pick_step[picks] = np.arange(steps)
    remaining = pick_step[None, :] >= step_no  # row s: not picked before step s
    eligible = remaining & ((filled_at[publisher][None, :] >= step_no) | (step_no >= relaxed_from))
    objective = np.empty((steps, n), dtype=np.float64)
    objective[0] = relevance_term
    np.subtract(relevance_term, running[:-1] * np.float32(diversity), out=objective[1:])
    # passed[s, i]: i was eligible and more relevant than pick s, and lost to it
    passed = eligible & (relevance[None, :] > relevance[picks][:, None])
    trace.promoted[picks] = passed.any(axis=1)
    trace.relaxed[picks[relaxed_from:]] = True
    trace.held = (remaining & ~eligible & (objective > objective[np.arange(steps), picks][:, None])).any(axis=0)
    # where each candidate stood when it was first passed after the first pick: its nearest pick
    # so far (the first to reach its running max similarity; argmax takes the first of equals)
    # and that similarity
    later = passed[1:]
    hit = later.any(axis=0)
    if hit.any():
        cols = np.flatnonzero(hit)
        first = later[:, cols].argmax(axis=0)  # row j of later is step j + 1: the picks before it are rows 0..j
        before = np.where(step_no <= first[None, :], sims[:, cols], -np.inf)
        trace.passed_near[cols] = picks[before.argmax(axis=0)]
        trace.passed_cos[cols] = running[first, cols]
    return trace


def _normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine = dot product); an all-zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _min_max(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to [0, 1]; all ones when every value is equal (nothing to tell them apart)."""
    lo, hi = x.min(), x.max()
    return np.ones_like(x) if hi == lo else (x - lo) / (hi - lo)


def rerank(candidates: Candidates, seen: ArrayLike, cfg: RerankConfig) -> RerankResult:
    """The feed: up to ``cfg.k`` picks from ``candidates``, by the rules in the module docstring.

    An empty candidate list (or one that is empty once seen items are removed) gives an empty
    result, not an error: a user may have seen everything retrieved. Fewer than ``k`` candidates
    give all of them. Raises ``ValueError`` on an invalid config (``k < 1``, ...).
    """
    cfg.validate()
    keep = dedupe(candidates.item_ids, candidates.scores)
    duplicates = len(candidates) - len(keep)
    seen_removed = 0
    seen = np.asarray(seen if isinstance(seen, np.ndarray) else list(seen))
    if cfg.remove_seen and len(seen):
        is_seen = np.isin(candidates.item_ids[keep], seen)
        seen_removed = int(is_seen.sum())
        keep = keep[~is_seen]
    if len(keep) == 0:
        return RerankResult([], duplicates, seen_removed, [], 0)

    boost = freshness_boost(candidates.age_h[keep], cfg.freshness_boost, cfg.freshness_half_life_h)
    score = candidates.scores[keep] + boost
    order = np.argsort(-score, kind="stable")  # MMR breaks ties towards the more relevant
    c, boost, score = candidates.take(keep[order]), boost[order], score[order]  # one gather of the rows
    publishers, publisher_code = _unique(c.publishers, "publishers", return_inverse=True)
    picks, trace = mmr_select(
        _min_max(score), _normalise(c.vectors), publisher_code, cfg.k, cfg.mmr_lambda, cfg.per_publisher_cap
    )

    # Python values of the picks only (not of every candidate), then one plain loop over k picks
    counts = np.bincount(publisher_code[picks], minlength=len(publishers))
    near = trace.passed_near[picks]
    columns = zip(c.item_ids[picks].tolist(), score[picks].tolist(), c.publishers[picks].tolist(), c.sources[picks].tolist(),
                  boost[picks].tolist(), c.item_ids[near].tolist(), (near >= 0).tolist(), trace.passed_cos[picks].tolist(),
                  trace.promoted[picks].tolist(), trace.relaxed[picks].tolist(), publisher_code[picks].tolist())  # fmt: skip
    out = []
    for item_id, item_score, publisher, source, item_boost, near_id, moved_down, cos, promoted, relaxed, pub in columns:
        parts = [str(source)]
        if item_boost >= 5e-4:
            parts.append(f"freshness boost +{item_boost:.3f}")
        if moved_down:
            parts.append(f"moved down by MMR (similar to {near_id}, cos {cos:.2f})")
        if promoted:
            parts.append("moved up by MMR (diversity)")
        if relaxed:
            parts.append(f"over publisher cap {cfg.per_publisher_cap} ({counts[pub]} from {publishers[pub]}): "
                         "too few other publishers among the candidates")  # fmt: skip
        out.append(Pick(item_id, item_score, publisher, str(source), "; ".join(parts)))
    picked = np.zeros(len(c), dtype=bool)
    picked[picks] = True
    held = c.item_ids[np.flatnonzero(trace.held & ~picked)].tolist()
    return RerankResult(out, duplicates, seen_removed, held, int(trace.relaxed.sum()))
