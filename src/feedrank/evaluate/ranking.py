"""Offline evaluation of a ranker on a time holdout of impressions, against baselines (MIND protocol).

Protocol::

    holdout    the feature build's test split: every impression at or after ``features.split_at``
               with its point-in-time features (what serving knew at that moment) and the
               vocabularies of the training window
    lists      one candidate list per request (a MIND impression line); every model scores every
               candidate of the list, and the click labels say which ones were right
    metrics    per request: group AUC (impression-weighted), MRR, NDCG@5 and NDCG@10 (the MIND
               metrics, ``feedrank.evaluate.metrics``); over all rows: AUC; on probabilities:
               log loss, normalized entropy, ECE and the reliability curve
    intervals  clustered bootstrap (requests, or users) with percentile CIs; every comparison is
               paired: both models on the same resampled requests (``feedrank.evaluate.bootstrap``)
    ties       one rule for every metric: the expected value over a uniformly random order of
               equal scores (``feedrank.evaluate.metrics``; recorded as ``holdout.ties``)
    time spent ``dwell_ndcg@10`` (NDCG with gain = dwell seconds) and ``time_spent@10`` (its DCG:
               the seconds a user who examines rank r with probability 1/log2(r + 1) spends on
               the list as the model orders it, per request, logged dwell), for every model
    slices     the same models on items seen in training vs new items and warm vs cold users
               (in the training vocabulary or not): ``metrics.json`` ``slices``, with each model's
               share of the oracle's lift over random, ``(m - random) / (oracle - random)``

Models (``score__<name>`` columns of ``eval/predictions.parquet``):

- ``ranker``: the click logit at the top slot, corrected for negative down-sampling: what serving
  ranks by. Its probability (``prob__ranker``) is the click probability *of the impression as
  logged*: the position bias of the slot it was shown in is added to the logit before the
  down-sampling correction. That is the only probability the log can check, because examination
  falls with the slot; the top-slot probability of serving is the same model without that term.
- ``two_tower``: the frozen two-tower's ``u . v / T`` alone (when the ranker was trained with one);
- ``popularity``: training-window clicks of the item (ties: impressions); items never seen in
  training rank last, items equal on both stay tied; ``recency``: the item's age at the
  impression, newest first; ``random``: every candidate tied, which under the tie rule is exactly
  the mean over random orders (AUC 0.5), with no sampling noise.
- ``oracle`` (when the log has ``truth/``, a simulated world): ``World.true_affinity x
  World.freshness`` at the impression's time, the world's position-free click utility
  (``feedrank.evaluate.oracle``): the ceiling every share of lift is measured against.
- ``value_dwell_<w>`` (when the holdout has dwell): the ranker's serving value formula
  (``models.ranker.value_score``) with its dwell weight set to 0, the run's and 10x the run's (at
  least 1): what the dwell weight does to the click and time-spent metrics, without retraining.
- ``production`` (``--against``): another bundle (ranker, or two-tower ``u . v / T``) scored on the
  impressions both holdouts contain, with its own features and vocabularies.

Comparisons: ranker against each baseline, and with ``--against`` production against ranker
(``delta = ranker - production``: "is this bundle better than the production model?").

Candidate lists, decisions (each tested):

- **empty**: a request is the set of its logged impressions, so a holdout list cannot be empty; a
  request without a click (or with only clicks) has no defined per-request metric and is skipped
  by them (counted: ``requests_without_click``, ``requests_all_clicked``) while AUC and the
  probability metrics still use its rows. A holdout with no impression, or without both clicks
  and non-clicks, stops with an error naming the feature build.
- **duplicates**: an item shown twice in one request would be ranked against itself and counted
  twice; it is kept once, at its first impression (the one the user saw first), and the dropped
  copies and the clicks on them are counted (``duplicate_rows_dropped``, ``duplicate_clicks_dropped``).
- **not impressions**: rows of requests whose id starts with one of the run's ``exclude_requests``
  prefixes (MIND's ``hist-`` rows: clicks made before the log window, written so that histories
  are complete) were never shown in a list; they feed histories and counters but are neither
  trained on nor evaluated (counted: ``rows_excluded``).
- **unknown ids**: users and items outside the training vocabularies take the OOV (or hash
  bucket) path, exactly as in serving, and stay in the evaluation; their rows are counted
  (``rows_oov_user``, ``rows_oov_item``).

Example::

    result = evaluate_bundle(load_bundle("runs/demo/ranker"))      # writes runs/demo/eval/
    result.evaluation.models["ranker"]["ndcg@10"].value
    [(a, b, c.metric) for a, b, c in result.evaluation.comparisons if c.b_better]   # b beats a, CI above 0
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from feedrank.bundle import Bundle, BundleError, load_bundle
from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.data.collate import BATCH_COLUMNS, collate
from feedrank.data.world import World
from feedrank.evaluate.bootstrap import BootstrapTable, Comparison, Interval, bootstrap_models
from feedrank.evaluate.impressions import impression_rows
from feedrank.evaluate.metrics import TIE_RULE, ReliabilityCurve, reliability_curve
from feedrank.evaluate.oracle import ORACLE, load_truth, oracle_scores
from feedrank.evaluate.retrieval import RANDOM, cell, comparison_row, popularity_baseline, slice_rows
from feedrank.features.build import VOCAB_DIR, FeatureConfig, load_manifest, log_hash, split_files
from feedrank.features.labels import LabelConfig, engagement_labels
from feedrank.features.reuse import ensure_features
from feedrank.features.vocab import FIRST_ID, Vocab, Vocabularies
from feedrank.fsutil import staged_file
from feedrank.models.calibration import correct_logit
from feedrank.models.ranker import HeadWeights, Ranker, value_score

#: Where a run keeps its evaluation (``RUN_DIR/eval/``): ``metrics.json`` and ``predictions.parquet``.
EVAL_DIR = "eval"
RANKING_METRICS = ("auc", "gauc", "mrr", "ndcg@5", "ndcg@10")
PROBABILITY_METRICS = ("log_loss", "ne", "ece")
#: Time spent, the north star: {bootstrap metric on the labels log2(1 + dwell seconds): shown name}.
#: The gain 2**label - 1 is then the dwell itself; dcg@10 is the expected seconds per feed.
DWELL_METRICS = {"ndcg@10": "dwell_ndcg@10", "dcg@10": "time_spent@10"}
#: The metrics shown per slice (items seen/new, warm/cold users).
SLICE_METRICS = ("auc", "gauc", "mrr", "ndcg@10")
RANKER, TWO_TOWER, PRODUCTION = "ranker", "two_tower", "production"
BASELINES = (TWO_TOWER, "popularity", "recency", RANDOM)
PREDICTIONS_FILE, METRICS_FILE = "predictions.parquet", "metrics.json"
_KEY = ("request_id", "item_id")  # one row per candidate of a list, after de-duplication
_ROW_COLUMNS = (*BATCH_COLUMNS, "ts", "user_id", "item_id", "request_id")


@dataclass
class RankingEvalConfig:
    """The holdout evaluation of a ranker (YAML section ``eval`` of a ranking run)."""

    n_resamples: int = 200  # bootstrap replicates (pooled AUC and ECE re-sort rows: ~10 ms per 100k rows each)
    level: float = 0.95
    cluster: Literal["request", "user"] = "request"  # the unit the bootstrap resamples
    seed: int = 0  # bootstrap, request sample and the random baseline
    max_requests: int | None = None  # a fixed random sample of holdout requests (None = all)
    batch_size: int = 8192  # rows scored at once
    calibration_bins: int = 10

    def validate(self) -> None:
        if self.n_resamples < 1 or self.batch_size < 1 or self.calibration_bins < 1:
            raise ValueError("n_resamples, batch_size and calibration_bins must be >= 1")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {self.level}")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1 or null, got {self.max_requests}")


# ------------------------------------------------------------------------------------------------
# the holdout


class EmptyHoldout(ValueError):
    """The holdout has no impression, or lacks clicks or non-clicks: there is nothing to rank."""


@dataclass
class Holdout:
    """The test impressions of one feature build, one row per (request, item), in log order."""

    rows: pa.Table  # example rows: the Batch columns plus ts, user_id, item_id, request_id
    counts: dict[str, int]  # what was dropped, skipped or sent down the OOV path (module docstring)
    features_dir: Path
    split_at: str | None
    warm_user: np.ndarray  # [rows] bool: the user is in the training vocabulary (else cold: the OOV path)
    seen_item: np.ndarray  # [rows] bool: the item is in the training vocabulary (else new)
    log_dir: Path | None = None  # the log the features were built from (its truth/ gives the oracle)

    @property
    def labels(self) -> np.ndarray:
        return self.column("clicked").astype(np.float64)

    def column(self, name: str) -> np.ndarray:
        return self.rows[name].to_numpy(zero_copy_only=False)

    def take(self, indices: np.ndarray) -> Holdout:
        return Holdout(self.rows.take(pa.array(indices)), self.counts, self.features_dir, self.split_at,
                       self.warm_user[indices], self.seen_item[indices], self.log_dir)  # fmt: skip


def _known(vocab: Vocab, idx: np.ndarray) -> np.ndarray:
    return (idx >= FIRST_ID) & (idx < FIRST_ID + len(vocab.ids))


def load_holdout(features_dir: str | Path, vocabs: Vocabularies, max_requests: int | None = None, seed: int = 0,
                 exclude_prefixes: Sequence[str] = ()) -> Holdout:  # fmt: skip
    """The test split of ``features_dir`` as candidate lists (decisions in the module docstring).

    ``max_requests`` keeps a random sample of that many requests (fixed by ``seed``); rows of
    requests named by ``exclude_prefixes`` are not impressions (``impression_rows``) and are left out.
    """
    features_dir = Path(features_dir)
    manifest = load_manifest(features_dir)
    if "test" not in manifest["splits"] or manifest["splits"]["test"]["rows"] == 0:
        raise EmptyHoldout(f"{features_dir}: no test impressions (features.split_at = {manifest['split_at']}): "
                         "set a split_at inside the log to hold out its last days")  # fmt: skip
    columns = list(_ROW_COLUMNS) + manifest["columns"].get("cross_counters", [])
    every = pa.concat_tables(pq.read_table(f, columns=columns) for f in split_files(features_dir, "test"))
    rows = impression_rows(every, exclude_prefixes)
    if rows.num_rows == 0:
        raise EmptyHoldout(f"{features_dir}: all {every.num_rows} test rows belong to excluded requests {list(exclude_prefixes)}")
    if max_requests is not None:
        requests = pc.unique(rows["request_id"])
        if len(requests) > max_requests:
            pick = np.random.default_rng(seed).choice(len(requests), max_requests, replace=False)
            rows = rows.filter(pc.is_in(rows["request_id"], value_set=requests.take(pa.array(np.sort(pick)))))
    first = (rows.append_column("_row", pa.array(np.arange(rows.num_rows)))
             .group_by(list(_KEY), use_threads=False).aggregate([("_row", "min")])["_row_min"])  # fmt: skip
    keep = np.sort(first.to_numpy())
    clicked = rows["clicked"].to_numpy(zero_copy_only=False)
    deduped = rows.take(pa.array(keep))
    labels = clicked[keep]
    request = deduped["request"].to_numpy()
    _, code = np.unique(request, return_inverse=True)
    clicks, size = np.bincount(code, weights=labels), np.bincount(code)
    warm_user = _known(vocabs.users, deduped["user_idx"].to_numpy())
    seen_item = _known(vocabs.items, deduped["item_idx"].to_numpy())
    counts = {
        "impressions": deduped.num_rows,
        "rows_excluded": every.num_rows - rows.num_rows,
        "requests": int(size.size),
        "clicks": int(labels.sum()),
        "duplicate_rows_dropped": rows.num_rows - keep.size,
        "duplicate_clicks_dropped": int(clicked.sum() - labels.sum()),
        "requests_without_click": int((clicks == 0).sum()),
        "requests_all_clicked": int((clicks == size).sum()),
        "rows_oov_user": int((~warm_user).sum()),
        "rows_oov_item": int((~seen_item).sum()),
    }
    if counts["clicks"] in (0, counts["impressions"]):
        raise EmptyHoldout(f"{features_dir}: the holdout has {counts['clicks']} click(s) in {counts['impressions']} "
                         "impressions: AUC and the ranking metrics need both clicks and non-clicks")  # fmt: skip
    source = manifest.get("source_log")
    return Holdout(deduped, counts, features_dir, manifest["split_at"], warm_user, seen_item,
                   None if source is None else Path(source))  # fmt: skip


def align(a: Holdout, b: Holdout) -> tuple[np.ndarray, np.ndarray]:
    """Row indices into ``a`` and ``b`` of the impressions both hold (by request and item), in ``a``'s order."""
    left = pa.table({k: a.rows[k] for k in _KEY}).append_column("_a", pa.array(np.arange(a.rows.num_rows)))
    right = pa.table({k: b.rows[k] for k in _KEY}).append_column("_b", pa.array(np.arange(b.rows.num_rows)))
    joined = left.join(right, keys=list(_KEY), join_type="inner", use_threads=False).sort_by("_a")
    return joined["_a"].to_numpy(), joined["_b"].to_numpy()


