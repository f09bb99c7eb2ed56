"""Full-catalogue evaluation of a retrieval model, side by side with popularity, random and the oracle.

Protocol (the RecBole "full ranking" protocol, on a time split)::

    for every evaluation user:
        user vector   <- the user's state strictly before the cut (last N engagements, counters,
                         categorical features): exactly what serving would have known
        scores        <- user vector . item vector, for every item of the catalogue
        excluded      <- items the user clicked before the cut (RecBole excludes training items)
        top k         -> recall, NDCG, MRR, hit and precision @k  (feedrank.evaluate.metrics)
    intervals: a bootstrap over users (``bootstrap.bootstrap_values``), paired comparisons of the
    model against every other row, and slices (warm/cold users, items seen in training or not)

Definitions, each a choice:

- **relevant** items are those the user *engaged with* in an *impression* of the test period
  (``clicked and not hidden``, the same rule as the history). Rows of requests named by
  ``exclude_prefixes`` (default ``hist-``: the pre-window clicks MIND and EB-NeRD readers write,
  timestamped after the cut for users first seen after it) are history, not impressions
  (``feedrank.evaluate.impressions``), exactly as ranking evaluation treats them. An item the
  user also clicked before the cut is dropped from the relevant set (it is excluded from the
  ranking, so it could never be hit) and counted as ``n_relevant_seen``;
- **excluded** items are those the user *clicked* before the cut, hidden or not: opened once is
  enough not to be retrieved again;
- **item age** is the hours from ``created_ts`` (or the first training impression when it is
  unknown) to the cut, the rule the feature builder trains with;
- **OOV** users (not in the user vocabulary) are still evaluated through the OOV embedding and
  their history, and counted (``n_oov_users``); relevant items outside the item vocabulary cannot
  be ranked, so they are dropped and counted (``n_relevant_oov`` pairs, ``n_oov_items`` items);
- the **popularity** baseline ranks by training clicks, then training impressions; items equal on
  both are tied, with the same exclusion; **random** scores every item alike;
- **ties** follow the one rule of ``feedrank.evaluate.metrics``: the expected value over a random
  order of equal scores, computed exactly from each relevant item's tie block, so ``random`` is
  the exact expectation of a uniformly random ranking;
- the **oracle** (a log with ``truth/``): the world's ``true_affinity x freshness`` at the cut
  for every user and catalogue item (``feedrank.evaluate.oracle``); each slice then gives every
  model's share of the oracle's lift over random.

The core, ``evaluate_ranking``, takes explicit inputs (model, vocabularies, catalogue, per-user
state, relevant and excluded pairs as raw ids), so a benchmark on a fixed external split (e.g.
MovieLens with RecBole's split) calls it with its own rows: ``user_state`` turns any canonical-schema
table of "what happened before" into the per-user state. ``evaluate_holdout`` builds those inputs
from a log and a cut; ``evaluate_bundle`` does it for a saved bundle and writes
``eval/metrics.json`` (in the schema ``feedrank.evaluate.report`` reads).

Example::

    result = evaluate_bundle(load_bundle("runs/demo/bundle"), "runs/world_demo", ks=(10, 50))
    result.model["recall@10"], result.popularity["recall@10"], result.counts["n_oov_users"]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from feedrank.bundle import USER_COUNTER_COLUMNS, Bundle, catalogue_vectors
from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.data.log import read_events
from feedrank.data.user_batch import user_batch
from feedrank.data.world import World
from feedrank.evaluate.bootstrap import BootstrapTable, Comparison, Interval, bootstrap_values
from feedrank.evaluate.impressions import HISTORY_REQUESTS, impression_rows
from feedrank.evaluate.metrics import TIE_RULE, GroupValues, tie_blocks, topk_values
from feedrank.evaluate.oracle import ORACLE, CatalogueOracle, load_truth
from feedrank.features.build import parse_ts
from feedrank.features.counters import user_counters
from feedrank.features.user_state import UserState, user_state
from feedrank.features.vocab import FIRST_ID, USER_CAT_COLUMNS, Vocab, Vocabularies, lookup_quiet
from feedrank.fsutil import staged_file
from feedrank.models.blend import BlendModel
from feedrank.models.item2item import Item2ItemConfig, Item2ItemModel

DEFAULT_KS = (10, 50, 100)
METRICS_FILE = "metrics.json"
RANDOM, POPULARITY = "random", "popularity"
_STATE_COLUMNS = ["user_id", "item_id", "ts", "clicked", "hidden", "request_id", *USER_CAT_COLUMNS]
#: The slices of the evaluation, each a (kind, name): users of the training vocabulary or not;
#: relevant items the training window impressed or not.
SLICES = (("users", "warm users"), ("users", "cold users"), ("items", "items seen in training"), ("items", "new items"))


@dataclass
class RetrievalEvaluation:
    """Top-k metrics of every model with bootstrap intervals, comparisons, slices, and what was
    (not) evaluated."""

    ks: list[int]
    model_name: str
    models: dict[str, dict[str, Interval]]  # model -> {"recall@10": Interval, ...}
    comparisons: list[tuple[str, str, Comparison]]  # (a, b, B against A), users resampled
    counts: dict[str, int]  # users, OOV and dropped-pair counts (see the module docstring)
    split_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form holdout description
    slices: list[dict[str, Any]] = field(default_factory=list)  # ``slice_rows`` of each slice
    bootstrap: str = ""

    @property
    def model(self) -> dict[str, float]:
        """The evaluated model's point values (``{"recall@10": ...}``)."""
        return {name: i.value for name, i in self.models[self.model_name].items()}

    @property
    def popularity(self) -> dict[str, float]:
        return {name: i.value for name, i in self.models[POPULARITY].items()}

    def metrics_file(self) -> dict[str, Any]:
        """The ``eval/metrics.json`` document (``feedrank.evaluate.report.MetricsFile`` schema)."""
        return {
            "models": {m: {k: cell(i.value, i.ci) for k, i in cells.items()} for m, cells in self.models.items()},
            "comparisons": [comparison_row(a, b, c) for a, b, c in self.comparisons],
            "slices": self.slices,
            "holdout": {"protocol": "full catalogue, engaged-before-cut excluded, impressions after the cut only",
                        "split_at": self.split_at, "ks": self.ks, "ties": TIE_RULE, "bootstrap": self.bootstrap,
                        **self.counts, **self.extra},  # fmt: skip
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/metrics.json`` (atomically) and return its path."""
        path = Path(out_dir) / METRICS_FILE
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(self.metrics_file(), indent=2, allow_nan=False) + "\n")
        return path


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def cell(value: float, ci: tuple[float, float]) -> dict[str, Any]:
    """A metrics.json cell: the value and its interval, null where not finite (nan is not JSON)."""
    return {"value": _finite(value), "ci": [float(ci[0]), float(ci[1])] if all(map(math.isfinite, ci)) else None}


def comparison_row(a: str, b: str, c: Comparison) -> dict[str, Any]:
    """A metrics.json comparison: B against A on one metric."""
    return {"a": a, "b": b, "metric": c.metric, "delta": _finite(c.delta), "ci": cell(c.delta, c.ci)["ci"],
            "p": _finite(c.p_value), "value_a": _finite(c.value_a), "value_b": _finite(c.value_b)}  # fmt: skip


def slice_rows(name: str, share: float, tables: Sequence[tuple[BootstrapTable, Mapping[str, str]]],
               counts: Mapping[str, Any], oracle: str | None, random: str = RANDOM) -> dict[str, Any]:  # fmt: skip
    """One slice of an evaluation for metrics.json: every model's metrics with intervals and, with
    an oracle, its share of the oracle's lift over random (``BootstrapTable.lift_share``).

    ``tables`` pairs each bootstrap table with the metrics to show from it, ``{its name: shown
    name}`` (time spent is an NDCG on dwell labels, shown apart from the click NDCG)."""
    models: dict[str, dict[str, Any]] = {}
    shares: dict[str, dict[str, Any]] = {}
    for table, names in tables:
        has_oracle = oracle is not None and oracle in table.models and random in table.models
        for m in table.models:
            models.setdefault(m, {}).update({shown: cell(*_value_ci(table.interval(m, k))) for k, shown in names.items()})
            if has_oracle and m not in (oracle, random):
                shares.setdefault(m, {}).update(
                    {shown: cell(*_value_ci(table.lift_share(m, k, oracle, random))) for k, shown in names.items()})
    return {"slice": name, "share": share, "counts": dict(counts), "models": models, "lift_share": shares}


def _value_ci(interval: Interval) -> tuple[float, tuple[float, float]]:
    return interval.value, interval.ci


def popularity_baseline(catalogue: pa.Table, rows: np.ndarray) -> np.ndarray:
    """[len(rows)] float64 popularity of catalogue ``rows``: training clicks, then training
    impressions; items equal on both stay tied (the tie rule averages over their orders, where
    ``bundle.popularity_scores``, which serving needs deterministic, breaks them by index)."""
    clicks = catalogue["train_clicks"].to_numpy()[rows].astype(np.float64)
    imps = catalogue["train_impressions"].to_numpy()[rows].astype(np.float64)
    return clicks * (imps.max(initial=0.0) + 1.0) + imps


# ------------------------------------------------------------------------------------------------
# the core


def evaluate_ranking(
    model: nn.Module,
    vocabs: Vocabularies,
    catalogue: pa.Table,
    users: UserState,
    relevant: pa.Table,
    exclude: pa.Table,
    at: dt.datetime,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_users: int = 1024,
    model_name: str = "two_tower",
    *,
    world: World | None = None,
    n_resamples: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> RetrievalEvaluation:
    """Rank the whole catalogue for ``users`` with ``model``, popularity, random (and with a
    ``world``, its oracle); score the top k with intervals from a bootstrap over users.

    ``relevant`` and ``exclude`` are tables of raw ``(user_id, item_id)`` pairs (duplicates are
    fine); every user in them must be one of ``users``. ``model`` is anything ``catalogue_scorer``
    scores: a two-tower, an ``Item2ItemModel`` or a ``BlendModel`` of them. ``at`` is the cut: item ages are measured at it. ``random``
    scores every item alike: the tie rule makes that exactly the expectation of a uniformly random
    ranking. See the module docstring for every definition.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    if len(users) == 0:
        raise ValueError("no evaluation users: the test period has no engaged user")
    for name, pairs in (("relevant", relevant), ("exclude", exclude)):
        missing = {"user_id", "item_id"} - set(pairs.column_names)
        if missing:
            raise ValueError(f"{name} pairs lack column(s) {sorted(missing)}")

    user_known, _ = _known(vocabs.users, users.user_id)
    rankable = np.flatnonzero(catalogue["item_id"].is_valid().to_numpy(zero_copy_only=False))
    if rankable.size == 0:
        raise ValueError("the catalogue has no item to rank")
    pairs = _ranking_pairs(users, vocabs, relevant, exclude)
    excl_rows, excl_items, pair_user, pair_item = pairs.excl_rows, pairs.excl_items, pairs.pair_user, pairs.pair_item
    oov_pairs = pairs.oov_pairs

    batches = lambda: user_batches(users, vocabs, chunk_users)  # noqa: E731 (a fresh iterator per ranking)
    model_scorer = catalogue_scorer(model, catalogue, at, rankable)
    model_score = lambda lo, b: model_scorer(b)  # noqa: E731
    pop = torch.from_numpy(popularity_baseline(catalogue, rankable))
    scorers: dict[str, Callable[[int, Batch], Tensor]] = {
        model_name: model_score,
        POPULARITY: lambda lo, b: pop.expand(len(b), -1),
        RANDOM: lambda lo, b: torch.zeros(len(b), rankable.size, dtype=torch.float64),
    }
    if world is not None:
        oracle = CatalogueOracle(world, users.user_id, catalogue["item_id"].take(pa.array(rankable)), at)
        scorers[ORACLE] = lambda lo, b: torch.from_numpy(oracle(lo, lo + len(b)))
    with torch.no_grad():
        blocks = {name: _relevant_blocks(score, batches(), rankable, excl_rows, excl_items, pair_user, pair_item)
                  for name, score in scorers.items()}  # fmt: skip

    trained = catalogue["train_impressions"].to_numpy()[pair_item] > 0
    pair_masks = {"items seen in training": trained, "new items": ~trained}
    user_masks = {"warm users": user_known, "cold users": ~user_known}

    def values(mask: np.ndarray) -> dict[str, dict[str, GroupValues]]:
        n_rel = np.bincount(pair_user[mask], minlength=len(users))
        return {name: {f"{metric}@{k}": v for k in ks
                       for metric, v in topk_values(pair_user[mask], above[mask], tied[mask], n_rel, k).items()}
                for name, (above, tied) in blocks.items()}  # fmt: skip

    options = dict(n_resamples=n_resamples, level=level, seed=seed)
    everything = values(np.ones(pair_user.size, dtype=bool))
    table = bootstrap_values(everything, **options)
    names = [m.name for m in table.metrics]
    comparisons = [(b, model_name, c) for b in scorers if b != model_name for c in table.compare(b, model_name)]
    with_oracle = ORACLE if world is not None else None
    n_pairs = max(pair_user.size, 1)
    same = {n: n for n in names}
    slices = [slice_rows("all", 1.0, [(table, same)], {"users": int((np.bincount(pair_user) > 0).sum()),
                                                       "relevant": int(pair_user.size)}, with_oracle)]  # fmt: skip
    for kind, name in SLICES:
        if kind == "items":
            mask = pair_masks[name]
            part = values(mask)
        else:
            mask = user_masks[name][pair_user]
            part = {m: {k: _restricted(v, user_masks[name]) for k, v in cells.items()} for m, cells in everything.items()}
        if not mask.any():
            slices.append({"slice": name, "share": 0.0, "counts": {"users": 0, "relevant": 0}, "models": {}, "lift_share": {}})
            continue
        extra = {"users": int((np.bincount(pair_user[mask]) > 0).sum()), "relevant": int(mask.sum())}
        slices.append(slice_rows(name, float(mask.sum() / n_pairs), [(bootstrap_values(part, **options), same)],
                                 extra, with_oracle))  # fmt: skip

    counts = {
        "n_users": len(users),
        "n_users_evaluated": int((np.bincount(pair_user, minlength=len(users)) > 0).sum()),
        "n_oov_users": int((~user_known).sum()),
        "n_items_ranked": int(rankable.size),
        "n_relevant": int(pair_user.size),
        "n_relevant_oov": oov_pairs.num_rows,
        "n_oov_items": len(pc.unique(oov_pairs["item_id"])),
        "n_relevant_seen": pairs.n_seen,
    }
    models = {m: {k: table.interval(m, k) for k in names} for m in table.models}
    return RetrievalEvaluation(ks=ks, model_name=model_name, models=models, comparisons=comparisons, counts=counts,
                               split_at=at.isoformat(), slices=slices,
                               bootstrap=f"{n_resamples} resamples of users, {level:.0%} percentile intervals")  # fmt: skip


class _RankingPairs(NamedTuple):
    """The excluded and the relevant (user row, item index) pairs of a ranking, and what was dropped."""

    excl_rows: np.ndarray
    excl_items: np.ndarray
    pair_user: np.ndarray  # relevant pairs that can be hit: known items, not excluded, distinct
    pair_item: np.ndarray
    oov_pairs: pa.Table  # distinct relevant (user_id, item_id) pairs whose item is not in the vocabulary
    n_seen: int  # relevant pairs dropped because the user's ranking excludes the item


def _ranking_pairs(users: UserState, vocabs: Vocabularies, relevant: pa.Table, exclude: pa.Table) -> _RankingPairs:
    """``relevant`` and ``exclude`` (raw id pairs) as row/index pairs (module docstring: definitions)."""
    excl_rows, excl_items, _ = _pairs(exclude, users.user_id, vocabs.items, "exclude")
    rel_rows, rel_items, rel_known = _pairs(relevant, users.user_id, vocabs.items, "relevant")
    oov_pairs = relevant.select(["user_id", "item_id"]).filter(pa.array(~rel_known))
    oov_pairs = oov_pairs.group_by(["user_id", "item_id"]).aggregate([])  # distinct pairs
    seen_keys = np.unique(excl_rows * vocabs.n_items + excl_items)
    rel_keys = np.unique(rel_rows[rel_known] * vocabs.n_items + rel_items[rel_known])
    is_seen = np.isin(rel_keys, seen_keys)
    pair_user, pair_item = rel_keys[~is_seen] // vocabs.n_items, rel_keys[~is_seen] % vocabs.n_items
    return _RankingPairs(excl_rows, excl_items, pair_user, pair_item, oov_pairs, int(is_seen.sum()))


def _restricted(values: GroupValues, users: np.ndarray) -> GroupValues:
    """``values`` over the ``users`` slice only (the others undefined)."""
    return GroupValues(values.group_ids, values.values, values.weights, values.defined & users)


def _known(vocab: Vocab, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(is a vocabulary id, index) per id; hashed and OOV ids are not known."""
    idx = lookup_quiet(vocab, ids)
    return (idx >= FIRST_ID) & (idx < FIRST_ID + len(vocab.ids)), idx


def _pairs(pairs: pa.Table, users: pa.Array, items: Vocab, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user row, item index, item is known) of raw (user_id, item_id) pairs."""
    row = pc.index_in(pairs["user_id"], value_set=users)
    if row.null_count:
        stray = pairs["user_id"].filter(pc.is_null(row))[0].as_py()
        raise ValueError(f"{name} pairs name user {stray!r}, who is not among the evaluation users "
                         f"({row.null_count} pair(s) like this)")
    known, idx = _known(items, pairs["item_id"])
    return row.to_numpy().astype(np.int64), idx, known


def user_batches(users: UserState, vocabs: Vocabularies, chunk: int = 1024) -> Iterator[tuple[int, Batch]]:
    """``(first row, Batch)`` per chunk of ``users``, with the user-side fields the user tower reads
    (the item fields are zeros). Unknown ids map to OOV as in training."""
    user_idx = lookup_quiet(vocabs.users, users.user_id)
    cats = np.stack([lookup_quiet(vocabs.user_cats[c], users.user_cats[c]) for c in USER_CAT_COLUMNS], axis=1)
    hist = lookup_quiet(vocabs.items, users.history_items) if len(users.history_items) else np.zeros(0, np.int64)
    counters = user_counters(users.impressions, users.clicks)
    assert len(USER_COUNTER_COLUMNS) == counters.shape[1] == 2, "user counters: impressions, clicks"
    off = users.history_offsets
    for lo in range(0, len(users), chunk):
        hi = min(lo + chunk, len(users))
        yield lo, user_batch(user_idx[lo:hi], cats[lo:hi], off[lo : hi + 1], hist, counters[lo:hi], len(vocabs.item_cats))


def _relevant_blocks(score: Callable[[int, Batch], Tensor], batches, rankable: np.ndarray, excl_rows: np.ndarray,
                     excl_items: np.ndarray, pair_user: np.ndarray, pair_item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(above, tied) of every relevant (user row, item index) pair in its user's ranking of the
    ``rankable`` catalogue, excluded items removed (``metrics.tie_blocks``)."""
    column = np.full(int(max(rankable.max(), pair_item.max(initial=0), excl_items.max(initial=0))) + 1, -1, np.int64)
    column[rankable] = np.arange(rankable.size)
    excl_col, pair_col = column[excl_items], column[pair_item]
    keep = excl_col >= 0
    excl_rows, excl_col = excl_rows[keep], excl_col[keep]
    above = np.full(pair_user.size, rankable.size, dtype=np.int64)
    tied = np.ones(pair_user.size, dtype=np.int64)
    for lo, batch in batches:
        scores = score(lo, batch).clone()
        mine = (excl_rows >= lo) & (excl_rows < lo + len(batch))
        scores[torch.from_numpy(excl_rows[mine] - lo), torch.from_numpy(excl_col[mine])] = -math.inf
        pairs = np.flatnonzero((pair_user >= lo) & (pair_user < lo + len(batch)) & (pair_col >= 0))
        above[pairs], tied[pairs] = tie_blocks(scores, pair_user[pairs] - lo, pair_col[pairs])
    return above, tied


# ------------------------------------------------------------------------------------------------
# scoring the catalogue: one function for every retrieval model kind


def recent_history(batch: Batch, n: int) -> Batch:
    """``batch`` with each user's history cut to their last ``n`` items (the mask only): a blend's
    parts were trained with different history lengths and each must score from its own."""
    mask = batch.history_mask
    from_end = mask.flip(1).long().cumsum(1).flip(1)  # 1 = the user's most recent item
    return dataclasses.replace(batch, history_mask=mask & (from_end <= n))


def catalogue_scorer(model: nn.Module, catalogue: pa.Table, at: dt.datetime, rankable: np.ndarray,
                     history_len: int | None = None) -> Callable[[Batch], Tensor]:  # fmt: skip
    """A function from a users' ``Batch`` to their ``[B, len(rankable)]`` scores of the catalogue
    ``rankable`` rows, for any retrieval model: a two-tower (user vectors against the item vectors
    at ``at``, computed here once), an ``Item2ItemModel`` (from the history) or a ``BlendModel``
    (each part's scorer, from its own ``history_lens`` entry, normalised and mixed)."""
    cut = (lambda b: b) if history_len is None else (lambda b: recent_history(b, history_len))  # noqa: E731
    if isinstance(model, BlendModel):
        parts = [catalogue_scorer(m, catalogue, at, rankable, int(h)) for m, h in zip(model.parts.values(), model.history_lens)]
        return lambda b: model.mix([score(b) for score in parts])
    if isinstance(model, Item2ItemModel):  # scores from the history alone: no vectors
        columns = torch.from_numpy(rankable)
        return lambda b: model.score_batch(cut(b))[:, columns]
    item_vecs = catalogue_vectors(model, catalogue, at, rankable)
    return lambda b: model.user_vectors(cut(b)) @ item_vecs.T


@dataclass
class Holdout:
    """A validation (or test) split given explicitly: the users' state, their held-out positives
    and the pairs their rankings exclude (raw ids), and the cut (item ages are measured at it).
    What ``evaluate_ranking`` takes, bundled, for callers that rank the same split many times."""

    users: UserState
    relevant: pa.Table
    exclude: pa.Table
    at: dt.datetime


def holdout_from_logs(train_log: str | Path, valid_log: str | Path, history_len: int,
                      exclude_prefixes: Sequence[str] = HISTORY_REQUESTS) -> Holdout:  # fmt: skip
    """A validation holdout kept in its own log (e.g. a random split's valid rows, ingested apart
    from the train log): its users are those with an engagement in an impression of ``valid_log``,
    their state and exclusions come from ``train_log`` (every row of it), and the cut is the train
    log's last timestamp. The same definitions as ``evaluate_holdout`` (module docstring)."""
    before = read_events(train_log, columns=_STATE_COLUMNS)
    after = impression_rows(read_events(valid_log, columns=_STATE_COLUMNS), exclude_prefixes)
    engaged = after.filter(pc.and_(after["clicked"], pc.invert(after["hidden"])))
    users = pc.unique(engaged["user_id"]).sort()
    if len(users) == 0 or before.num_rows == 0:
        raise ValueError(f"{valid_log}: no engagement to validate on" if len(users) == 0 else f"{train_log}: no rows")
    in_sample = lambda t: t.filter(pc.is_in(t["user_id"], value_set=users)).select(["user_id", "item_id"])  # noqa: E731
    at = pc.max(before["ts"]).as_py()
    return Holdout(user_state(before, users, history_len, fallback=after), in_sample(engaged),
                   in_sample(before.filter(before["clicked"])), at)  # fmt: skip


def blend_grid_metrics(model: BlendModel, grid: Sequence[Sequence[float]], holdout: Holdout, vocabs: Vocabularies,
                       catalogue: pa.Table, metric: str = "mrr@10", chunk_users: int = 1024) -> list[float]:  # fmt: skip
    """``metric`` (``name@k``, averaged over the users with a relevant item) of ``model`` on
    ``holdout`` with each weight vector of ``grid``: the parts score each chunk of users once, and
    every grid point mixes those scores (the weights are what the training path selects)."""
    name, k = metric.split("@")
    k = int(k)
    rankable = np.flatnonzero(catalogue["item_id"].is_valid().to_numpy(zero_copy_only=False))
    pairs = _ranking_pairs(holdout.users, vocabs, holdout.relevant, holdout.exclude)
    parts = [catalogue_scorer(m, catalogue, holdout.at, rankable, int(h))
             for m, h in zip(model.parts.values(), model.history_lens)]  # fmt: skip
    with torch.no_grad():
        chunks = [(lo, [score(b) for score in parts]) for lo, b in user_batches(holdout.users, vocabs, chunk_users)]
    n_rel = np.bincount(pairs.pair_user, minlength=len(holdout.users))
    values = []
    for weights in grid:
        w = torch.tensor(weights, dtype=torch.float64)
        cached = iter(chunks)
        score = lambda lo, b: model.mix(next(cached)[1], w)  # noqa: E731 (the chunks come in user_batches' order)
        above, tied = _relevant_blocks(score, user_batches(holdout.users, vocabs, chunk_users), rankable, pairs.excl_rows,
                                       pairs.excl_items, pairs.pair_user, pairs.pair_item)  # fmt: skip
        values.append(topk_values(pairs.pair_user, above, tied, n_rel, k)[name].mean())
    return values


# ------------------------------------------------------------------------------------------------
# convenience wrappers: a time holdout of a log, a saved bundle


def evaluate_holdout(
    model: nn.Module,
    vocabs: Vocabularies,
    catalogue: pa.Table,
    log_dir: str | Path,
    split_at: dt.datetime,
    *,
    end: dt.datetime | None = None,
    history_len: int = 50,
    ks: Sequence[int] = DEFAULT_KS,
    max_users: int | None = None,
    seed: int = 0,
    chunk_users: int = 1024,
    model_name: str = "two_tower",
    exclude_prefixes: Sequence[str] = HISTORY_REQUESTS,
    n_resamples: int = 200,
    level: float = 0.95,
) -> RetrievalEvaluation:
    """Evaluate on the time holdout ``[split_at, end)`` of the log at ``log_dir``.

    Evaluation users are those with an engagement in an *impression* of the holdout (rows of
    requests named by ``exclude_prefixes`` are history, not impressions: ``impression_rows``); a
    random sample of ``max_users`` of them, fixed by ``seed``, when given. Their state is read from
    the log before ``split_at``. A log with ``truth/`` adds the world's oracle.
    """
    before = read_events(log_dir, columns=_STATE_COLUMNS, end=split_at)
    after = read_events(log_dir, columns=_STATE_COLUMNS, start=split_at, end=end)
    shown = impression_rows(after, exclude_prefixes)
    engaged_after = shown.filter(pc.and_(shown["clicked"], pc.invert(shown["hidden"])))
    users = pc.unique(engaged_after["user_id"]).sort()
    if len(users) == 0:
        raise ValueError(f"{log_dir}: no engagement at or after {split_at.isoformat()}: nothing to evaluate")
    if max_users is not None and len(users) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
        users = users.take(pa.array(pick))
    state = user_state(before, users, history_len, fallback=after)
    in_sample = lambda t: t.filter(pc.is_in(t["user_id"], value_set=users))  # noqa: E731
    relevant = in_sample(engaged_after).select(["user_id", "item_id"])
    exclude = in_sample(before.filter(before["clicked"])).select(["user_id", "item_id"])
    result = evaluate_ranking(model, vocabs, catalogue, state, relevant, exclude, split_at, ks, chunk_users, model_name,
                              world=load_truth(log_dir), n_resamples=n_resamples, level=level, seed=seed)  # fmt: skip
    result.extra = {"log": str(Path(log_dir).resolve()), "end": None if end is None else end.isoformat(),
                    "max_users": max_users, "seed": seed, "history_len": history_len,
                    "rows_excluded": after.num_rows - shown.num_rows, "exclude_requests": list(exclude_prefixes)}
    return result


def evaluate_bundle(
    bundle: Bundle,
    log_dir: str | Path,
    split_at: str | None = None,
    ks: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    max_users: int | None = None,
    seed: int | None = None,
) -> RetrievalEvaluation:
    """``evaluate_holdout`` of a two-tower, item2item or blend bundle; unset arguments come from its run config
    (``features.split_at``/``cutoff``/``history_len``, ``eval.ks``/``max_users``/``seed``).

    Writes ``out_dir/metrics.json`` (default: ``eval/`` beside the bundle folder).
    """
    cfg = bundle.config
    features, ev = cfg.get("features", {}), cfg.get("eval", {})
    at = parse_ts(split_at or features.get("split_at"), "split_at")
    if at is None:
        raise ValueError(f"{bundle.path}: its run had no features.split_at; give the evaluation cut (--split-at)")
    end = parse_ts(features.get("cutoff"), "cutoff") if split_at is None else None
    if bundle.kind == "item2item":
        history_len = from_dict(Item2ItemConfig, cfg.get("item2item"), "item2item").history_len
    elif bundle.kind == "blend":  # each part cuts the history to its own length (catalogue_scorer)
        history_len = int(bundle.model.history_lens.max())
    else:
        history_len = min(features.get("history_len", 50), cfg.get("two_tower", {}).get("max_history_len", 50))
    result = evaluate_holdout(
        bundle.model, bundle.vocabs, bundle.catalogue, log_dir, at, end=end, history_len=history_len,
        ks=ks or ev.get("ks", DEFAULT_KS), max_users=max_users if max_users is not None else ev.get("max_users"),
        seed=seed if seed is not None else ev.get("seed", 0), chunk_users=ev.get("chunk_users", 1024),
        model_name=bundle.kind, exclude_prefixes=cfg.get("exclude_requests", HISTORY_REQUESTS),
        n_resamples=ev.get("n_resamples", 200),
    )  # fmt: skip
    result.extra["bundle_version"] = bundle.version
    result.write(Path(out_dir) if out_dir is not None else bundle.path.parent / "eval")
    return result
