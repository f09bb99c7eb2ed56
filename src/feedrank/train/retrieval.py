"""The retrieval training task: event log in, evaluated retrieval bundle out.

``train_retrieval(log_dir, out_dir, cfg)`` wires the existing parts, in this order::

    features   build_features -> OUT/features       (reused when its manifest matches log + config)
    check      check_trainable                      (an empty or all-negative split stops here,
                                                     before any model is built)
    model      TwoTower sized by the vocabularies; the catalogue attached for sampled softmax
    data       ParquetStream + make_loader, weights from the label config, set_epoch per epoch
    train      Trainer -> OUT/train/retrieval       (checkpoints, metrics.jsonl; resumable)
    evaluate   full-catalogue top-k on the time holdout, vs popularity -> OUT/eval/metrics.json
    bundle     save_bundle -> OUT/bundle            (weights, config, vocab, catalogue, metrics)

``retrieval.kind`` picks the model: ``two_tower`` (the default, above) or an item-to-item kind,
``ease`` or ``covisit`` (``feedrank.models.item2item``, settings in the ``item2item`` section): the
same features, check, evaluation and bundle steps, with the model fitted in closed form (EASE) or
by counting (co-visitation) on the train split's engagements instead of trained by the ``Trainer``.
Its bundle has kind ``item2item``; serving uses it as the ``item2item`` candidate source beside the
two-tower's ANN (``feedrank serve --item2item``). ``blend`` (``feedrank.models.blend``, section
``blend``) trains each of ``blend.parts`` as its own kind in ``OUT/parts/<kind>`` on the one feature
build, then takes ``blend.weights`` or chooses them from ``blend.grid()`` on the ``valid`` holdout
(``--valid-log``; never the test split), and evaluates and bundles the mix (kind ``blend``).

The run directory layout, the feature reuse, the loader and preemption are shared with the
ranking task (``feedrank.train.task``), so both can train in one run directory on one feature build.

It runs unchanged under ``torchrun``: rank 0 builds the features while the others wait, each rank
streams its own shard (``ParquetStream`` reads rank and world size from ``torch.distributed``;
``even_batches`` keeps the ranks in step), and rank 0 alone evaluates and writes the bundle, from the
full weights of the final checkpoint (so FSDP-sharded runs work too). Other ranks return ``None``.

Labels: the losses read ``Batch.clicked`` as the target (softmax losses take clicked rows as
positives; BCE regresses on it), so the example weight carries the label config: the row's
``engagement_labels`` weight where the label agrees with ``clicked``, and 0 where it does not
(a click then "not interested", a share without a click). Those rows are dropped from the loss
rather than learned as the opposite of what the label config says.

Example::

    cfg = load_run_config("configs/demo.yaml")
    bundle = train_retrieval("runs/world_demo", "runs/demo", cfg)
    bundle.metrics["two_tower"]["recall@10"]
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from feedrank.bundle import Bundle, attach_titles, build_two_tower, catalogue_item_cats, catalogue_item_tokens, load_bundle, save_bundle
from feedrank.config import ConfigError, load_yaml, to_dict
from feedrank.data.collate import Collator
from feedrank.evaluate.retrieval import DEFAULT_KS, Holdout, RetrievalEvaluation, blend_grid_metrics, evaluate_holdout
from feedrank.features.build import VOCAB_DIR, FeatureConfig, check_trainable, load_manifest, parse_ts, split_files
from feedrank.features.labels import LabelConfig, engagement_labels
from feedrank.features.vocab import Vocabularies
from feedrank.models import item2item as i2i
from feedrank.models.blend import BlendConfig, BlendModel
from feedrank.models.losses import CachedStep, GlobalPool, ImpressionRows, accumulation_note, two_tower_loss
from feedrank.models.two_tower import TwoTowerConfig
from feedrank.train import distributed as D
from feedrank.train.checkpoint import load_model_state
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

TASK, BUNDLE_DIR = "retrieval", "bundle"


@dataclass
class EvalConfig:
    """The holdout evaluation run after training (YAML section ``eval``)."""

    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    max_users: int | None = 5000  # a fixed random sample of holdout users (None = all of them)
    seed: int = 0
    chunk_users: int = 1024  # users scored against the catalogue at once (memory: chunk x items floats)

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {self.ks}")
        if self.max_users is not None and self.max_users < 1:
            raise ValueError(f"max_users must be >= 1 or null, got {self.max_users}")
        if self.chunk_users < 1:
            raise ValueError(f"chunk_users must be >= 1, got {self.chunk_users}")


RetrievalKind = Literal["two_tower", "ease", "covisit", "blend"]
ITEM2ITEM_KINDS = ("ease", "covisit")
PARTS_DIR = "parts"  # a blend's parts train in OUT/parts/<kind>, on OUT/features


@dataclass
class RetrievalConfig:
    """Which retrieval model a run trains (YAML section ``retrieval``)."""

    kind: RetrievalKind = "two_tower"


@dataclass
class RetrievalRunConfig:
    """Everything one retrieval run needs; one YAML file, one section per part.

    ``train.out_dir`` is ignored: the run directory given to ``train_retrieval`` decides where
    everything goes (``OUT/train/retrieval`` for the trainer).
    """

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    item2item: i2i.Item2ItemConfig = field(default_factory=i2i.Item2ItemConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_run_config(path: str | Path) -> RetrievalRunConfig:
    """A ``RetrievalRunConfig`` from YAML; an unknown key or a wrong type raises ``ConfigError``."""
    return load_yaml(RetrievalRunConfig, path)


@dataclass
class LabelWeights:
    """Collator weight hook (picklable, for DataLoader workers): see the module docstring."""

    labels: LabelConfig

    def __call__(self, rows: pa.Table | pa.RecordBatch) -> np.ndarray:
        col = lambda name: rows.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        clicked = col("clicked")
        label, weight = engagement_labels(clicked, col("dwell_s"), col("shared"), col("hidden"), self.labels)
        return np.where(label == clicked, weight, 0.0).astype(np.float32)


def clicked_rows(rows: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Collator ``keep`` hook of the softmax losses, which train on clicked rows only: dropping the
    others on the host saves the towers their compute (about 12x fewer rows at the demo's 8% CTR)
    and keeps the step free of device syncs (the loss masks them anyway)."""
    return rows.column("clicked").to_numpy(zero_copy_only=False).astype(bool)


