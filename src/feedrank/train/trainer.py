"""The one training loop of feedrank, shared by the retrieval and the ranking models.

The loop knows nothing about models: it is given a module, a loss function and a data callable.

- ``loss_fn(module, batch) -> (loss, logs)``: ``loss`` is a scalar tensor, ``logs`` a dict of
  scalars (floats or 0-d tensors, the same keys every call) averaged over the logging window. ``loss_fn`` must call
  ``module(...)`` itself (not a submodule): under DDP/FSDP the wrapper's ``forward`` is what
  schedules the gradient all-reduce / parameter all-gather.
- ``loss_fn`` may also have ``backward_step(module, batches, backward)``: with
  ``grad_accum_steps`` > 1 it then gets a step's micro-batches at once and backpropagates them
  itself through ``backward(t, last)`` (``feedrank.models.losses.CachedStep``, for a contrastive
  loss whose accumulated gradient must equal one batch of the whole step).
- ``data(epoch) -> Iterable[batch]``: that epoch's batches, *deterministic given epoch* (seeded
  shuffles). Determinism is what makes resume exact: a resumed run calls ``data(epoch)`` again and
  skips the batches it already consumed. Under torchrun each rank's ``data`` yields its own shard
  with the same number of batches on every rank.
- Batches are tensors, dicts/lists/tuples of tensors, or any object with ``.to(device)``
  (``feedrank.data.batch.Batch``).

One optimizer step = ``grad_accum_steps`` micro-batches (the effective batch is
``micro_batch * grad_accum_steps * world_size``); accumulation runs on across epoch boundaries, so
every step sees the same number of examples. Per step: AdamW (with ``sparse_embeddings``, SparseAdam
for the embedding tables and AdamW for the rest: ``feedrank.train.sparse``) on a warmup + cosine/constant
learning rate that is a pure function of the step (so the "scheduler state" is just ``step``),
optional bf16/fp16 autocast (fp16 with a GradScaler), gradient clipping after unscaling.

No step reads a value back from the device: the loss, the logs, the non-finite flag and fp16's
skipped steps accumulate as device tensors, and only a metrics record (every ``log_every`` steps)
or a checkpoint synchronises (``tests/train/test_host_syncs.py`` counts them). Under fp16 each
record carries the loss scale and the steps the GradScaler skipped (inf/NaN gradients), with a
warning when there were any: a skipped step changes no weight, so it must not pass unseen.

Example::

    cfg = from_dict(TrainConfig, {"steps": 1000, "lr": 3e-3, "out_dir": "runs/demo"})
    with Trainer(model, loss_fn, cfg) as trainer:
        trainer.resume()                        # no-op on a fresh out_dir
        result = trainer.fit(lambda epoch: loader_for(epoch))
    sys.exit(PREEMPTED_EXIT_CODE if result.status == "preempted" else 0)

On SIGTERM the loop finishes the current optimizer step, writes a checkpoint, and ``fit`` returns
``status="preempted"``; running the same command again resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from feedrank.config import to_dict
from feedrank.fsutil import staged_file
from feedrank.progress import progress as progress_bar
from feedrank.train import distributed as D
from feedrank.train.checkpoint import (
    apply_state,
    capture_rng,
    checkpoint_path,
    gather_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    sharded_dir,
)
from feedrank.train.sharding import EmbeddingsBackend, ShardingKind
from feedrank.train.sparse import SplitAdam, clip_grads, make_tables_sparse, split_adam

log = logging.getLogger(__name__)

#: Exit status for a run stopped by SIGTERM after checkpointing: EX_TEMPFAIL ("try again later"),
#: distinct from success (0), a crash (1) and a hard kill (137/143), so a scheduler can requeue it.
PREEMPTED_EXIT_CODE = 75

LossFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, float | Tensor]]]
DataFn = Callable[[int], Iterable[Any]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


DEFAULT_STEPS = 1000


@dataclass
class TrainConfig:
    """How to train; model- and data-agnostic. Exactly one of ``steps`` / ``epochs`` is set: set
    one and the other stays unset; set neither and ``steps`` is ``DEFAULT_STEPS``."""

    steps: int | None = None  # optimizer steps (not micro-batches); DEFAULT_STEPS when epochs is unset too
    epochs: int | None = None  # alternative to steps; cosine then needs len(data(0))
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    weight_decay: float = 0.01  # applied to matrices and embedding tables only (dim >= 2)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum_steps: int = 1
    clip_grad_norm: float | None = 1.0  # None = no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"  # only used under torchrun with world size > 1
    bucket_cap_mb: float = 25.0  # DDP all-reduce bucket size
    # "torchrec": the model's ID tables are sharded across ranks by TorchRec (train/sharding.py; under
    # torchrun, also with one process); the rest of the model is data-parallel (DDP).
    embeddings: EmbeddingsBackend = "torch"
    embedding_sharding: ShardingKind = "auto"  # row_wise needs CUDA
    # true: every embedding table gets sparse gradients and SparseAdam (no weight decay on tables), the
    # rest AdamW, so a step costs the same at 100k and 10M items (train/sparse.py says what else changes)
    sparse_embeddings: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end and on SIGTERM
    keep_checkpoints: int = 3
    log_every: int = 10  # steps between metrics records (each one synchronises the device)
    eval_every: int = 0  # steps between evaluate() calls; 0 = only at the end (if given)
    seed: int = 0
    tensorboard: bool = False
    progress: bool = True
    out_dir: str = "runs/train"

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS

    def validate(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set exactly one of 'steps' and 'epochs', not both")
        positive = {"steps": self.steps, "epochs": self.epochs, "lr": self.lr, "grad_accum_steps": self.grad_accum_steps,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints,
                    "bucket_cap_mb": self.bucket_cap_mb, "clip_grad_norm": self.clip_grad_norm}
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise ValueError(f"{name}: must be > 0, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {list(self.betas)!r}")
        if self.embeddings == "torchrec" and (self.strategy != "ddp" or self.compile):
            raise ValueError("embeddings 'torchrec' shards the ID tables and runs the rest as DDP: it needs "
                             "strategy 'ddp' and compile false")
        if self.sparse_embeddings and (self.embeddings == "torchrec" or self.strategy == "fsdp" or self.compile):
            raise ValueError("sparse_embeddings needs embeddings 'torch', strategy 'ddp' and compile false (TorchRec "
                             "has its own row-wise optimizers; FSDP shards and torch.compile traces dense gradients only)")
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("precision 'fp16' is not supported with strategy 'fsdp' (its GradScaler "
                             "would see only local shards); use 'bf16'")


def effective_warmup(cfg: TrainConfig, total_steps: int | None) -> int:
    """Warmup steps actually used: ``warmup_steps``, or a tenth of the run when ``warmup_steps`` is at
    least the run's total steps (else the whole run would train at a fraction of its learning rate)."""
    if total_steps is not None and cfg.warmup_steps >= total_steps:
        return max(1, total_steps // 10) if cfg.warmup_steps else 0
    return cfg.warmup_steps


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine or constant.
    The warmup is ``effective_warmup`` (scaled down when it would exceed the run)."""
    warmup = effective_warmup(cfg, total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    assert total_steps is not None, "cosine schedule needs a known number of steps"
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - floor)


@dataclass
class TrainState:
    """Where training stands: enough, with the data callable, to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch being consumed
    batches_in_epoch: int = 0  # micro-batches of data(epoch) already consumed (by this rank)
    examples: int = 0  # examples seen by this rank
    skipped_steps: int = 0  # fp16: optimizer steps the GradScaler skipped, as of the last metrics record


@dataclass
class FitResult:
    status: Literal["completed", "preempted"]
    step: int
    checkpoint: Path | None  # the checkpoint written last (None on non-zero ranks)
    metrics: dict[str, float] = field(default_factory=dict)  # the last metrics record


def to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensor, mapping/list/tuple of them, or object with ``.to``) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if type(batch) in (list, tuple):
        return type(batch)(to_device(v, device) for v in batch)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    raise TypeError(f"cannot move a batch of type {type(batch).__name__} to {device}: use tensors, "
                    "dicts/lists of tensors, or give it a .to(device) method")


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping) and batch:
        return batch_size(next(iter(batch.values())))
    if type(batch) in (list, tuple) and batch:
        return batch_size(batch[0])
    if hasattr(batch, "__len__"):
        return len(batch)
    raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}: give it __len__")


