"""Full-catalogue evaluation of a retrieval model, side by side with a popularity baseline.

Protocol (the RecBole "full ranking" protocol, on a time split)::

    for every evaluation user:
        user vector   <- the user's state strictly before the cut (last N engagements, counters,
                         categorical features): exactly what serving would have known
        scores        <- user vector . item vector, for every item of the catalogue
        excluded      <- items the user clicked before the cut (RecBole excludes training items)
        top k         -> recall, NDCG, MRR, hit and precision @k  (feedrank.evaluate.metrics)

Definitions, each a choice:

- **relevant** items are those the user *engaged with* in the test period (``clicked and not
  hidden``, the same rule as the history); an item the user also clicked before the cut is dropped
  from the relevant set (it is excluded from the ranking, so it could never be hit) and counted as
  ``n_relevant_seen``;
- **excluded** items are those the user *clicked* before the cut, hidden or not: opened once is
  enough not to be retrieved again;
- **item age** is the hours from ``created_ts`` (or the first training impression when it is
  unknown) to the cut, the rule the feature builder trains with;
- **OOV** users (not in the user vocabulary) are still evaluated through the OOV embedding and
  their history, and counted (``n_oov_users``); relevant items outside the item vocabulary cannot
  be ranked, so they are dropped and counted (``n_relevant_oov`` pairs, ``n_oov_items`` items);
- the **popularity** baseline ranks by training clicks (ties by training impressions, then by
  vocabulary index), with the same exclusion.

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

import datetime as dt
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from feedrank.bundle import USER_COUNTER_COLUMNS, Bundle, catalogue_vectors, lookup_quiet, popularity_scores
from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.data.log import read_events
from feedrank.data.user_batch import user_batch
from feedrank.evaluate.metrics import topk_metrics
from feedrank.features.build import parse_ts
from feedrank.features.counters import user_counters
from feedrank.features.user_state import UserState, user_state
from feedrank.features.vocab import FIRST_ID, USER_CAT_COLUMNS, Vocab, Vocabularies
from feedrank.fsutil import staged_file
from feedrank.models.item2item import Item2ItemConfig, Item2ItemModel

DEFAULT_KS = (10, 50, 100)
METRICS_FILE = "metrics.json"
_STATE_COLUMNS = ["user_id", "item_id", "ts", "clicked", "hidden", *USER_CAT_COLUMNS]


@dataclass
class RetrievalEvaluation:
    """Top-k metrics of the model and of popularity, and what was (not) evaluated."""

    ks: list[int]
    model_name: str
    model: dict[str, float]  # {"recall@10": ..., "ndcg@10": ..., ...}
    popularity: dict[str, float]
    counts: dict[str, int]  # users, OOV and dropped-pair counts (see the module docstring)
    split_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form holdout description

    def metrics_file(self) -> dict[str, Any]:
        """The ``eval/metrics.json`` document (``feedrank.evaluate.report.MetricsFile`` schema)."""
        cell = lambda v: {"value": v if math.isfinite(v) else None}  # noqa: E731 (nan is not JSON)
        return {
            "models": {
                self.model_name: {k: cell(v) for k, v in self.model.items()},
                "popularity": {k: cell(v) for k, v in self.popularity.items()},
            },
            "comparisons": [],
            "holdout": {"protocol": "full catalogue, engaged-before-cut excluded", "split_at": self.split_at,
                        "ks": self.ks, **self.counts, **self.extra},
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/metrics.json`` (atomically) and return its path."""
        path = Path(out_dir) / METRICS_FILE
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps(self.metrics_file(), indent=2, allow_nan=False) + "\n")
        return path