# ------------------------------------------------------------------------------------------------
# scoring

Scorer = Callable[[Batch], dict[str, Tensor]]


@dataclass
class RankerScorer:
    """Score example batches with a ranker (and the frozen two-tower that feeds it, if any).

    Returns per row: ``score`` (corrected top-slot click logit), ``prob`` (click probability of the
    logged impression, see the module docstring), the serving ``click``/``share``/``hide``
    probabilities and ``value``, and ``two_tower`` (``u . v / T``) when a two-tower is attached.
    """

    model: Ranker
    two_tower: torch.nn.Module | None = None

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        self.model.eval()
        user_vec = item_vec = None
        out = {}
        if self.two_tower is not None:
            self.two_tower.eval()
            user_vec = self.two_tower.user_vectors(batch)
            item_vec = self.two_tower.batch_item_vectors(batch)  # its titles too, when it reads them
            out[TWO_TOWER] = (user_vec * item_vec).sum(-1) / self.two_tower.temperature()
        heads = self.model.batch_heads(batch, user_vec, item_vec)
        rate = self.model.cfg.negative_rate
        click = correct_logit(heads["click"].float(), rate)
        logged = correct_logit(heads["click"].float() + self.model.position_logit(batch.position), rate)
        return out | self.model.predictions(heads) | {"score": click, "prob": torch.sigmoid(logged)}


