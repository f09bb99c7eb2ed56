"""Lab "precision": fp32, bf16 autocast and fp16 autocast (with and without a GradScaler), measured on
the two-tower and the ranker, trained by feedrank's own Trainer.

For each model and precision the lab trains the same initial weights on the same real batches and
records step time, the loss curve, a holdout metric (ranker: click AUC; two-tower: holdout in-batch
softmax loss), and for fp16 the GradScaler's scale after every step and the steps it skipped (the
scale falls, by ``backoff_factor``, exactly when ``update()`` found an inf/NaN gradient: that step's
``optimizer.step`` was skipped). "fp16, no scaler" is the Trainer with its scaler disabled.

Then it asks what fp16 loses without loss scaling, on the fp32-trained model's gradients:
- of the non-zero fp32 gradient values, the share below fp16's smallest subnormal (2**-24), the
  share in fp16's subnormal range (below 2**-14: fewer mantissa bits), and the share that cast to 0;
- the share of non-zero fp32 gradient values that come out exactly 0 from an fp16 autocast backward,
  without a scaler and with the scaler's initial scale (65536);
- fp32 master weights: the share of one AdamW step's non-zero updates that vanish when the weights are
  stored in bf16 / fp16 (``w + dw`` rounds back to ``w``). Autocast keeps the weights in fp32
  precisely so these updates add up.

Example::

    ctx = LabContext(root=Path("runs/labs"), name="precision", quick=True)
    write_result(ctx, run(ctx))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from feedrank.data.batch import Batch
from feedrank.data.collate import Collator
from feedrank.labs.base import LabContext, LabResult, Table, intra_op_threads
from feedrank.models.losses import two_tower_loss
from feedrank.models.ranker import ranker_loss
from feedrank.train.trainer import TrainConfig, Trainer

NAME = "precision"
TITLE = "Mixed precision: fp32, bf16 and fp16 with dynamic loss scaling"

FP16_MIN_SUBNORMAL = 2.0**-24  # smaller magnitudes round to 0 (below half of it) or to it
FP16_MIN_NORMAL = 2.0**-14  # below this fp16 is subnormal: fewer significant bits
PRECISIONS = ("fp32", "bf16", "fp16", "fp16_no_scaler")
RANKING_CONFIG = Path(__file__).parents[3] / "configs" / "ranking_demo.yaml"
MAX_HISTORY = 30  # both demo models' max_history_len


#: Intra-op threads for the CPU measurements: one, so that runs compare on a shared machine (with two
#: threads on two busy cores every op waits for the slower thread; the test suite measured ~3 ms vs
#: ~300 ms per step) and so that the figures are per core.
CPU_THREADS = 1


# ------------------------------------------------------------------------------------------------
# measurements (pure functions: the tests call them on hand-built tensors)


def underflow_stats(grads: Iterable[Tensor]) -> dict[str, float]:
    """What casting fp32 gradients to fp16 loses, as shares of their non-zero values.

    ``below_subnormal``: ``|g| < 2**-24`` (smaller than fp16's smallest subnormal);
    ``subnormal_or_below``: ``|g| < 2**-14`` (not an fp16 normal number); ``zeroed_fp16`` /
    ``zeroed_bf16``: non-zero values that become exactly 0 when cast. ``nonzero`` counts the values.

    >>> underflow_stats([torch.tensor([1.0, 1e-9, 0.0, 1e-6])])["below_subnormal"]
    0.3333333333333333
    """
    n = below = sub = z16 = zb16 = 0
    for g in grads:
        g = g.detach().float().flatten()
        g = g[g != 0]
        a = g.abs()
        n += g.numel()
        below += int((a < FP16_MIN_SUBNORMAL).sum())
        sub += int((a < FP16_MIN_NORMAL).sum())
        z16 += int((g.half() == 0).sum())
        zb16 += int((g.bfloat16() == 0).sum())
    share = (lambda k: k / n) if n else (lambda k: 0.0)
    return {"nonzero": n, "below_subnormal": share(below), "subnormal_or_below": share(sub),
            "zeroed_fp16": share(z16), "zeroed_bf16": share(zb16)}  # fmt: skip


def zeroed_share(reference: Sequence[Tensor], other: Sequence[Tensor]) -> float:
    """Share of the non-zero values of ``reference`` gradients that are exactly 0 in ``other``."""
    n = zeroed = 0
    for r, o in zip(reference, other, strict=True):
        nz = r != 0
        n += int(nz.sum())
        zeroed += int((nz & (o == 0)).sum())
    return zeroed / n if n else 0.0


def lost_updates(before: Sequence[Tensor], after: Sequence[Tensor], dtype: torch.dtype) -> float:
    """Share of the non-zero updates ``after - before`` that vanish if the weights are stored in
    ``dtype``: ``(before + update)`` rounds to the same ``dtype`` value as ``before``."""
    n = lost = 0
    for b, a in zip(before, after, strict=True):
        moved = a != b
        n += int(moved.sum())
        lost += int((moved & (a.to(dtype) == b.to(dtype))).sum())
    return lost / n if n else 0.0


@dataclass
class ScaleTrace:
    """The GradScaler's scale after every optimizer step, read from a running Trainer.

    ``observe(trainer)`` before each micro-batch (and once after ``fit``) records the scale once per
    completed step; ``scales[i]`` is the scale after ``i`` steps. A step was skipped exactly when the
    scale fell after it (``GradScaler.update`` multiplies by ``backoff_factor < 1`` only when the
    step found inf/NaN gradients, and then ``scaler.step`` did not call ``optimizer.step``).
    """

    scales: list[float] = field(default_factory=list)

    def observe(self, trainer: Trainer) -> None:
        if len(self.scales) <= trainer.state.step:
            self.scales.append(float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else 1.0)

    @property
    def skipped_steps(self) -> list[int]:
        """1-based numbers of the steps whose update was skipped."""
        return [i + 1 for i in range(len(self.scales) - 1) if self.scales[i + 1] < self.scales[i]]


def traced(batches: list[Batch], trainer: Trainer, trace: ScaleTrace, stamps: list[float]) -> Callable[[int], Iterable[Batch]]:
    """The Trainer's ``data(epoch)`` over ``batches`` that, before handing out each batch, records the
    scaler's scale (``trace``) and the time (``stamps``: consecutive differences are step times)."""

    def data(epoch: int) -> Iterable[Batch]:
        for batch in batches:
            trace.observe(trainer)
            stamps.append(time.perf_counter())
            yield batch

    return data


# ------------------------------------------------------------------------------------------------
# the models and data


@dataclass
class Task:
    """One model the lab trains: how to build it fresh, its loss, its holdout metric."""

    name: str
    build: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Batch], tuple[Tensor, Any]]
    lr: float
    metric_name: str
    metric: Callable[[nn.Module, list[Batch]], float]  # on the holdout batches, eval mode, no grad
    higher_is_better: bool