# ------------------------------------------------------------------------------------------------
# inputs


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
) -> RetrievalEvaluation:
    """Rank the whole catalogue for ``users`` with ``model`` and with popularity; score the top k.

    ``relevant`` and ``exclude`` are tables of raw ``(user_id, item_id)`` pairs (duplicates are
    fine); every user in them must be one of ``users``. ``model`` must provide ``user_vectors(Batch)``
    and ``item_vectors(item_idx, item_cats, item_age_h)`` (``TwoTower``), or be an ``Item2ItemModel``
    (scored from each user's history). ``at`` is the cut: item
    ages are measured at it. See the module docstring for every definition.
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
    excl_rows, excl_items, _ = _pairs(exclude, users.user_id, vocabs.items, "exclude")
    rel_rows, rel_items, rel_known = _pairs(relevant, users.user_id, vocabs.items, "relevant")
    oov_pairs = relevant.select(["user_id", "item_id"]).filter(pa.array(~rel_known))
    oov_pairs = oov_pairs.group_by(["user_id", "item_id"]).aggregate([])  # distinct pairs
    seen_keys = np.unique(excl_rows * vocabs.n_items + excl_items)
    rel_keys = np.unique(rel_rows[rel_known] * vocabs.n_items + rel_items[rel_known])
    is_seen = np.isin(rel_keys, seen_keys)
    relevant_csr = _csr(rel_keys[~is_seen] // vocabs.n_items, rel_keys[~is_seen] % vocabs.n_items, len(users))

    batches = lambda: user_batches(users, vocabs, chunk_users)  # noqa: E731 (a fresh iterator per ranking)
    if isinstance(model, Item2ItemModel):  # scores from the history alone: no vectors
        columns = torch.from_numpy(rankable)
        score = lambda b: model.score_batch(b)[:, columns]  # noqa: E731
    else:
        item_vecs = catalogue_vectors(model, catalogue, at, rankable)
        score = lambda b: model.user_vectors(b) @ item_vecs.T  # noqa: E731
    with torch.no_grad():
        model_top = _top_items(score, batches(), rankable, excl_rows, excl_items, ks[-1])
    pop = torch.from_numpy(popularity_scores(catalogue, rankable))
    pop_top = _top_items(lambda b: pop.expand(len(b), -1), batches(), rankable, excl_rows, excl_items, ks[-1])

    def metrics(top: np.ndarray) -> dict[str, float]:
        return {name: value for k in ks for name, value in topk_metrics(top, relevant_csr, k).as_dict().items()}

    n_evaluated = int((np.diff(relevant_csr[0]) > 0).sum())
    counts = {
        "n_users": len(users),
        "n_users_evaluated": n_evaluated,
        "n_oov_users": int((~user_known).sum()),
        "n_items_ranked": int(rankable.size),
        "n_relevant": int(rel_keys.size - is_seen.sum()),
        "n_relevant_oov": oov_pairs.num_rows,
        "n_oov_items": len(pc.unique(oov_pairs["item_id"])),
        "n_relevant_seen": int(is_seen.sum()),
    }
    return RetrievalEvaluation(ks=ks, model_name=model_name, model=metrics(model_top), popularity=metrics(pop_top),
                               counts=counts, split_at=at.isoformat())


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


def _csr(rows: np.ndarray, items: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    return indptr, items[order]


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


def _top_items(score: Callable[[Batch], Tensor], batches, rankable: np.ndarray, excl_rows: np.ndarray,
               excl_items: np.ndarray, k: int) -> np.ndarray:  # fmt: skip
    """[n_users, k] item indices ranked best first, excluded items removed; -1 marks an empty slot."""
    column = np.full(int(rankable.max()) + 1, -1, dtype=np.int64)
    column[rankable] = np.arange(rankable.size)
    excl_col = column[np.minimum(excl_items, rankable.max())]
    keep = (excl_items <= rankable.max()) & (excl_col >= 0)
    excl_rows, excl_col = excl_rows[keep], excl_col[keep]
    width = min(k, rankable.size)
    parts = []
    for lo, batch in batches:
        scores = score(batch).float().clone()
        mine = (excl_rows >= lo) & (excl_rows < lo + len(batch))
        scores[torch.from_numpy(excl_rows[mine] - lo), torch.from_numpy(excl_col[mine])] = -math.inf
        top = torch.topk(scores, width, dim=1)
        ids = rankable[top.indices.numpy()]
        ids[torch.isneginf(top.values).numpy()] = -1
        parts.append(np.pad(ids, ((0, 0), (0, k - width)), constant_values=-1))
    return np.concatenate(parts)


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
) -> RetrievalEvaluation:
    """Evaluate on the time holdout ``[split_at, end)`` of the log at ``log_dir``.

    Evaluation users are those with an engagement in the holdout (a random sample of ``max_users``
    of them, fixed by ``seed``, when given); their state is read from the log before ``split_at``.
    """
    before = read_events(log_dir, columns=_STATE_COLUMNS, end=split_at)
    after = read_events(log_dir, columns=_STATE_COLUMNS, start=split_at, end=end)
    engaged_after = after.filter(pc.and_(after["clicked"], pc.invert(after["hidden"])))
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
    result = evaluate_ranking(model, vocabs, catalogue, state, relevant, exclude, split_at, ks, chunk_users, model_name)
    result.extra = {"log": str(Path(log_dir).resolve()), "end": None if end is None else end.isoformat(),
                    "max_users": max_users, "seed": seed, "history_len": history_len}
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
    """``evaluate_holdout`` of a two-tower or item2item bundle; unset arguments come from its run config
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
    else:
        history_len = min(features.get("history_len", 50), cfg.get("two_tower", {}).get("max_history_len", 50))
    result = evaluate_holdout(
        bundle.model, bundle.vocabs, bundle.catalogue, log_dir, at, end=end, history_len=history_len,
        ks=ks or ev.get("ks", DEFAULT_KS), max_users=max_users if max_users is not None else ev.get("max_users"),
        seed=seed if seed is not None else ev.get("seed", 0), chunk_users=ev.get("chunk_users", 1024),
        model_name=bundle.kind,
    )  # fmt: skip
    result.extra["bundle_version"] = bundle.version
    result.write(Path(out_dir) if out_dir is not None else bundle.path.parent / "eval")
    return result