@dataclass
class TwoTowerScorer:
    """Score example batches with a two-tower alone: ``score = u . v / T`` (no probability)."""

    model: torch.nn.Module

    @torch.no_grad()
    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        self.model.eval()
        return {"score": self.model.score(batch)}


def score_rows(rows: pa.Table, scorer: Scorer, batch_size: int = 8192, max_history: int | None = None) -> dict[str, np.ndarray]:
    """Every output of ``scorer`` for every row of ``rows`` (example columns), as float64 arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    cross = scorer.model.cross_counters if isinstance(scorer, RankerScorer) else ()
    for lo in range(0, rows.num_rows, batch_size):
        for name, values in scorer(collate(rows.slice(lo, batch_size), max_history, cross_counters=cross)).items():
            parts.setdefault(name, []).append(values.detach().float().cpu().numpy().astype(np.float64))
    return {name: np.concatenate(p) for name, p in parts.items()}


def baseline_scores(rows: pa.Table, catalogue: pa.Table) -> dict[str, np.ndarray]:
    """``popularity``, ``recency`` and ``random`` scores of ``rows`` (definitions: module docstring)."""
    item = rows["item_idx"].to_numpy()
    rankable = np.flatnonzero(catalogue["item_id"].is_valid().to_numpy(zero_copy_only=False))
    popularity = np.zeros(catalogue.num_rows, dtype=np.float64)  # items outside the vocabulary: last
    popularity[rankable] = popularity_baseline(catalogue, rankable)
    return {
        "popularity": popularity[item],
        "recency": -rows["item_age_h"].to_numpy().astype(np.float64),
        "random": np.zeros(rows.num_rows),  # all tied: the tie rule makes it the exact mean of random orders
    }


def bundle_scorer(bundle: Bundle) -> tuple[Scorer, int | None]:
    """A scorer for a saved bundle (ranker or two-tower) and the history length it reads."""
    if bundle.kind == "ranker":
        two_tower = linked_two_tower(bundle)
        return RankerScorer(bundle.model, None if two_tower is None else two_tower.model), bundle.model.cfg.max_history_len
    if bundle.kind == "two_tower":
        return TwoTowerScorer(bundle.model), bundle.config.get("two_tower", {}).get("max_history_len")
    raise BundleError(f"{bundle.path}: cannot rank impressions with a {bundle.kind!r} bundle")


def linked_two_tower(bundle: Bundle) -> Bundle | None:
    """The two-tower bundle a ranker was trained on, checked to be the very same version."""
    link = bundle.meta.get("sources", {}).get("two_tower")
    if link is None:
        return None
    two_tower = load_bundle(link["path"])
    if two_tower.version != link["version"]:
        raise BundleError(f"{bundle.path}: it was trained on two-tower version {link['version'][:12]} but "
                          f"{link['path']} now holds {two_tower.version[:12]}; retrain the ranker")  # fmt: skip
    return two_tower


# ------------------------------------------------------------------------------------------------
# metrics


@dataclass
class RankingEvaluation:
    """Metric intervals per model, paired comparisons, calibration, slices, and what the holdout held."""

    models: dict[str, dict[str, Interval]]
    comparisons: list[tuple[str, str, Comparison]]  # (a, b, B against A)
    reliability: dict[str, ReliabilityCurve]
    holdout: dict[str, Any] = field(default_factory=dict)
    slices: list[dict[str, Any]] = field(default_factory=list)  # ``retrieval.slice_rows`` of each slice

    def metrics_file(self) -> dict[str, Any]:
        """The ``eval/metrics.json`` document (``feedrank.evaluate.report.MetricsFile`` schema)."""
        return {
            "models": {m: {k: cell(i.value, i.ci) for k, i in cells.items()} for m, cells in self.models.items()},
            "comparisons": [comparison_row(a, b, c) for a, b, c in self.comparisons],
            "holdout": self.holdout,
            "slices": self.slices,
        }


def _renamed(table: BootstrapTable, names: Mapping[str, str], pairs: Sequence[tuple[str, str]]
             ) -> tuple[dict[str, dict[str, Interval]], list[tuple[str, str, Comparison]]]:  # fmt: skip
    """The intervals and comparisons of ``table`` under the shown metric ``names``."""
    models = {m: {shown: dataclasses.replace(table.interval(m, k), metric=shown) for k, shown in names.items()}
              for m in table.models}  # fmt: skip
    comparisons = [(a, b, dataclasses.replace(c, metric=names[c.metric]))
                   for a, b in pairs if {a, b} <= set(table.models) for c in table.compare(a, b) if c.metric in names]  # fmt: skip
    return models, comparisons


def compute_evaluation(
    labels: np.ndarray,
    requests: np.ndarray,
    clusters: np.ndarray,
    scores: Mapping[str, np.ndarray],
    probs: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    cfg: RankingEvalConfig,
    progress: bool = False,
    dwell: np.ndarray | None = None,
) -> RankingEvaluation:
    """Bootstrap every model's metrics on the same resamples and compare each ``(a, b)`` pair.

    Ranking metrics use ``scores``, probability metrics ``probs``; a pair is compared on every
    metric both of its models have. With ``dwell`` (seconds per row), the time-spent metrics
    (``DWELL_METRICS``) too. With an ``oracle`` and a ``random`` model among ``scores``, the
    ``all`` slice gives every model's share of the oracle's lift.
    """
    options = dict(n_resamples=cfg.n_resamples, level=cfg.level, seed=cfg.seed, clusters=clusters, progress=progress)
    # The score tables rank the same models, so they also give the oracle's lift; probabilities do not.
    ranked = [(bootstrap_models(labels, dict(scores), requests, RANKING_METRICS, **options), {m: m for m in RANKING_METRICS})]
    if dwell is not None:
        gains = np.log2(1.0 + np.maximum(dwell, 0.0))
        ranked.append((bootstrap_models(gains, dict(scores), requests, list(DWELL_METRICS), **options), DWELL_METRICS))
    tables = list(ranked)
    if probs:
        tables.append((bootstrap_models(labels, dict(probs), requests, PROBABILITY_METRICS, **options),
                       {m: m for m in PROBABILITY_METRICS}))  # fmt: skip
    models: dict[str, dict[str, Interval]] = {m: {} for m in scores}
    comparisons: list[tuple[str, str, Comparison]] = []
    for table, names in tables:
        cells, compared = _renamed(table, names, pairs)
        for model, values in cells.items():
            models[model] |= values
        comparisons += compared
    reliability = {m: reliability_curve(labels, p, n_bins=cfg.calibration_bins) for m, p in probs.items()}
    counts = {"impressions": int(labels.size), "clicks": int(labels.sum()), "ctr": float(labels.mean())}
    slices = [slice_rows("all", 1.0, ranked, counts, ORACLE if ORACLE in scores else None)]
    return RankingEvaluation(models, comparisons, reliability, slices=slices)


def slice_evaluation(labels: np.ndarray, requests: np.ndarray, clusters: np.ndarray, scores: Mapping[str, np.ndarray],
                     masks: Mapping[str, np.ndarray], cfg: RankingEvalConfig) -> list[dict[str, Any]]:  # fmt: skip
    """``SLICE_METRICS`` of every model on each slice of rows (``masks``: name -> [rows] bool).

    A slice keeps its rows only, so a request's list shrinks to its rows in the slice: on "new
    items" the per-request metrics say how well a model orders new items among themselves, AUC
    how well it separates their clicks. A slice without both clicks and non-clicks is reported
    empty."""
    oracle = ORACLE if ORACLE in scores else None
    out = []
    for name, mask in masks.items():
        y = labels[mask]
        counts = {"impressions": int(mask.sum()), "clicks": int(y.sum()), "ctr": float(y.mean()) if y.size else 0.0}
        if y.size == 0 or y.min() == y.max():
            out.append({"slice": name, "share": float(mask.mean()), "counts": counts, "models": {}, "lift_share": {}})
            continue
        table = bootstrap_models(y, {m: s[mask] for m, s in scores.items()}, requests[mask], SLICE_METRICS,
                                 n_resamples=cfg.n_resamples, level=cfg.level, seed=cfg.seed, clusters=clusters[mask])  # fmt: skip
        out.append(slice_rows(name, float(mask.mean()), [(table, {m: m for m in SLICE_METRICS})], counts, oracle))
    return out


# ------------------------------------------------------------------------------------------------
# end to end: a ranker on a holdout, a saved bundle on a log


@dataclass
class RankingResult:
    """An evaluation and the per-impression predictions behind it (the report's inputs)."""

    evaluation: RankingEvaluation
    predictions: pa.Table

    def write(self, eval_dir: str | Path) -> Path:
        """Write ``predictions.parquet`` and ``metrics.json`` to ``eval_dir`` (each atomically)."""
        out = Path(eval_dir)
        with staged_file(out / PREDICTIONS_FILE) as tmp:
            pq.write_table(self.predictions, tmp)
        with staged_file(out / METRICS_FILE) as tmp:
            tmp.write_text(json.dumps(self.evaluation.metrics_file(), indent=2, allow_nan=False) + "\n")
        return out / METRICS_FILE


def evaluate_ranker(
    scorer: RankerScorer,
    catalogue: pa.Table,
    holdout: Holdout,
    cfg: RankingEvalConfig,
    *,
    production: tuple[Scorer, int | None, Holdout] | None = None,
    truth: World | None = None,
    progress: bool = False,
) -> RankingResult:
    """Score ``holdout`` with the ranker and the baselines (and ``production``: its scorer, history
    length and own holdout), bootstrap the metrics and compare (module docstring).

    ``truth`` (default: the world of the holdout's source log, when it has ``truth/``) adds the
    ``oracle`` model and every model's share of its lift, overall and by slice."""
    counts = dict(holdout.counts)
    outputs_of_production = None
    if production is not None:
        prod_scorer, prod_history, prod_holdout = production
        mine, theirs = align(holdout, prod_holdout)
        if mine.size == 0:
            raise ValueError("this bundle's and the production bundle's holdouts share no impression")
        counts["rows_not_in_production_holdout"] = holdout.rows.num_rows - mine.size
        holdout = holdout.take(mine)
        outputs_of_production = score_rows(prod_holdout.rows.take(pa.array(theirs)), prod_scorer, cfg.batch_size, prod_history)
    rows = holdout.rows
    out = score_rows(rows, scorer, cfg.batch_size, scorer.model.cfg.max_history_len)
    scores = {RANKER: out["score"]}
    if TWO_TOWER in out:
        scores[TWO_TOWER] = out[TWO_TOWER]
    scores |= baseline_scores(rows, catalogue)
    world = truth if truth is not None else (load_truth(holdout.log_dir) if holdout.log_dir is not None else None)
    if world is not None:
        scores[ORACLE] = oracle_scores(world, rows["user_id"], rows["item_id"], rows["ts"].cast(pa.int64()).to_numpy())
    probs = {RANKER: out["prob"]}
    pairs = [(baseline, RANKER) for baseline in scores if baseline != RANKER]
    dwell = holdout.column("dwell_s").astype(np.float64)
    timed = bool((dwell > 0).any())  # MIND has no dwell: no time-spent metrics rather than constant zeros
    if timed:
        scores |= value_rows(out, scorer.model.cfg.value)
    if outputs_of_production is not None:
        scores[PRODUCTION] = outputs_of_production["score"]
        if "prob" in outputs_of_production:
            probs[PRODUCTION] = outputs_of_production["prob"]
        pairs.insert(0, (PRODUCTION, RANKER))

    labels, requests = holdout.labels, holdout.column("request")
    clusters = requests if cfg.cluster == "request" else np.unique(holdout.column("user_id"), return_inverse=True)[1]
    evaluation = compute_evaluation(labels, requests, clusters, scores, probs, pairs, cfg, progress,
                                    dwell=dwell if timed else None)  # fmt: skip
    masks = {"items seen in training": holdout.seen_item, "new items": ~holdout.seen_item,
             "warm users": holdout.warm_user, "cold users": ~holdout.warm_user}  # fmt: skip
    evaluation.slices += slice_evaluation(labels, requests, clusters, scores, masks, cfg)
    evaluation.holdout = {
        "protocol": "MIND: candidate lists = requests; AUC pooled, GAUC/MRR/NDCG per request",
        "ties": TIE_RULE, "oracle": "world truth: true_affinity x freshness" if world is not None else "none (no truth/)",
        "time_spent": ("dwell_ndcg@10: NDCG with gain = dwell seconds; time_spent@10: its DCG, seconds per feed"
                       if timed else "not measured: no impression of the holdout has a dwell time"),
        "split_at": holdout.split_at, "features": str(holdout.features_dir), **counts,
        "bootstrap": f"{cfg.n_resamples} resamples of {cfg.cluster}s, {cfg.level:.0%} percentile intervals",
        "negative_rate": scorer.model.cfg.negative_rate,
    }  # fmt: skip
    return RankingResult(evaluation, predictions_table(holdout, scores, probs))


def dwell_weights(configured: float) -> list[float]:
    """The value formula's dwell weights evaluation tries: none, the run's, and ten times it (at
    least 1: dwell weighing like a click)."""
    return sorted({0.0, configured, max(10.0 * configured, 1.0)})


def value_rows(outputs: Mapping[str, np.ndarray], weights: HeadWeights) -> dict[str, np.ndarray]:
    """``value_dwell_<w>``: the ranker's serving value formula (``models.ranker.value_score``) with
    its dwell weight set to each of ``dwell_weights``, the rest as configured: what the dwell weight
    does to the click and the time-spent metrics, without retraining."""
    preds = {head: outputs[head] for head in ("click", "dwell", "share", "hide")}
    return {f"value_dwell_{w:g}": np.asarray(value_score(preds, dataclasses.replace(weights, dwell=w)), dtype=np.float64)
            for w in dwell_weights(weights.dwell)}  # fmt: skip


def predictions_table(holdout: Holdout, scores: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray]) -> pa.Table:
    """``eval/predictions.parquet`` in the report's layout (``feedrank.evaluate.report``)."""
    rows = holdout.rows
    return pa.table({
        "request": rows["request"], "request_id": rows["request_id"], "user_id": rows["user_id"],
        "item_id": rows["item_id"], "position": rows["position"], "label": rows["clicked"].cast(pa.int8()),
        "history_len": pc.list_value_length(rows["history"]).cast(pa.int64()),
        "dwell_s": rows["dwell_s"], "seen_item": pa.array(holdout.seen_item), "warm_user": pa.array(holdout.warm_user),
        **{f"score__{m}": s for m, s in scores.items()}, **{f"prob__{m}": p for m, p in probs.items()},
    })  # fmt: skip


