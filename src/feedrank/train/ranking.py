"""The ranking training task: event log (and optionally a two-tower bundle) in, evaluated ranker bundle out.

``train_ranking(log_dir, out_dir, cfg, two_tower_bundle)`` follows the retrieval task step by step
and shares its parts (``feedrank.train.task``)::

    config     features/labels not set -> the two-tower bundle's (one feature build, one vocabulary);
               ranker.two_tower_dim from the two-tower's vector size
    features   ensure_features -> OUT/features       (the retrieval build is reused when it matches)
    sample     every clicked training impression, each other one with probability
               ranker.negative_rate -> OUT/ranking_sample  (once per run; seed loader.seed; rows of
               exclude_requests, which are not impressions, dropped)
    model      Ranker (bundle kind "ranker") sized by the vocabularies
    train      Trainer -> OUT/train/ranking          (ranker_loss, the frozen two-tower bound to it)
    evaluate   the test split vs two-tower / popularity / recency / random -> OUT/eval/ (report layout)
    bundle     save_bundle -> OUT/ranker             (sources: log, features, sample, two-tower version)

**Down-sampling.** Click logs are mostly negatives; keeping a share ``negative_rate`` of them cuts
the epoch by about that factor. The ranker knows its rate (``RankerConfig.negative_rate``, the one
home of the setting) and corrects its click logit by ``log(rate)`` at prediction
(``feedrank.models.calibration``), so its probabilities estimate un-sampled traffic.

**Label weights.** The ranker learns each engagement with its own head (``ranker_loss``), so
the label config cannot decide what a positive is, as it does for retrieval. It weighs examples
*within* a click class instead: a row's weight is its ``engagement_labels`` weight divided by the
mean weight of the training rows of its class (clicked or not). A long read or a share then pulls
harder on every head than a short click, and a hide more than a plain skip, while each class keeps
its total weight: the click head still estimates the click rate, which the down-sampling correction
and the value formula rely on. (Share and hide probabilities are not re-normalised this way: under a
weighting that favours them they are relative scores.)

Also here: ``compare_label_weightings`` (train under two label configs, compare on the holdout:
``feedrank evaluate weights``) and ``run_pipeline`` (two-tower -> ranker -> evaluation -> report in
one run directory: what ``feedrank demo`` runs).

Example::

    cfg = load_ranking_config("configs/ranking_demo.yaml")
    bundle = train_ranking("runs/world_demo", "runs/demo", cfg, two_tower_bundle="runs/demo/bundle")
    bundle.metrics["eval"]["models"]["ranker"]["ndcg@10"]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from feedrank.bundle import Bundle, attach_titles, build_ranker, load_bundle, save_bundle
from feedrank.config import ConfigError, from_dict, load_yaml, to_dict
from feedrank.data.collate import Collator
from feedrank.evaluate.ranking import (
    EmptyHoldout,
    RankerScorer,
    RankingEvalConfig,
    RankingResult,
    WeightingComparison,
    align,
    compare_weightings,
    evaluate_ranker,
    impression_rows,
    load_holdout,
    score_rows,
)
from feedrank.evaluate.report import write_report
from feedrank.features.build import (
    VOCAB_DIR,
    FeatureConfig,
    NotTrainableError,
    check_trainable,
    load_manifest,
    split_files,
)
from feedrank.features.labels import LabelConfig, engagement_labels
from feedrank.fsutil import staged_dir
from feedrank.features.vocab import Vocabularies
from feedrank.models.calibration import downsample_negatives
from feedrank.models.ranker import Ranker, RankerConfig, ranker_loss
from feedrank.progress import progress as progress_bar
from feedrank.train import distributed as D
from feedrank.train.checkpoint import load_model_state
from feedrank.train.retrieval import RetrievalRunConfig, train_retrieval
from feedrank.train.task import (
    EVAL_DIR,
    FEATURES_DIR,
    LoaderConfig,
    Preempted,
    batch_limits,
    ensure_features,
    epoch_batches,
    require_fresh_run,
    train_dir,
    training_catalogue,
)
from feedrank.train.trainer import Trainer, TrainConfig

log = logging.getLogger(__name__)

TASK, BUNDLE_DIR, SAMPLE_DIR = "ranking", "ranker", "ranking_sample"
SAMPLE_MANIFEST = "sample.json"


@dataclass
class RankingRunConfig:
    """Everything one ranking run needs; one YAML file, one section per part.

    ``features`` and ``labels`` left out (null) are taken from the two-tower bundle the ranker is
    trained with, so the two models share one feature build and one vocabulary (the two-tower's
    vectors are looked up by those indices); without a two-tower, ``features`` must be set and
    ``labels`` default to ``LabelConfig()``. ``train.out_dir`` is ignored (``OUT/train/ranking``).
    """

    features: FeatureConfig | None = None
    labels: LabelConfig | None = None
    #: request_id prefixes of rows that are not impressions (MIND: "hist-"): they feed histories and
    #: counters but are neither trained on nor evaluated (``feedrank.evaluate.ranking.impression_rows``)
    exclude_requests: list[str] = field(default_factory=list)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    eval: RankingEvalConfig = field(default_factory=RankingEvalConfig)


def load_ranking_config(path: str | Path) -> RankingRunConfig:
    """A ``RankingRunConfig`` from YAML; an unknown key or a wrong type raises ``ConfigError``."""
    return load_yaml(RankingRunConfig, path)


def resolve_config(cfg: RankingRunConfig, two_tower: Bundle | None) -> RankingRunConfig:
    """``cfg`` with every inherited setting filled in (see ``RankingRunConfig``); what is saved in
    the bundle, so evaluation and serving never need the two-tower's config to read it."""
    features, labels, ranker = cfg.features, cfg.labels, cfg.ranker
    if two_tower is None:
        if features is None:
            raise ConfigError("features: not set, and there is no two-tower bundle to take it from (--two-tower)")
        if ranker.two_tower_dim:
            raise ConfigError(f"ranker.two_tower_dim is {ranker.two_tower_dim} but no two-tower bundle was given (--two-tower)")
        return dataclasses.replace(cfg, labels=labels or LabelConfig())
    if two_tower.kind != "two_tower":
        raise ConfigError(f"--two-tower {two_tower.path}: a {two_tower.kind!r} bundle, expected a two_tower one")
    dim = two_tower.model.cfg.dim
    if ranker.two_tower_dim not in (0, dim):
        raise ConfigError(f"ranker.two_tower_dim is {ranker.two_tower_dim} but the two-tower at {two_tower.path} has dim {dim}")
    return dataclasses.replace(
        cfg,
        features=features or from_dict(FeatureConfig, two_tower.config.get("features"), "features"),
        labels=labels or from_dict(LabelConfig, two_tower.config.get("labels"), "labels"),
        ranker=dataclasses.replace(ranker, two_tower_dim=dim),
    )