def split_batches(ctx: LabContext, n_train: int, n_holdout: int, batch_size: int) -> tuple[list[Batch], list[Batch]]:
    """``n_train`` train and ``n_holdout`` holdout Batches: the holdout is the test split when the
    feature build has one (the demo world's last day), else the train split's latest rows."""
    collate = Collator(max_history=MAX_HISTORY)
    try:
        hold_rows, train_rows = ctx.rows(n_holdout * batch_size, "test"), ctx.rows(n_train * batch_size)
    except KeyError:
        rows = ctx.rows((n_train + n_holdout) * batch_size)
        cut = max(batch_size, rows.num_rows - n_holdout * batch_size)
        train_rows, hold_rows = rows.slice(0, cut), rows.slice(cut)

    def cut_up(rows) -> list[Batch]:
        return [collate(rows.slice(i, batch_size)) for i in range(0, max(1, rows.num_rows - batch_size + 1), batch_size)]

    return cut_up(train_rows), cut_up(hold_rows)


def build_lab_ranker(ctx: LabContext) -> nn.Module:
    """``configs/ranking_demo.yaml``'s ranker without two-tower inputs and with negative_rate 1 (the
    lab trains on every impression), and without titles or history match (the labs' figures are of the ID-only
    ranker, docs/labs.md), seeded by ``ctx.seed``."""
    from feedrank.bundle import build_ranker
    from feedrank.config import to_dict
    from feedrank.train.ranking import load_ranking_config

    cfg = load_ranking_config(RANKING_CONFIG)
    cfg = dataclasses.replace(cfg, ranker=dataclasses.replace(cfg.ranker, two_tower_dim=0, negative_rate=1.0,
                                                              title_tokens=False, history_match=False,
                                                              item_id_dropout=0.0))
    torch.manual_seed(ctx.seed)
    return build_ranker(to_dict(cfg), ctx.vocabs)