def holdout_for(bundle: Bundle, log_dir: str | Path | None, work_dir: str | Path, cfg: RankingEvalConfig,
                exclude_prefixes: Sequence[str] = (), progress: bool = False) -> Holdout:  # fmt: skip
    """The holdout of ``bundle`` on ``log_dir`` (default: the log it was trained on).

    The bundle's own feature build is used when it is still there and was built from this exact
    log; otherwise the log is built again under the bundle's feature config in
    ``work_dir/features-<version>``. The vocabularies must come out identical (the log may only
    differ after ``split_at``): the weights index them.
    """
    sources = bundle.meta.get("sources", {})
    if log_dir is None:
        if "log" not in sources:
            raise ValueError(f"{bundle.path}: the bundle records no source log; give one (--log)")
        log_dir = sources["log"]
    log_dir = Path(log_dir)
    recorded = Path(sources["features"]) if "features" in sources else None
    try:
        manifest = load_manifest(recorded) if recorded is not None else None
    except (FileNotFoundError, ValueError):
        manifest = None
    if (manifest is not None and manifest["content_hash"] == sources.get("features_hash")
            and manifest["source_hash"] == log_hash(log_dir)):  # fmt: skip
        features_dir = recorded
    else:
        features_dir = Path(work_dir) / f"features-{bundle.version[:12]}"
        ensure_features(log_dir, features_dir, from_dict(FeatureConfig, bundle.config.get("features"), "features"), progress)
        if Vocabularies.load(features_dir / VOCAB_DIR) != bundle.vocabs:
            raise ValueError(f"{log_dir}: its training window (before split_at) differs from the one {bundle.path} was "
                             "trained on, so the vocabularies differ; evaluate on that log or one that only adds "
                             "events after split_at")  # fmt: skip
    return load_holdout(features_dir, bundle.vocabs, cfg.max_requests, cfg.seed, exclude_prefixes)


