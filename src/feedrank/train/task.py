"""What every training task shares: the run directory, the feature build, the loader and preemption.

A *task* (``feedrank.train.retrieval``, ``feedrank.train.ranking``) turns an event log into a model
bundle. They differ in model, loss, label weights and evaluation, and share everything else, which
lives here so that the two cannot drift apart::

    RUN_DIR/
      features/          ensure_features: one point-in-time build, reused by every task whose
                         feature config matches (same vocabularies, so two-tower vectors line up)
      train/<task>/      the Trainer's out_dir (checkpoints, metrics.jsonl): one folder per task, the
                         layout ``feedrank report`` reads training curves from
      eval/ ...          the task's evaluation (see each task)

Example::

    require_fresh_run(run_dir, "ranking", resume=False)
    ensure_features(log_dir, run_dir / FEATURES_DIR, cfg.features)
    data = epoch_batches(split_files(run_dir / FEATURES_DIR, "train"), cfg.loader, collator, trainer)
    result = trainer.fit(data)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from feedrank.bundle import build_catalogue
from feedrank.data.batch import BatchLimits
from feedrank.data.collate import Collator
from feedrank.data.log import iter_days
from feedrank.data.memory import system_memory_pool
from feedrank.data.stream import ParquetStream, make_loader
from feedrank.evaluate.ranking import EVAL_DIR
from feedrank.features.build import FeatureConfig, parse_ts
from feedrank.features.reuse import ensure_features
from feedrank.features.vocab import ITEM_CAT_COLUMNS, Vocabularies
from feedrank.train.checkpoint import latest_checkpoint
from feedrank.train.trainer import Trainer


FEATURES_DIR, TRAIN_DIR = "features", "train"


def train_dir(run_dir: str | Path, task: str) -> Path:
    """The Trainer's out_dir of ``task`` in ``run_dir``: ``RUN_DIR/train/<task>``."""
    return Path(run_dir) / TRAIN_DIR / task


@dataclass
class LoaderConfig:
    """How training batches are read (YAML section ``loader``)."""

    batch_size: int = 1024
    num_workers: int = 0
    shuffle_buffer_rows: int = 65_536
    seed: int = 0

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer_rows < 1:
            raise ValueError("batch_size and shuffle_buffer_rows must be >= 1, num_workers >= 0")


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; run again with resume to continue."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"training preempted; checkpoint {checkpoint}; rerun with --resume to continue")
        self.checkpoint = checkpoint


def require_fresh_run(run_dir: str | Path, task: str, resume: bool) -> None:
    """Refuse to start ``task`` over checkpoints of an earlier run unless it is a resume: silently
    training a second model on top of the first would mix two runs in one metrics file."""
    out = train_dir(run_dir, task)
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise FileExistsError(f"{out} already holds checkpoints: resume them (--resume) or use a new run directory")


def training_catalogue(log_dir: str | Path, vocabs: Vocabularies, cfg: FeatureConfig) -> pa.Table:
    """The bundle catalogue from the log's training window (before ``split_at`` and ``cutoff``),
    read one day at a time: memory O(items + a day), whatever the log's length. The read runs under
    the system allocator (``feedrank.data.memory``): with mimalloc's delayed purge its RSS grew
    with the days read."""
    ends = [t for t in (parse_ts(cfg.split_at, "split_at"), parse_ts(cfg.cutoff, "cutoff")) if t is not None]
    days = iter_days(log_dir, columns=["item_id", "ts", "clicked", "created_ts", *cfg.content_fields, *ITEM_CAT_COLUMNS],
                     end=min(ends) if ends else None)  # fmt: skip
    with system_memory_pool():
        return build_catalogue(days, vocabs, cfg.content_lens())


def batch_limits(vocabs: Vocabularies) -> BatchLimits:
    """The vocabulary sizes the collator checks every training Batch's indices against."""
    return BatchLimits(vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes, vocabs.n_tokens or None)


@dataclass
class Epoch:
    """One epoch of batches with a ``len`` (the trainer's cosine schedule with ``epochs`` needs it)."""

    loader: Any
    n_batches: int

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return self.n_batches


def epoch_batches(
    files: Sequence[Path], cfg: LoaderConfig, collator: Collator, trainer: Trainer
) -> Callable[[int], Epoch]:
    """The trainer's ``data(epoch)``: the shuffled example ``files`` as ``Batch``es, deterministic in
    the epoch (exact resume), each rank its own shard with the same number of batches (DDP)."""
    stream = ParquetStream(
        files, cfg.batch_size, columns=collator.columns, shuffle=True, seed=cfg.seed,
        shuffle_buffer_rows=cfg.shuffle_buffer_rows, even_batches=trainer.env.is_distributed,
    )  # fmt: skip
    loader = make_loader(stream, cfg.num_workers, collator)

    def data(epoch: int) -> Epoch:
        stream.set_epoch(epoch)
        return Epoch(loader, stream.num_batches(cfg.num_workers))

    return data