@torch.no_grad()
def ranker_auc(model: nn.Module, batches: list[Batch]) -> float:
    """Click AUC of the ranker's top-slot click logit on ``batches``."""
    from feedrank.evaluate.metrics import auc

    device = next(model.parameters()).device
    scores, labels = [], []
    for b in batches:
        scores.append(model.predict(b.to(device))["click"].float().cpu().numpy())
        labels.append(b.clicked.numpy())
    return auc(np.concatenate(labels), np.concatenate(scores))


@torch.no_grad()
def holdout_loss(loss_fn: Callable, model: nn.Module, batches: list[Batch]) -> float:
    """Mean fp32 loss over ``batches``."""
    device = next(model.parameters()).device
    return float(np.mean([float(loss_fn(model, b.to(device))[0]) for b in batches]))


def tasks(ctx: LabContext) -> list[Task]:
    return [
        Task("two_tower", lambda: ctx.two_tower(), two_tower_loss, 1e-3, "holdout in-batch loss",
             functools.partial(holdout_loss, two_tower_loss), higher_is_better=False),
        Task("ranker", lambda: build_lab_ranker(ctx), ranker_loss, 2e-3, "holdout click AUC",
             ranker_auc, higher_is_better=True),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# one training run


@dataclass
class Run:
    task: str
    precision: str
    losses: list[float]
    step_s: list[float]
    scales: list[float]
    skipped_steps: list[int]
    metric: float
    model: nn.Module
    trainer: Trainer


def train(ctx: LabContext, task: Task, precision: str, batches: list[Batch], holdout: list[Batch], steps: int) -> Run:
    """Train ``task``'s fresh model for ``steps`` steps at ``precision`` with feedrank's Trainer
    (``fp16_no_scaler``: fp16 autocast with the Trainer's GradScaler disabled)."""
    model = task.build()
    with tempfile.TemporaryDirectory(prefix=f"lab-precision-{task.name}-") as tmp:
        cfg = TrainConfig(steps=steps, lr=task.lr, warmup_steps=max(1, steps // 10), weight_decay=0.0, log_every=1,
                          precision="fp16" if precision == "fp16_no_scaler" else precision,  # type: ignore[arg-type]
                          device=ctx.device, seed=ctx.seed, progress=False, out_dir=tmp)  # fmt: skip
        trainer = Trainer(model, task.loss_fn, cfg)
        if precision == "fp16_no_scaler":
            trainer.scaler = torch.amp.GradScaler(trainer.env.device.type, enabled=False)
        trace, stamps = ScaleTrace(), []
        try:
            trainer.fit(traced(batches, trainer, trace, stamps))
            status = ""
        except FloatingPointError as e:  # fp16 without a scaler may overflow to inf: a finding, not a crash
            status = str(e)
        stamps.append(time.perf_counter())
        trace.observe(trainer)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    metric = task.metric(trainer.model.eval(), holdout) if not status else math.nan
    return Run(task.name, precision, losses, list(np.diff(stamps)), trace.scales, trace.skipped_steps, metric,
               trainer.model, trainer)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# what fp16 loses, on the trained fp32 model


def grads_of(task: Task, model: nn.Module, batch: Batch, dtype: torch.dtype | None, scale: float = 1.0) -> list[Tensor]:
    """Parameter gradients of one batch (fp32, or under ``dtype`` autocast with the loss times ``scale``,
    unscaled afterwards in fp32 as GradScaler does)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    model.train()
    model.zero_grad(set_to_none=False)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        loss = task.loss_fn(model, batch)[0]
    (loss.float() * scale).backward()
    grads = [p.grad.detach().float() / scale for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def fp16_losses(task: Task, run: Run, batch: Batch) -> dict[str, float]:
    """Underflow and master-weight figures of the fp32 run's trained model (module docstring)."""
    model = run.model
    ref = grads_of(task, model, batch, None)
    stats = underflow_stats(ref)
    unscaled = grads_of(task, model, batch, torch.float16)
    scaled = grads_of(task, model, batch, torch.float16, scale=2.0**16)
    bf16 = grads_of(task, model, batch, torch.bfloat16)
    # One more AdamW step with the trainer's optimizer state (the end of the schedule's lr).
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    model.train()
    loss = task.loss_fn(model, batch.to(params[0].device))[0]
    loss.backward()
    run.trainer.optimizer.step()
    run.trainer.optimizer.zero_grad(set_to_none=True)
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return stats | {
        "zeroed_fp16_autocast_no_scaler": zeroed_share(ref, unscaled),
        "zeroed_fp16_autocast_scale_65536": zeroed_share(ref, scaled),
        "zeroed_bf16_autocast": zeroed_share(ref, bf16),
        "lost_updates_bf16_weights": lost_updates(before, after, torch.bfloat16),
        "lost_updates_fp16_weights": lost_updates(before, after, torch.float16),
    }


# ------------------------------------------------------------------------------------------------
# the lab


def _plot(ctx: LabContext, runs: list[Run]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r.task for r in runs}, key=[r.task for r in runs].index)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4))
    for ax, name in zip(np.atleast_1d(axes), names):
        for r in (r for r in runs if r.task == name):
            ax.plot(range(1, len(r.losses) + 1), r.losses, label=r.precision, lw=1.2)
        ax.set(title=f"{name}: training loss", xlabel="step", ylabel="loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in (r for r in runs if r.precision == "fp16"):
        line, = ax.step(range(len(r.scales)), r.scales, where="post", label=f"{r.task} (skipped {len(r.skipped_steps)})")
        ax.plot(r.skipped_steps, [r.scales[s] for s in r.skipped_steps], "x", color=line.get_color())
    ax.set_yscale("log", base=2)
    ax.set(title="fp16 GradScaler scale after each step (x = skipped step)", xlabel="step", ylabel="loss scale")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "scaler_scale.png", dpi=110)
    plt.close(fig)
    return ["loss_curves.png", "scaler_scale.png"]