# ------------------------------------------------------------------------------------------------
# down-sampled training data and its label weights


def sample_training_split(features_dir: Path, out_dir: Path, rate: float, seed: int,
                          exclude_prefixes: Sequence[str] = (), progress: bool = True) -> list[Path]:  # fmt: skip
    """The train split's impressions (``impression_rows``) with every clicked row and each other row
    kept with probability ``rate``; the split's own files when there is nothing to drop. Written once
    to ``out_dir`` and reused while the feature build, rate, seed and prefixes are the same. Each
    file draws from its own seeded stream."""
    files = split_files(features_dir, "train")
    if rate == 1.0 and not exclude_prefixes:
        return files
    manifest = load_manifest(features_dir)
    wanted = {"features_hash": manifest["content_hash"], "negative_rate": rate, "seed": seed,
              "exclude_requests": list(exclude_prefixes)}  # fmt: skip
    try:
        done = json.loads((out_dir / SAMPLE_MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        done = {}
    if {k: done.get(k) for k in wanted} == wanted:
        return [out_dir / f["path"] for f in done["files"]]
    with staged_dir(out_dir) as tmp:
        written = []
        for i, path in enumerate(progress_bar(files, desc="sample negatives", unit="file", enabled=progress)):
            table = impression_rows(pq.read_table(path), exclude_prefixes)
            keep = downsample_negatives(table["clicked"].to_numpy(zero_copy_only=False), rate, np.random.default_rng([seed, i]))
            pq.write_table(table.filter(pa.array(keep)), tmp / path.name, row_group_size=manifest["config"]["row_group_size"])
            written.append({"path": path.name, "rows": int(keep.sum()), "impressions": table.num_rows})
        (tmp / SAMPLE_MANIFEST).write_text(json.dumps(wanted | {"files": written}, indent=2) + "\n")
    return [out_dir / f["path"] for f in written]


@dataclass
class RankerLabelWeights:
    """Collator weight hook (picklable, for DataLoader workers): the ``engagement_labels`` weight
    over its click class's training mean (module docstring)."""

    labels: LabelConfig
    clicked_mean: float
    unclicked_mean: float

    @classmethod
    def fit(cls, labels: LabelConfig, files: list[Path]) -> RankerLabelWeights:
        """The class means of the training rows in ``files``; no click, or a class weighed 0
        throughout, is an error (``NotTrainableError``, ``ConfigError``)."""
        sums, counts = np.zeros(2), np.zeros(2)
        for path in files:
            rows = pq.read_table(path, columns=["clicked", "dwell_s", "shared", "hidden"])
            clicked, weight = _weights(rows, labels)
            sums += np.bincount(clicked, weights=weight, minlength=2)
            counts += np.bincount(clicked, minlength=2)
        if counts[1] == 0:
            raise NotTrainableError(f"the {int(counts[0])} training impressions in {files[0].parent if files else '-'} "
                                    "have no click: nothing to learn")  # fmt: skip
        for name, c in (("non-clicked", 0), ("clicked", 1)):
            if counts[c] and sums[c] == 0:
                raise ConfigError(f"labels: every {name} training row weighs 0, so the ranker could not learn that class")
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
        return cls(labels, clicked_mean=float(means[1]), unclicked_mean=float(means[0]))

    def __call__(self, rows: pa.Table | pa.RecordBatch) -> np.ndarray:
        clicked, weight = _weights(rows, self.labels)
        return (weight / np.where(clicked == 1, self.clicked_mean, self.unclicked_mean)).astype(np.float32)


def _weights(rows: pa.Table | pa.RecordBatch, labels: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(clicked as 0/1 int, engagement weight) of each row."""
    col = lambda name: rows.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    clicked = col("clicked")
    _, weight = engagement_labels(clicked, col("dwell_s"), col("shared"), col("hidden"), labels)
    return clicked.astype(np.int64), weight.astype(np.float64)


# ------------------------------------------------------------------------------------------------
# the task


def _as_bundle(bundle: Bundle | str | Path | None) -> Bundle | None:
    return bundle if bundle is None or isinstance(bundle, Bundle) else load_bundle(bundle)


def train_ranking(
    log_dir: str | Path,
    out_dir: str | Path,
    cfg: RankingRunConfig,
    two_tower_bundle: Bundle | str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    evaluate: bool = True,
) -> Bundle | None:
    """Train, evaluate and bundle a ranker (module docstring); the bundle on rank 0, None elsewhere.
    ``evaluate=False`` skips the holdout evaluation (the bundle then has no ``eval`` metrics).

    Raises ``ConfigError`` on settings that do not fit together, ``FeatureBuildError`` /
    ``NotTrainableError`` before training on unusable data, ``ValueError`` when the two-tower's
    vocabularies are not this feature build's, ``FileExistsError`` when ``OUT/train/ranking``
    holds checkpoints and ``resume`` is False, and ``Preempted`` when SIGTERM stopped training.
    """
    log_dir, out = Path(log_dir), Path(out_dir)
    two_tower = _as_bundle(two_tower_bundle)
    cfg = resolve_config(cfg, two_tower)
    features_dir, sample_dir = out / FEATURES_DIR, out / SAMPLE_DIR
    train_cfg = dataclasses.replace(cfg.train, out_dir=str(train_dir(out, TASK)), progress=cfg.train.progress and progress)
    require_fresh_run(out, TASK, resume)

    env = D.init_distributed(cfg.train.device)
    try:
        if env.is_main:
            ensure_features(log_dir, features_dir, cfg.features, progress=progress)
            sample_training_split(features_dir, sample_dir, cfg.ranker.negative_rate, cfg.loader.seed,
                                  cfg.exclude_requests, progress)
        D.barrier(env)
        manifest = load_manifest(features_dir)
        check_trainable(features_dir, "train")
        vocabs = Vocabularies.load(features_dir / VOCAB_DIR)
        if two_tower is not None and two_tower.vocabs != vocabs:
            raise ValueError(f"the two-tower at {two_tower.path} was trained on other vocabularies than the feature build "
                             f"at {features_dir}: leave features unset to share its build, or retrain it")  # fmt: skip
        files = sample_training_split(features_dir, sample_dir, cfg.ranker.negative_rate, cfg.loader.seed,
                                      cfg.exclude_requests, progress=False)
        weights = RankerLabelWeights.fit(cfg.labels, files)

        torch.manual_seed(cfg.train.seed)
        model = build_ranker(to_dict(cfg), vocabs)
        catalogue = training_catalogue(log_dir, vocabs, cfg.features)
        attach_titles(model, catalogue, start_words=True)  # a ranker that reads titles looks up its history's
        frozen = None if two_tower is None else two_tower.model.to(env.device).eval()
        with Trainer(model, functools.partial(ranker_loss, two_tower=frozen), train_cfg) as trainer:
            if resume:
                trainer.resume()
            collator = Collator(max_history=cfg.ranker.max_history_len, weight=weights, limits=batch_limits(vocabs),
                                cross_counters=model.cross_counters)  # fmt: skip
            result = trainer.fit(epoch_batches(files, cfg.loader, collator, trainer))
        if result.status == "preempted":
            raise Preempted(result.checkpoint)
        if not env.is_main:
            return None
        final = build_ranker(to_dict(cfg), vocabs)
        final.load_state_dict(load_model_state(result.checkpoint))
        final.eval()
        attach_titles(final, catalogue)
        metrics: dict[str, Any] = {"train": result.metrics, "label_weight_means": {
            "clicked": weights.clicked_mean, "unclicked": weights.unclicked_mean}}  # fmt: skip
        evaluation = None
        if evaluate:
            frozen = None if two_tower is None else two_tower.model.cpu()
            evaluation = _evaluate(final, frozen, catalogue, features_dir, vocabs, cfg, progress)
        if evaluation is not None:
            evaluation.write(out / EVAL_DIR)
            metrics["eval"] = evaluation.evaluation.metrics_file()
        sources = {"log": str(log_dir.resolve()), "log_hash": manifest["source_hash"],
                   "features": str(features_dir.resolve()), "features_hash": manifest["content_hash"],
                   "training_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}  # fmt: skip
        if two_tower is not None:
            sources["two_tower"] = {"path": str(two_tower.path.resolve()), "version": two_tower.version}
        path = save_bundle(out / BUNDLE_DIR, kind="ranker", model=final, config=to_dict(cfg), vocabs=vocabs,
                           catalogue=catalogue, metrics=metrics, sources=sources)  # fmt: skip
        return load_bundle(path)
    finally:
        D.shutdown(env)


def _evaluate(model: Ranker, two_tower: torch.nn.Module | None, catalogue: pa.Table, features_dir: Path,
              vocabs: Vocabularies, cfg: RankingRunConfig, progress: bool) -> RankingResult | None:  # fmt: skip
    """The holdout evaluation of the feature build's test split, or None when it has nothing to rank
    (the bundle is still saved: training is not lost for want of a holdout)."""
    try:
        holdout = load_holdout(features_dir, vocabs, cfg.eval.max_requests, cfg.eval.seed, cfg.exclude_requests)
    except EmptyHoldout as exc:
        log.warning("no evaluation: %s", exc)
        return None
    return evaluate_ranker(RankerScorer(model, two_tower), catalogue, holdout, cfg.eval, progress=progress)


# ------------------------------------------------------------------------------------------------
# two label weightings, compared offline


def compare_label_weightings(
    cfg_a: RankingRunConfig,
    cfg_b: RankingRunConfig,
    log_dir: str | Path,
    out_dir: str | Path,
    two_tower_bundle: Bundle | str | Path | None = None,
    progress: bool = True,
) -> WeightingComparison:
    """Train the ranker under run configs A and B (``OUT/a``, ``OUT/b``) and compare them on the
    shared holdout impressions: click, share and hide AUC and NDCG@10 of value (paired bootstrap
    with A's ``eval`` settings; ``feedrank.evaluate.ranking.compare_weightings``). Writes
    ``OUT/weights.json``. An offline check of a weighting change before it reaches an A/B test."""
    out = Path(out_dir)
    two_tower = _as_bundle(two_tower_bundle)
    bundles = [train_ranking(log_dir, out / name, cfg, two_tower, progress=progress, evaluate=False)
               for name, cfg in (("a", cfg_a), ("b", cfg_b))]  # fmt: skip
    eval_cfg = from_dict(RankingEvalConfig, bundles[0].config["eval"], "eval")
    holdouts = [load_holdout(b.meta["sources"]["features"], b.vocabs, eval_cfg.max_requests, eval_cfg.seed,
                             b.config["exclude_requests"]) for b in bundles]  # fmt: skip
    rows_a, rows_b = align(*holdouts)
    outputs = [
        score_rows(h.rows.take(pa.array(rows)), RankerScorer(b.model, None if two_tower is None else two_tower.model),
                   eval_cfg.batch_size, b.model.cfg.max_history_len)
        for b, h, rows in zip(bundles, holdouts, (rows_a, rows_b))
    ]  # fmt: skip
    labels = [from_dict(LabelConfig, b.config["labels"], "labels") for b in bundles]
    result = compare_weightings(holdouts[0].take(rows_a), *outputs, *labels, eval_cfg)
    result.holdout["bundles"] = {"A": str(bundles[0].path), "B": str(bundles[1].path)}
    (out / "weights.json").write_text(json.dumps(result.as_dict(), indent=2, allow_nan=True) + "\n")
    return result


# ------------------------------------------------------------------------------------------------
# the whole pipeline


@dataclass
class PipelineResult:
    two_tower: Bundle
    ranker: Bundle
    report: Path


def run_pipeline(
    log_dir: str | Path,
    run_dir: str | Path,
    retrieval_cfg: RetrievalRunConfig,
    ranking_cfg: RankingRunConfig,
    progress: bool = True,
) -> PipelineResult:
    """Train the two-tower, train the ranker on its vectors (which evaluates it against the
    baselines), and write the report, all in one run directory (single process)::

        RUN_DIR/features/       one feature build, shared when the ranking config leaves it unset
        RUN_DIR/train/{retrieval,ranking}/   training curves for the report
        RUN_DIR/bundle/ RUN_DIR/ranker/      the two bundles
        RUN_DIR/eval/           the ranking holdout: predictions.parquet, metrics.json
        RUN_DIR/report.html
    """
    run_dir = Path(run_dir)
    two_tower = train_retrieval(log_dir, run_dir, retrieval_cfg, progress=progress)
    ranker = train_ranking(log_dir, run_dir, ranking_cfg, two_tower_bundle=two_tower, progress=progress)
    if "eval" not in ranker.metrics:
        raise ValueError(f"{log_dir}: the ranking holdout (features.split_at) has no clicks and non-clicks: no report")
    return PipelineResult(two_tower, ranker, write_report(run_dir, progress=progress))