def evaluate_bundle(
    bundle: Bundle,
    log_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    against: Bundle | None = None,
    cfg: RankingEvalConfig | None = None,
    progress: bool = False,
) -> RankingResult:
    """Evaluate a ranker bundle (module docstring) and write ``RUN_DIR/eval/`` (default RUN_DIR: the
    folder holding the bundle). ``cfg`` defaults to the bundle's run config ``eval`` section."""
    if bundle.kind != "ranker":
        raise BundleError(f"{bundle.path}: a {bundle.kind!r} bundle; `evaluate ranking` needs a ranker bundle")
    cfg = cfg or from_dict(RankingEvalConfig, bundle.config.get("eval"), "eval")
    run_dir = Path(run_dir) if run_dir is not None else bundle.path.parent
    exclude = bundle.config.get("exclude_requests", [])
    holdout = holdout_for(bundle, log_dir, run_dir / EVAL_DIR, cfg, exclude, progress)
    production = None
    if against is not None:
        prod_scorer, prod_history = bundle_scorer(against)
        prod_holdout = holdout_for(against, log_dir or holdout_log(bundle), run_dir / EVAL_DIR, cfg, exclude, progress)
        production = (prod_scorer, prod_history, prod_holdout)
    scorer, _ = bundle_scorer(bundle)
    result = evaluate_ranker(scorer, bundle.catalogue, holdout, cfg, production=production, progress=progress)
    result.evaluation.holdout["bundle_version"] = bundle.version
    if against is not None:
        result.evaluation.holdout["production"] = f"{against.path} ({against.kind}, version {against.version[:12]})"
    result.write(run_dir / EVAL_DIR)
    return result