def _ms(run: Run) -> float:
    """The fastest step in ms (the first, warm-up step left out): on a shared machine other processes
    only ever add time, so the least disturbed step is the best estimate of the step's own cost."""
    times = run.step_s[1:] or run.step_s
    return float(1e3 * min(times))


def _median_ms(run: Run) -> float:
    times = run.step_s[1:] or run.step_s
    return float(1e3 * statistics.median(times))


def _tail(values: list[float]) -> float:
    tail = values[-max(1, len(values) // 10):]
    return float(np.mean(tail)) if tail else math.nan


def run(ctx: LabContext) -> LabResult:
    steps, batch_size, n_holdout = (40, 512, 4) if ctx.quick else (200, 1024, 20)
    train_batches, holdout = split_batches(ctx, steps, n_holdout, batch_size)
    runs: list[Run] = []
    losses: dict[str, dict[str, float]] = {}
    with intra_op_threads(CPU_THREADS) if ctx.device == "cpu" else contextlib.nullcontext():
        threads = torch.get_num_threads()
        for task in tasks(ctx):
            for precision in PRECISIONS:
                runs.append(train(ctx, task, precision, train_batches, holdout, steps))
            losses[task.name] = fp16_losses(task, runs[-len(PRECISIONS)], train_batches[-1])
    plots = _plot(ctx, runs)

    by = {(r.task, r.precision): r for r in runs}
    metric_names = {t.name: t.metric_name for t in tasks(ctx)}
    rows = []
    for r in runs:
        base = by[(r.task, "fp32")]
        rows.append([r.task, r.precision, round(_ms(r), 2), round(_median_ms(r), 2), round(_ms(r) / _ms(base), 2), round(_tail(r.losses), 4),
                     metric_names[r.task], round(float(r.metric), 4), len(r.skipped_steps),
                     r.scales[-1] if r.precision == "fp16" else "-"])  # fmt: skip
    under_rows = [[name, s["nonzero"], f"{s['below_subnormal']:.2%}", f"{s['subnormal_or_below']:.2%}",
                   f"{s['zeroed_fp16']:.2%}", f"{s['zeroed_fp16_autocast_no_scaler']:.2%}",
                   f"{s['zeroed_fp16_autocast_scale_65536']:.2%}", f"{s['zeroed_bf16_autocast']:.2%}",
                   f"{s['lost_updates_bf16_weights']:.1%}", f"{s['lost_updates_fp16_weights']:.1%}"]
                  for name, s in losses.items()]  # fmt: skip
    figures: dict[str, Any] = {
        "steps": steps, "batch_size": batch_size, "device": ctx.device, "threads": threads,
        "cpu_features": cpu_features(),
        "runs": {f"{r.task}/{r.precision}": {
            "step_ms_min": _ms(r), "step_ms_median": _median_ms(r), "final_loss": _tail(r.losses), "metric": r.metric, "metric_name": metric_names[r.task],
            "skipped_steps": r.skipped_steps, "scale_first": r.scales[0], "scale_last": r.scales[-1],
            "scales": r.scales, "losses": r.losses,
        } for r in runs},
        "fp16_losses": losses,
    }  # fmt: skip
    return LabResult(
        name=NAME, title=TITLE, summary=_summary(ctx, by, losses, metric_names), plots=plots, figures=figures,
        device=ctx.device, quick=ctx.quick,
        tables=[
            Table("Training by precision (same initial weights, same batches; step = forward+backward+AdamW)",
                  ["model", "precision", "min ms/step", "median ms/step", "x fp32 (min)", "final train loss", "holdout metric", "value",
                   "skipped steps", "final scale"], rows),
            Table("What fp16 loses without loss scaling (gradients of the fp32-trained model, one batch)",
                  ["model", "non-zero grads", "< 2^-24", "< 2^-14 (subnormal)", "0 after fp16 cast",
                   "0 in fp16 autocast, no scaler", "0 in fp16 autocast, scale 2^16", "0 in bf16 autocast",
                   "AdamW updates lost, bf16 weights", "AdamW updates lost, fp16 weights"], under_rows),
        ],
    )  # fmt: skip


def cpu_features() -> str:
    """The CPU's bf16/fp16 instruction-set extensions (Linux ``/proc/cpuinfo``), which decide whether
    autocast can be fast on it: ``avx512_bf16`` / ``amx_bf16`` for bf16, ``avx512_fp16`` / ``amx_fp16`` for fp16."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
    return " ".join(f for f in wanted if f in flags) or "none of avx512_bf16/amx_bf16/avx512_fp16/amx_fp16"


def _summary(ctx: LabContext, by: dict[tuple[str, str], Run], losses: dict[str, dict[str, float]],
             metric_names: dict[str, str]) -> str:  # fmt: skip
    rk, tt = "ranker", "two_tower"
    f32, b16, f16, raw = (by[(rk, p)] for p in PRECISIONS)
    t32, tb16, t16, traw = (by[(tt, p)] for p in PRECISIONS)
    lr, lt = losses[rk], losses[tt]
    auc_gap = max(abs(r.metric - f32.metric) for r in (b16, f16))
    speed = (f"Step time (fastest of {len(f32.step_s) - 1} steps, {ctx.device}{', 1 thread' if ctx.device == 'cpu' else ''}): ranker {_ms(f32):.1f} ms fp32, {_ms(b16):.1f} ms bf16, {_ms(f16):.1f} ms fp16; "
             f"two-tower {_ms(t32):.1f} / {_ms(tb16):.1f} / {_ms(t16):.1f} ms. ")
    if ctx.device == "cpu":
        faster = [f"{name} {p}" for name, runs in ((rk, (b16, f16)), (tt, (tb16, t16))) for r, p in zip(runs, ("bf16", "fp16"))
                  if _ms(r) < 0.95 * _ms(by[(name, "fp32")])]  # fmt: skip
        speed += (f"This CPU has {cpu_features()}; autocast runs on it ({'faster than fp32: ' + ', '.join(faster) if faster else 'never faster than fp32 here'}), "
                  "but the small GEMMs of these models gain little and each autocast op pays for its casts, fp16 most "
                  "where the CPU has no native fp16 arithmetic; the large speed-up is a GPU's tensor cores (--device cuda). ")
    return (
        f"{speed}Holdout quality: ranker {metric_names[rk]} {f32.metric:.4f} fp32, {b16.metric:.4f} bf16, "
        f"{f16.metric:.4f} fp16 (largest gap {auc_gap:.4f}); two-tower {metric_names[tt]} {t32.metric:.4f} / "
        f"{tb16.metric:.4f} / {t16.metric:.4f}. fp16 with the GradScaler skipped {len(f16.skipped_steps)} ranker and "
        f"{len(t16.skipped_steps)} two-tower steps (scale {f16.scales[0]:g} -> {f16.scales[-1]:g} and "
        f"{t16.scales[0]:g} -> {t16.scales[-1]:g}): each skip is a step of data thrown away while the scale searches. "
        f"Without a scaler, {lr['below_subnormal']:.2%} (ranker) and {lt['below_subnormal']:.2%} (two-tower) of the "
        f"non-zero fp32 gradient values lie below fp16's smallest subnormal 2^-24 and "
        f"{lr['subnormal_or_below']:.1%} / {lt['subnormal_or_below']:.1%} below its smallest normal 2^-14 (lost bits); "
        f"an fp16 autocast backward zeroes {lr['zeroed_fp16_autocast_no_scaler']:.2%} / "
        f"{lt['zeroed_fp16_autocast_no_scaler']:.2%} of them, {lr['zeroed_fp16_autocast_scale_65536']:.2%} / "
        f"{lt['zeroed_fp16_autocast_scale_65536']:.2%} with the scale 2^16 (holdout without a scaler: ranker "
        f"{raw.metric:.4f}, two-tower {traw.metric:.4f}: these shallow models lose little, deeper ones with smaller "
        f"gradients lose more). bf16 keeps fp32's exponent range: {lr['zeroed_bf16_autocast']:.2%} / "
        f"{lt['zeroed_bf16_autocast']:.2%} zeroed, no scaler, no skipped steps, no scale to tune, at fp16's speed on "
        "hardware with bf16 units (A100/H100, recent CPUs): that is why bf16 became the default. fp32 master "
        f"weights matter most for bf16: with the weights stored in bf16 (8 significant bits), "
        f"{lr['lost_updates_bf16_weights']:.0%} of one late AdamW step's non-zero updates round away in the ranker "
        f"({lt['lost_updates_bf16_weights']:.0%} two-tower; fp16 weights {lr['lost_updates_fp16_weights']:.0%} / "
        f"{lt['lost_updates_fp16_weights']:.0%}): once lr x update is below half a bf16 ulp of the weight (small "
        "learning rates, late in a cosine schedule, long runs) training silently stops. Autocast keeps fp32 weights "
        "and casts per op, which is why it needs no master copy of its own; pure-bf16 training needs one (or "
        "stochastic rounding / Kahan-compensated optimizers)."
    )
