"""Does data parallelism change the retrieval objective? The issue #12 figure, before and after GlobalPool.

One batch of ``--batch`` rows of the demo world (clicked rows for the softmax losses, which train on
those only; every row for BCE) against the same rows split in two, from the same weights, on the
demo two-tower (``configs/demo.yaml``): the relative L2 error of the whole gradient,
``|g_split - g_full| / |g_full|``, for

- ``accumulation``: the two halves one after the other in one process, each loss / 2 (what the
  trainer's ``grad_accum_steps: 2`` did, and does with ``two_tower.accumulation: micro_batches``);
- ``accumulation_cached``: the two halves as one ``CachedStep`` (the two-pass scheme the
  retrieval task now uses by default; its sampled negatives: one draw per half);
- ``ddp local``: 2 gloo ranks, one half each, gradients averaged as DDP does, each rank's loss
  its own batch's (``two_tower_loss`` without a pool: DDP before this change, or
  ``two_tower.data_parallel_loss: local``);
- ``ddp global``: the same with ``GlobalPool`` (what the retrieval task now does under torchrun),
  with equal halves and with an unequal split (5/8 and 3/8 of the rows).

Losses: ``in_batch``; ``sampled`` with the demo's uniform sampler (256 negatives, every forward
seeded alike, so the split and the full batch draw the same ids; the negatives' ages are drawn
from each batch's own positives, so a split still sees other ages); ``sampled_exact``, the
``all`` sampler without the age input (the same negatives everywhere: what is left is the
objective alone); ``bce``. Launched under ``torchrun`` (2 ranks) by
``feedrank.train.distributed.run_torchrun``; prints the table, and what the pool and the cached
step cost (median ms: one rank's half without / with the pool; both halves accumulated plain /
cached), and writes JSON.

    python benchmarks/dp_objective.py --batch 256 --out runs/bench/dp_objective.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from feedrank.labs.base import LabContext
from feedrank.models.losses import CachedStep, GlobalPool, select_rows, two_tower_loss

LOSSES = {
    "in_batch": {"loss": "in_batch"},
    "sampled": {"loss": "sampled"},
    "sampled_exact": {"loss": "sampled", "negative_sampler": "all", "freshness_dim": 0},
    "bce": {"loss": "bce"},
}
SEED = 11  # every forward that draws negatives starts from it


def full_batch(ctx: LabContext, name: str, rows: int):
    """``rows`` rows of the demo world, weighted by the demo's label config as the retrieval task
    weights them; the clicked ones for the softmax losses (which train on those only)."""
    from feedrank.data.collate import Collator
    from feedrank.labs.base import DEMO_CONFIG
    from feedrank.train.retrieval import LabelWeights, load_run_config
    from feedrank.train.task import batch_limits

    softmax = LOSSES[name]["loss"] != "bce"
    collate = Collator(max_history=30, limits=batch_limits(ctx.vocabs),
                       weight=LabelWeights(load_run_config(DEMO_CONFIG).labels))
    batch = collate(ctx.rows(20 * rows if softmax else rows))
    if softmax:
        batch = select_rows(batch, torch.nonzero(batch.clicked > 0).squeeze(1)[:rows])
    if len(batch) < rows:
        raise ValueError(f"only {len(batch)} usable rows, {rows} asked: ask for a smaller --batch")
    return batch


def gradient(model: torch.nn.Module, parts, pool: GlobalPool | None = None) -> torch.Tensor:
    """The gradient of the mean of ``parts``' losses (each loss / len(parts)), flattened."""
    model.zero_grad(set_to_none=True)
    for part in parts:
        torch.manual_seed(SEED)
        (two_tower_loss(model, part, pool)[0] / len(parts)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def cached_gradient(model: torch.nn.Module, parts) -> torch.Tensor:
    """The gradient of ``parts`` as the micro-batches of one ``CachedStep`` (the trainer's default)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    CachedStep().backward_step(model, parts, lambda t, last: t.backward())
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def averaged(grad: torch.Tensor) -> torch.Tensor:
    """The mean over ranks: what DDP's all-reduce leaves on every rank."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / dist.get_world_size()


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def timed_ms(step, n: int) -> float:
    """Median ms of ``step()`` (ranks in step: a barrier before each)."""
    times = []
    for _ in range(n):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = LabContext(root=Path(args.root), name="dp_objective", quick=True, seed=args.seed)
    pool = GlobalPool.new()
    catalogue = catalogue_of(ctx)
    results = {}
    for name, overrides in LOSSES.items():
        big = full_batch(ctx, name, args.batch)
        model = ctx.two_tower(**overrides)
        if model.cfg.loss == "sampled":
            model.attach_catalogue(*catalogue)
        want = gradient(model, [big])
        half = args.batch // 2
        halves = [select_rows(big, torch.arange(0, half)), select_rows(big, torch.arange(half, args.batch))]
        cut = args.batch * 5 // 8
        unequal = [select_rows(big, torch.arange(0, cut)), select_rows(big, torch.arange(cut, args.batch))]
        timing = {
            "local": timed_ms(lambda: gradient(model, [halves[rank]]), args.timed),
            "global": timed_ms(lambda: gradient(model, [halves[rank]], pool), args.timed),
            "micro_batches": timed_ms(lambda: gradient(model, halves), args.timed),
            "cached": timed_ms(lambda: cached_gradient(model, halves), args.timed),
        }
        results[name] = {
            "accumulation": relative(gradient(model, halves), want),
            "accumulation_cached": relative(cached_gradient(model, halves), want),
            "ddp_local": relative(averaged(gradient(model, [halves[rank]])), want),
            "ddp_global": relative(averaged(gradient(model, [halves[rank]], pool)), want),
            "ddp_global_unequal": relative(averaged(gradient(model, [unequal[rank]], pool)), want),
            **{f"ms_{k}": v for k, v in timing.items()},
        }
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"batch": args.batch, "world": world, "relative_l2": results}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def catalogue_of(ctx: LabContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The demo catalogue's item features and click counts, as the retrieval task attaches them."""
    from feedrank.bundle import catalogue_item_cats
    from feedrank.features.build import FeatureConfig
    from feedrank.train.task import training_catalogue

    cat = training_catalogue(ctx.world_log(), ctx.vocabs, FeatureConfig(split_at=ctx.split_at(), history_len=50))
    return catalogue_item_cats(cat), torch.tensor(cat["train_clicks"].to_numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=256, help="rows of the full batch (split in two)")
    p.add_argument("--root", default="runs/bench/dp_objective", help="where the demo world and features are built")
    p.add_argument("--out", default="runs/bench/dp_objective.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timed", type=int, default=20, help="steps timed per loss and pool (median)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ranks are killed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from feedrank.train.distributed import run_torchrun

    LabContext(root=Path(args.root), name="dp_objective", quick=True, seed=args.seed).features_dir()  # once, here
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--batch", str(args.batch), "--root", args.root, "--out", args.out, "--seed", str(args.seed), "--timed", str(args.timed)]
    code, stderr = run_torchrun(cmd, args.timeout, {**os.environ, "OMP_NUM_THREADS": "1"})
    if code != 0:
        raise SystemExit(f"torchrun failed with {code}:\n{stderr[-3000:]}")
    result = json.loads(Path(args.out).read_text())
    cols = ["accumulation", "accumulation_cached", "ddp_local", "ddp_global", "ddp_global_unequal"]
    print(f"relative gradient error vs one {args.batch}-row batch, split in 2 (2 gloo ranks for ddp_*)")
    print(f"{'loss':<14}" + "".join(f"{c:>20}" for c in cols))
    for name, row in result["relative_l2"].items():
        print(f"{name:<14}" + "".join(f"{row[c]:>20.2e}" for c in cols))
    print(f"ms, median of {args.timed}: one rank's {args.batch // 2} rows forward + backward without / with the pool; "
          f"both halves accumulated plain / cached")
    print(f"{'loss':<14}{'local':>10}{'global':>10}{'ratio':>7}{'micro_batches':>15}{'cached':>10}{'ratio':>7}")
    for name, r in result["relative_l2"].items():
        print(f"{name:<14}{r['ms_local']:>10.1f}{r['ms_global']:>10.1f}{r['ms_global'] / r['ms_local']:>7.2f}"
              f"{r['ms_micro_batches']:>15.1f}{r['ms_cached']:>10.1f}{r['ms_cached'] / r['ms_micro_batches']:>7.2f}")
    print(f"json: {args.out}")


if __name__ == "__main__":
    main()