def holdout_log(bundle: Bundle) -> str | None:
    """The log a bundle was trained on, as recorded in it."""
    return bundle.meta.get("sources", {}).get("log")


# ------------------------------------------------------------------------------------------------
# an offline check of a label-weighting change


#: What a product cares about, per task: (metric name, label, prediction of the ranker).
TASK_METRICS = (("click auc", "clicked", "click"), ("share auc", "shared", "share"), ("hide auc", "hidden", "hide"))


def value_gain(rows: pa.Table, labels: LabelConfig) -> np.ndarray:
    """Graded NDCG labels whose gain ``2**g - 1`` is the impression's realized value under ``labels``
    (the engagement weight of a positive, 0 for a negative): ``g = log2(1 + value)``."""
    col = lambda name: rows[name].to_numpy(zero_copy_only=False)  # noqa: E731
    label, weight = engagement_labels(col("clicked"), col("dwell_s"), col("shared"), col("hidden"), labels)
    return np.log2(1.0 + label.astype(np.float64) * weight)


@dataclass
class WeightingComparison:
    """B against A on the per-task metrics; ``skipped`` names metrics the holdout cannot define."""

    comparisons: list[Comparison]
    skipped: dict[str, str]
    holdout: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"comparisons": [c.as_dict() for c in self.comparisons], "skipped": self.skipped, "holdout": self.holdout}