def training_positive_rows(features_dir: Path, columns: list[str]) -> pa.Table:
    """``columns`` of the train split's engagements (clicked, not hidden), in the build's row order."""
    read = list(dict.fromkeys([*columns, "clicked", "hidden"]))
    table = pa.concat_tables(pq.read_table(f, columns=read) for f in split_files(features_dir, "train"))
    return table.filter(pc.and_(table["clicked"], pc.invert(table["hidden"]))).select(columns)


def training_positives(features_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(user_idx, item_idx) of the train split's engagements (clicked, not hidden)."""
    table = training_positive_rows(features_dir, ["user_idx", "item_idx"])
    return torch.tensor(table["user_idx"].to_numpy()), torch.tensor(table["item_idx"].to_numpy())  # copies: arrow buffers are read-only


def train_retrieval(
    log_dir: str | Path, out_dir: str | Path, cfg: RetrievalRunConfig, resume: bool = False, progress: bool = True,
    valid: Holdout | None = None,
) -> Bundle | None:
    """Train, evaluate and bundle a retrieval model of ``cfg.retrieval.kind`` (see the module
    docstring); the bundle on rank 0. ``valid`` is the holdout a blend's weights are chosen on
    (required by ``kind: blend`` without fixed ``blend.weights``; the other kinds ignore it).

    Raises ``FeatureBuildError`` / ``NotTrainableError`` before training on unusable data,
    ``FileExistsError`` when ``OUT/train/retrieval`` holds checkpoints and ``resume`` is False, and
    ``Preempted`` when SIGTERM stopped training (the checkpoint is kept).
    """
    log_dir, out = Path(log_dir), Path(out_dir)
    if cfg.retrieval.kind == "blend":
        return _train_blend(log_dir, out, cfg, valid, resume, progress)
    features_dir = out / FEATURES_DIR
    train_cfg = dataclasses.replace(cfg.train, out_dir=str(train_dir(out, TASK)), progress=cfg.train.progress and progress)
    require_fresh_run(out, TASK, resume)

    env = D.init_distributed(cfg.train.device)
    try:
        if env.is_main:
            ensure_features(log_dir, features_dir, cfg.features, progress=progress)
        D.barrier(env)
        manifest = load_manifest(features_dir)
        check_trainable(features_dir, "train")
        vocabs = Vocabularies.load(features_dir / VOCAB_DIR)
        catalogue = training_catalogue(log_dir, vocabs, cfg.features)

        sources = {"log": str(log_dir.resolve()), "log_hash": manifest["source_hash"],
                   "features": str(features_dir.resolve()), "features_hash": manifest["content_hash"]}
        if cfg.retrieval.kind in ITEM2ITEM_KINDS:
            return _fit_item2item(features_dir, out, cfg, vocabs, catalogue, log_dir, manifest, sources) if env.is_main else None

        torch.manual_seed(cfg.train.seed)
        model = build_two_tower(to_dict(cfg), vocabs)
        attach_titles(model, catalogue, start_words=True)
        model.attach_catalogue(catalogue_item_cats(catalogue), torch.tensor(catalogue["train_clicks"].to_numpy()),
                               catalogue_item_tokens(catalogue))
        if cfg.two_tower.mask_known_positives:
            model.attach_known_positives(*training_positives(features_dir))
        pool = GlobalPool.new(env.control) if env.is_distributed and cfg.two_tower.data_parallel_loss == "global" else None
        loss_fn = CachedStep(pool) if cfg.two_tower.accumulation == "cached" else functools.partial(two_tower_loss, pool=pool)
        note = accumulation_note(cfg.two_tower.loss, cfg.train.grad_accum_steps, env.world_size, pool is not None)
        if note and cfg.two_tower.accumulation == "micro_batches" and env.is_main:
            log.warning(note)
        with Trainer(model, loss_fn, train_cfg) as trainer:
            if resume:
                trainer.resume()
            collator = Collator(max_history=cfg.two_tower.max_history_len, weight=LabelWeights(cfg.labels),
                                limits=batch_limits(vocabs), keep=None if cfg.two_tower.loss == "bce" else
                                ImpressionRows(cfg.two_tower.impression_rate) if cfg.two_tower.impression_weight > 0 else clicked_rows)
            data = epoch_batches(split_files(features_dir, "train"), cfg.loader, collator, trainer)
            result = trainer.fit(data)
        if result.status == "preempted":
            raise Preempted(result.checkpoint)
        if not env.is_main:
            return None
        final = build_two_tower(to_dict(cfg), vocabs)
        final.load_state_dict(load_model_state(result.checkpoint))
        attach_titles(final, catalogue)
        return _evaluate_and_bundle(final, "two_tower", {"train": result.metrics}, out, cfg, vocabs, catalogue,
                                    log_dir, manifest, sources)  # fmt: skip
    finally:
        D.shutdown(env)


def _fit_item2item(features_dir: Path, out: Path, cfg: RetrievalRunConfig, vocabs: Vocabularies, catalogue: pa.Table,
                   log_dir: Path, manifest: dict, sources: dict[str, Any]) -> Bundle:  # fmt: skip
    """The item-to-item kinds: fit on the train split's engagements, evaluate, bundle (kind ``item2item``)."""
    rows = training_positive_rows(features_dir, ["user_idx", "item_idx", "ts"])
    users, items = rows["user_idx"].to_numpy(), rows["item_idx"].to_numpy()
    ts_s = rows["ts"].cast(pa.timestamp("us")).cast(pa.int64()).to_numpy() / 1e6  # the session term's times
    x = i2i.interactions(users, items, vocabs.n_users, vocabs.n_items)
    started = time.perf_counter()
    model = i2i.Item2ItemModel(vocabs.n_items, i2i.fit(x, cfg.retrieval.kind, cfg.item2item, (users, items, ts_s)))
    seconds = time.perf_counter() - started
    log.info("%s fitted on %d engagements x %d items in %.1f s (%d neighbours)", cfg.retrieval.kind, x.nnz,
             vocabs.n_items, seconds, model.indices.numel())  # fmt: skip
    train = {"fit_seconds": round(seconds, 3), "engagements": int(x.nnz), "neighbours": int(model.indices.numel())}
    return _evaluate_and_bundle(model, "item2item", {"train": train}, out, cfg, vocabs, catalogue, log_dir, manifest,
                                sources)  # fmt: skip


def _evaluate_and_bundle(model: torch.nn.Module, kind: str, metrics: dict[str, Any], out: Path, cfg: RetrievalRunConfig,
                         vocabs: Vocabularies, catalogue: pa.Table, log_dir: Path, manifest: dict,
                         sources: dict[str, Any]) -> Bundle:  # fmt: skip
    """Every retrieval kind's last step: the holdout evaluation (written to ``OUT/eval`` and named in
    the bundle's metrics when the build has a test split), then the bundle, loaded back."""
    evaluation = _evaluate(model, vocabs, catalogue, log_dir, cfg, manifest)
    if evaluation is not None:
        evaluation.write(out / EVAL_DIR)
        metrics = metrics | {"eval": evaluation.metrics_file()}
    path = save_bundle(out / BUNDLE_DIR, kind=kind, model=model, config=to_dict(cfg), vocabs=vocabs,
                       catalogue=catalogue, metrics=metrics, sources=sources)  # fmt: skip
    return load_bundle(path)


def _train_blend(log_dir: Path, out: Path, cfg: RetrievalRunConfig, valid: Holdout | None, resume: bool,
                 progress: bool) -> Bundle | None:  # fmt: skip
    """``kind: blend``: train each part as its own kind (``OUT/parts/<kind>``, one shared feature
    build), choose the weights on ``valid`` from ``blend.grid()`` (or take ``blend.weights``), then
    evaluate and bundle the blend (kind ``blend``). Its ``train.seconds`` is the whole of it: the
    parts' training and the selection (what a benchmark compares with a single model's training)."""
    if cfg.blend.weights is None and valid is None:
        raise ConfigError("retrieval.kind blend: blend.weights is null, so the weights are chosen on a validation "
                          "holdout, and none was given (--valid-log, or train_retrieval(..., valid=Holdout)); "
                          "set blend.weights to train with fixed weights")  # fmt: skip
    if D.launched_by_torchrun():
        raise ConfigError("retrieval.kind blend trains its parts one after the other in one process; run it without torchrun")
    started = time.perf_counter()
    ensure_features(log_dir, out / FEATURES_DIR, cfg.features, progress=progress)
    parts: dict[str, torch.nn.Module] = {}
    history_lens, part_metrics = [], {}
    for kind in cfg.blend.parts:
        part_cfg = dataclasses.replace(cfg, retrieval=RetrievalConfig(kind=kind))  # type: ignore[arg-type]
        part_dir = out / PARTS_DIR / kind
        part_dir.mkdir(parents=True, exist_ok=True)
        if not (part_dir / FEATURES_DIR).exists():
            (part_dir / FEATURES_DIR).symlink_to((out / FEATURES_DIR).resolve(), target_is_directory=True)
        bundle = train_retrieval(log_dir, part_dir, part_cfg, resume=resume, progress=progress)
        assert bundle is not None, "a single process is rank 0"
        parts[kind], vocabs, catalogue = bundle.model, bundle.vocabs, bundle.catalogue
        history_lens.append(scoring_history_len(part_cfg))
        part_metrics[kind] = {"bundle": str(bundle.path), "version": bundle.version, **bundle.metrics}
    model = BlendModel(parts, history_lens, cfg.blend.normalise, cfg.blend.weights)
    selection: dict[str, Any] = {"weights": cfg.blend.weights, "selected_by": "fixed (blend.weights)"}
    if cfg.blend.weights is None:
        grid = cfg.blend.grid()
        values = blend_grid_metrics(model, grid, valid, vocabs, catalogue, cfg.blend.select_by, cfg.eval.chunk_users)
        best = int(np.nanargmax(values))  # the first of equal values: the grid's order (BlendConfig.grid)
        model.weights = torch.tensor(grid[best], dtype=torch.float64)
        selection = {"weights": grid[best], "selected_by": f"valid {cfg.blend.select_by}",
                     "grid": [{"weights": w, cfg.blend.select_by: v} for w, v in zip(grid, values)]}  # fmt: skip
    seconds = time.perf_counter() - started
    log.info("blend of %s: weights %s (%s), %.1f s", cfg.blend.parts, selection["weights"], selection["selected_by"], seconds)
    manifest = load_manifest(out / FEATURES_DIR)
    sources = {"log": str(log_dir.resolve()), "log_hash": manifest["source_hash"],
               "features": str((out / FEATURES_DIR).resolve()), "features_hash": manifest["content_hash"]}  # fmt: skip
    train = {"seconds": round(seconds, 3), "selection": selection, "parts": part_metrics}
    return _evaluate_and_bundle(model, "blend", {"train": train}, out, cfg, vocabs, catalogue, log_dir, manifest, sources)


def scoring_history_len(cfg: RetrievalRunConfig) -> int:
    """How many of a user's last engagements the run's model scores from (evaluation and benchmarks);
    a blend's is its longest part's (each part then scores from its own, ``BlendModel.history_lens``)."""
    if cfg.retrieval.kind == "blend":
        return max(scoring_history_len(dataclasses.replace(cfg, retrieval=RetrievalConfig(kind=k)))  # type: ignore[arg-type]
                   for k in cfg.blend.parts)  # fmt: skip
    if cfg.retrieval.kind in ITEM2ITEM_KINDS:
        return cfg.item2item.history_len
    return min(cfg.features.history_len, cfg.two_tower.max_history_len)


def _evaluate(model: torch.nn.Module, vocabs: Vocabularies, catalogue: pa.Table, log_dir: Path,
              cfg: RetrievalRunConfig, manifest: dict) -> RetrievalEvaluation | None:  # fmt: skip
    """The holdout evaluation of the feature build's test split, or None when it has none."""
    split_at = parse_ts(cfg.features.split_at, "split_at")
    test = manifest["splits"].get("test")
    if split_at is None or not test or test["engagements"] == 0:
        log.warning("no test split with engagements (features.split_at = %s): the bundle has no evaluation",
                    cfg.features.split_at)
        return None
    return evaluate_holdout(
        model, vocabs, catalogue, log_dir, split_at, end=parse_ts(cfg.features.cutoff, "cutoff"),
        history_len=scoring_history_len(cfg), ks=cfg.eval.ks, max_users=cfg.eval.max_users, seed=cfg.eval.seed,
        chunk_users=cfg.eval.chunk_users, model_name={"two_tower": "two_tower", "blend": "blend"}.get(cfg.retrieval.kind, "item2item"),
    )  # fmt: skip