class _Window:
    """Running sums between two metrics records, kept as device tensors so no step synchronises."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: Tensor | float = 0.0
        self.logs: dict[str, Tensor | float] = {}
        self.skipped: Tensor | float = 0.0  # fp16 steps skipped in the window
        self.micro = 0
        self.examples = 0
        self.started = time.perf_counter()

    def add(self, loss: Tensor, logs: Mapping[str, float | Tensor], examples: int) -> None:
        self.loss = self.loss + loss.detach().float()
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, Tensor) else float(v)
            self.logs[k] = self.logs.get(k, 0.0) + v
        self.micro += 1
        self.examples += examples


class Trainer:
    """Train ``model`` with ``loss_fn``; see the module docstring for the contract.

    Construction joins the torchrun process group when launched by torchrun, moves the model to
    the device, wraps it (DDP/FSDP) and optionally compiles it, and seeds python/numpy/torch with
    ``seed + rank`` so dropout streams are reproducible and differ between ranks. Build the model
    before the trainer, under your own seed: DDP/FSDP make every rank start from rank 0's weights.
    Use it as a context manager so the process group it joined is left cleanly.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.env = D.init_distributed(cfg.device)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        _seed_everything(cfg.seed + self.env.rank)  # distinct dropout streams per rank

        self.model = model.to(self.env.device)
        self.sharded = None  # feedrank.train.sharding.ShardedEmbeddings when embeddings == "torchrec"
        tables = make_tables_sparse(self.model) if cfg.sparse_embeddings else None  # before DDP wraps it
        if cfg.embeddings == "torchrec":
            from feedrank.train.sharding import shard_model

            self.sharded = shard_model(self.model, self.env, cfg.embedding_sharding, self.ckpt_dir, cfg.bucket_cap_mb)
            self._wrapped = self.sharded.module
        else:
            self._wrapped = D.wrap_model(self.model, self.env, cfg.strategy, cfg.bucket_cap_mb)
        self.module: nn.Module = torch.compile(self._wrapped, mode=cfg.compile_mode) if cfg.compile else self._wrapped
        self.optimizer = make_optimizer(self.model, cfg, self.env.device, tables)
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=cfg.precision == "fp16")
        self.state = TrainState()
        self._stop_requested = False
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=self.env.device)
        self._checked_loss_fn = False
        self._pending: list[Any] = []  # the step's micro-batches so far, for a loss_fn with backward_step
        self._last_checkpoint: Path | None = None

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave the process group if this trainer joined it (clean torchrun exit)."""
        D.shutdown(self.env)

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Checkpoint the current step. Every rank calls it; rank 0 writes; all wait for the write."""
        self._raise_if_nonfinite()
        path = checkpoint_path(self.ckpt_dir, self.state.step)
        if self.sharded is not None:  # every rank writes its shards; the .pt below commits them
            model_sd, optim_sd = {}, {}
            self.sharded.save(sharded_dir(path), self.optimizer)
        elif self.cfg.sparse_embeddings:  # never FSDP: the plain module's state, the two Adams' own
            model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        else:
            model_sd, optim_sd = gather_state(self.model, self.optimizer)
        rng = D.all_gather_objects(self.env, capture_rng())
        if self.env.is_main:
            save_checkpoint(path, {
                "format": 1,
                "state": vars(self.state).copy(),
                "step": self.state.step,
                "model": model_sd,
                "optimizer": optim_sd,
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "world_size": self.env.world_size,
                "sharded": sharded_dir(path).name if self.sharded is not None else None,
                "sparse_embeddings": self.cfg.sparse_embeddings,
                "config": to_dict(self.cfg),
            })
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints)
            log.info("checkpoint written: %s", path)
        D.barrier(self.env)  # nobody runs ahead (or exits) before the file is complete
        self._last_checkpoint = path if self.env.is_main else None
        return self._last_checkpoint

    def resume(self, path: str | Path | None = None) -> bool:
        """Load ``path`` (default: the latest checkpoint in out_dir). False when there is none."""
        path = Path(path) if path is not None else latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        payload = load_checkpoint(path)
        if bool(payload.get("sharded")) != (self.sharded is not None):
            raise ValueError(f"checkpoint {path} was written with embeddings "
                             f"{'torchrec' if payload.get('sharded') else 'torch'}: resume it with the same setting")
        if payload.get("sparse_embeddings", False) != self.cfg.sparse_embeddings:
            raise ValueError(f"checkpoint {path} was written with sparse_embeddings "
                             f"{payload.get('sparse_embeddings', False)}: resume it with the same setting")
        if self.sharded is not None:
            self.sharded.load(path.parent / payload["sharded"], self.optimizer)
        elif self.cfg.sparse_embeddings:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        else:
            apply_state(self.model, self.optimizer, payload["model"], payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(**payload["state"])
        rng = payload["rng"]
        if len(rng) == self.env.world_size:
            restore_rng(rng[self.env.rank])
        else:  # resharded run: exact replay is impossible, but keep streams distinct and reproducible
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: RNG streams are reseeded",
                        path, len(rng), self.env.world_size)
            _seed_everything(self.cfg.seed + 1_000_003 * self.state.step + self.env.rank)
        changed = {k: (v, payload["config"].get(k)) for k, v in to_dict(self.cfg).items() if payload["config"].get(k) != v}
        if changed:
            log.warning("resuming %s with changed config (new, old): %s", path, changed)
        if self.env.is_main:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.state.step)
        self._last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch, self.state.batches_in_epoch)
        return True

    # ----------------------------------------------------------------- training

    def request_stop(self) -> None:
        """Ask ``fit`` to checkpoint and return at the next step boundary (what SIGTERM does)."""
        self._stop_requested = True

    def fit(self, data: DataFn, evaluate: EvalFn | None = None) -> FitResult:
        """Train until ``steps``/``epochs`` are done or a stop is requested; checkpoint either way.

        ``evaluate(model)`` (optional) runs on every rank in eval mode under ``no_grad`` every
        ``eval_every`` steps and at the end; rank 0 logs its scalars as ``eval/<name>``.
        """
        cfg, state = self.cfg, self.state
        total = self._total_steps(data)
        if total is not None and state.step >= total:
            return FitResult("completed", state.step, self._last_checkpoint)
        if effective_warmup(cfg, total) != cfg.warmup_steps:
            log.warning("warmup_steps %d >= the run's %d total steps: warming up over %d steps instead",
                        cfg.warmup_steps, total, effective_warmup(cfg, total))
        window = _Window()
        micro = 0  # checkpoints sit on step boundaries, so a (re)start is always at phase 0
        with self._sigterm_flag(), _Sinks(self.out_dir, cfg, total, state.step, self.env.is_main) as sinks:
            self.model.train()
            for batch in self._micro_batches(data):
                micro += 1
                boundary = micro % cfg.grad_accum_steps == 0
                for loss, logs, n in self._backward(batch, boundary):
                    window.add(loss, logs, n)
                    state.examples += n
                if not boundary:
                    continue
                done = total is not None and state.step + 1 >= total
                log_now = done or (state.step + 1) % cfg.log_every == 0
                grad_norm, skipped = self._optimizer_step(lr_at(state.step, cfg, total), need_norm=log_now)
                if skipped is not None:
                    window.skipped = window.skipped + skipped
                state.step += 1
                stop = D.any_rank(self.env, self._stop_requested)
                if log_now or stop:
                    self._log(window, grad_norm, sinks)
                if evaluate is not None and (done or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                    self._evaluate(evaluate, sinks)
                sinks.bar.update(1)
                if done or stop:
                    self.save_checkpoint()
                    return FitResult("completed" if done else "preempted", state.step, self._last_checkpoint, sinks.last)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            # Only reachable when training is bounded by epochs and data(0) has no len().
            if micro % cfg.grad_accum_steps:  # a partial step would be mis-scaled: drop it
                log.warning("dropping %d trailing micro-batches that do not fill a step", micro % cfg.grad_accum_steps)
                self.optimizer.zero_grad(set_to_none=True)
                self._pending = []
            if window.micro:
                self._log(window, None, sinks)
            if evaluate is not None:
                self._evaluate(evaluate, sinks)
            self.save_checkpoint()
            return FitResult("completed", state.step, self._last_checkpoint, sinks.last)

    def _total_steps(self, data: DataFn) -> int | None:
        """Optimizer steps in the run: needed by the cosine schedule and the progress bar."""
        cfg = self.cfg
        if cfg.steps is not None:
            return cfg.steps
        try:
            n = len(data(0))  # type: ignore[arg-type]
        except TypeError:
            if cfg.schedule == "cosine":
                raise ValueError("schedule 'cosine' with 'epochs' needs data(epoch) to have a len(); "
                                 "set 'steps' instead, or schedule 'constant'") from None
            return None
        total = cfg.epochs * n // cfg.grad_accum_steps
        if total == 0:
            raise ValueError(f"{cfg.epochs} epoch(s) of {n} batches do not fill one step of "
                             f"grad_accum_steps={cfg.grad_accum_steps} micro-batches")
        return total

    def _micro_batches(self, data: DataFn) -> Iterator[Any]:
        """Batches from the current position on, across epochs, advancing ``self.state``.

        The position is advanced *before* the batch is processed, but a checkpoint is only taken
        after it has been, so a checkpoint's ``batches_in_epoch`` counts exactly the batches whose
        gradients are already in the weights.
        """
        state = self.state
        while self.cfg.epochs is None or state.epoch < self.cfg.epochs:
            for batch in itertools.islice(data(state.epoch), state.batches_in_epoch, None):
                state.batches_in_epoch += 1
                yield batch
            if state.batches_in_epoch == 0:
                raise ValueError(f"data(epoch={state.epoch}) yielded no batches")
            state.epoch += 1
            state.batches_in_epoch = 0

    def _backward(self, batch: Any, boundary: bool) -> list[tuple[Tensor, Mapping[str, float | Tensor], int]]:
        """Backpropagate a micro-batch: ``[(loss, logs, examples)]`` to log, one entry per loss computed.

        A loss with a ``backward_step(module, batches, backward)`` method (a contrastive loss whose
        accumulation must equal one batch of the whole step: ``feedrank.models.losses.CachedStep``)
        gets the step's micro-batches at once, on the last of them; nothing is logged before.
        """
        step = getattr(self.loss_fn, "backward_step", None)
        if step is None or self.cfg.grad_accum_steps == 1:
            with D.gradient_sync(self._wrapped, enabled=boundary):
                loss, logs = self._forward_backward(batch)
            return [(loss, logs, batch_size(batch))]
        self._pending.append(to_device(batch, self.env.device))
        if not boundary:
            return []
        batches, self._pending = self._pending, []

        def backward(t: Tensor, last: bool) -> None:
            with D.gradient_sync(self._wrapped, enabled=last):
                self.scaler.scale(t).backward()

        with self._autocast():
            loss, logs = step(self.module, batches, backward)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        return [(loss, logs, sum(batch_size(b) for b in batches))]

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.cfg.precision
        return (torch.autocast(self.env.device.type, dtype=_AMP_DTYPES[precision])
                if precision != "fp32" else contextlib.nullcontext())

    def _forward_backward(self, batch: Any) -> tuple[Tensor, Mapping[str, float | Tensor]]:
        batch = to_device(batch, self.env.device)
        with self._autocast():
            out = self.loss_fn(self.module, batch)
        loss, logs = self._check_loss_output(out)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        # Mean over micro-batches, so the accumulated gradient equals the big batch's gradient.
        self.scaler.scale(loss / self.cfg.grad_accum_steps).backward()
        return loss, logs

    def _check_loss_output(self, out: Any) -> tuple[Tensor, Mapping[str, float | Tensor]]:
        if not self._checked_loss_fn:  # once: the shape of the output does not change
            ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor)
                  and out[0].numel() == 1 and isinstance(out[1], Mapping))
            if not ok:
                raise TypeError("loss_fn(model, batch) must return (loss: scalar Tensor, logs: dict[str, float | "
                                f"Tensor]), got {type(out).__name__}: {out!r:.200}")
            if not out[0].requires_grad:
                raise ValueError("loss_fn returned a loss that does not require grad: is it detached, "
                                 "or computed under torch.no_grad()?")
            self._checked_loss_fn = True
        return out[0].reshape(()), out[1]

    def _optimizer_step(self, lr: float, need_norm: bool) -> tuple[Tensor | None, Tensor | None]:
        """One AdamW update; returns the pre-clip gradient norm (when clipping or when asked) and,
        under fp16, a 0-d device tensor that is 1 when the GradScaler skipped the update."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)  # clip and measure true gradients, not fp16-scaled ones
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = None
        if self.sharded is not None and (self.cfg.clip_grad_norm is not None or need_norm):
            norm = self.sharded.clip_grad_norm_(params, self.cfg.clip_grad_norm)  # global over shards
        elif self.cfg.sparse_embeddings and (self.cfg.clip_grad_norm is not None or need_norm):
            norm = clip_grads(params, self.cfg.clip_grad_norm)  # clip_grad_norm_ refuses sparse gradients
        elif self.cfg.clip_grad_norm is not None:
            norm = nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        elif need_norm:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        # The scale as a device tensor (get_scale() would sync): update() lowers it exactly when
        # the step was skipped (inf/NaN gradients; backoff_factor < 1) and raises it otherwise or keeps it.
        scale = self.scaler._get_scale_async().clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)  # skips the update if fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        skipped = None if scale is None else (self.scaler._get_scale_async() < scale).float()
        return norm, skipped

    def _raise_if_nonfinite(self) -> None:
        """Fail (on every rank together) before a NaN/inf loss reaches a log line or a checkpoint."""
        if D.any_rank(self.env, bool(self._nonfinite.item())):
            raise FloatingPointError(
                f"non-finite loss at or before step {self.state.step} (epoch {self.state.epoch}, batch "
                f"{self.state.batches_in_epoch}); last good checkpoint: {self._last_checkpoint}")

    def _log(self, window: _Window, grad_norm: Tensor | None, sinks: _Sinks) -> None:
        self._raise_if_nonfinite()
        keys = sorted(window.logs)
        local = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.env.device)
                             for v in (window.loss, *(window.logs[k] for k in keys))])
        local = local / window.micro
        fp16 = self.scaler.is_enabled()
        if fp16:  # every rank skips the same steps (the all-reduced gradients are the same)
            extra = [window.skipped, self.scaler._get_scale_async()]
            local = torch.cat([local, torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.env.device)
                                                   for v in extra])])
        values = D.mean_across_ranks(self.env, local).tolist()  # the one sync of a logging step
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        record: dict[str, float] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": values[0],
            **dict(zip(keys, values[1:])),
            "lr": self.optimizer.param_groups[0]["lr"],
            "examples_per_s": window.examples * self.env.world_size / elapsed,
        }
        if grad_norm is not None:
            full = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP DTensor
            record["grad_norm"] = float(full)
        if fp16:
            skipped, scale = round(values[-2]), values[-1]
            self.state.skipped_steps += skipped
            record |= {"loss_scale": scale, "skipped_steps": skipped, "skipped_steps_total": self.state.skipped_steps}
            if skipped:
                log.warning("fp16: the GradScaler skipped %d update(s) in the steps up to %d (inf/NaN gradients; "
                            "%d in all); loss scale now %g", skipped, self.state.step, self.state.skipped_steps, scale)
        window.reset()
        sinks.write(record)

    def _evaluate(self, evaluate: EvalFn, sinks: _Sinks) -> None:
        self.model.eval()
        try:
            with torch.no_grad():
                scores = dict(evaluate(self.model))
        finally:
            self.model.train()
        sinks.write({"step": self.state.step, **{f"eval/{k}": float(v) for k, v in scores.items()}})

    @contextlib.contextmanager
    def _sigterm_flag(self) -> Iterator[None]:
        """While fitting, SIGTERM only sets a flag: the loop checkpoints at the next step boundary.

        Python runs signal handlers in the main thread only; from another thread (a notebook
        worker, a test runner thread) the default handling is left alone.
        """
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigterm(signum: int, frame: object) -> None:
            log.warning("SIGTERM: will checkpoint and stop after the current step")
            self._stop_requested = True

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Sinks:
    """Where metrics go on rank 0: metrics.jsonl (machine), TensorBoard, the progress bar (human)."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, total: int | None, start_step: int, main: bool) -> None:
        self.last: dict[str, float] = {}
        self.bar = progress_bar(total=total, desc="train", unit="step", initial=start_step, enabled=main and cfg.progress)
        self.jsonl = None
        self.tb = None
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a killed run logged after the checkpoint we resume from.
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def __enter__(self) -> _Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

    def write(self, record: dict[str, float]) -> None:
        self.last |= record
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}",
                                 ex_s=f"{record['examples_per_s']:.0f}", refresh=False)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records a killed run wrote after checkpoint ``step`` (and a torn last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with staged_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                   sparse_tables: list[nn.Parameter] | None = None) -> torch.optim.Optimizer | SplitAdam:
    """AdamW with weight decay on matrices and embedding tables only (nanoGPT's split); with
    ``sparse_tables`` (``sparse_embeddings``), SparseAdam for those tables and AdamW for the rest.

    Decaying biases and norm gains only pulls them towards 0 for no regularisation benefit.
    The fused kernel (one launch for all parameters) exists for CPU and CUDA in torch 2.13.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    if sparse_tables:
        return split_adam(model, sparse_tables, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                          device=device)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=device.type in ("cpu", "cuda"))