def compare_weightings(
    holdout: Holdout,
    outputs_a: Mapping[str, np.ndarray],
    outputs_b: Mapping[str, np.ndarray],
    labels_a: LabelConfig,
    labels_b: LabelConfig,
    cfg: RankingEvalConfig,
) -> WeightingComparison:
    """Rankers A and B (``RankerScorer`` outputs on the same ``holdout`` rows) on click, share and
    hide AUC and on NDCG@10 of value, value measured under A's and under B's label config.

    Every metric bootstraps the same requests with the same seed, so each delta is paired.
    """
    requests = holdout.column("request")
    clusters = requests if cfg.cluster == "request" else np.unique(holdout.column("user_id"), return_inverse=True)[1]
    tasks = [(name, holdout.column(label).astype(np.float64), pred, "auc") for name, label, pred in TASK_METRICS]
    tasks += [(f"value ndcg@10 ({which})", value_gain(holdout.rows, lab), "value", "ndcg@10")
              for which, lab in (("labels A", labels_a), ("labels B", labels_b))]  # fmt: skip
    comparisons, skipped = [], {}
    for name, y, pred, metric in tasks:
        if metric == "auc" and y.min() == y.max():
            skipped[name] = f"the holdout has {'only' if y.min() else 'no'} positives"
            continue
        if metric != "auc" and not y.any():
            skipped[name] = "no impression in the holdout has a positive value"
            continue
        table = bootstrap_models(y, {"A": outputs_a[pred], "B": outputs_b[pred]}, requests, [metric],
                                 n_resamples=cfg.n_resamples, level=cfg.level, seed=cfg.seed, clusters=clusters)  # fmt: skip
        (c,) = table.compare("A", "B")
        comparisons.append(Comparison(name, c.value_a, c.value_b, c.delta, c.ci, c.p_value, c.level,
                                      c.higher_is_better, c.n_resamples))  # fmt: skip
    return WeightingComparison(comparisons, skipped, {"split_at": holdout.split_at, **holdout.counts})
