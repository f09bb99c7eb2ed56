"""The torchrun side of the ddp lab: run by every rank, rank 0 writes what was measured.

Launched by ``feedrank.labs.ddp.launch`` as ``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m feedrank.labs.ddp_worker ...`` (as a module: a script path would put
``feedrank/labs`` first on ``sys.path``, where ``profile.py`` shadows the standard library's).
The parent passes its ``LabContext`` (as JSON) and has already simulated the world and built its
features, so the ranks rebuild the same context and only read them.

What it does, on the demo two-tower and real Batches (each global batch split in two, one half
per rank):

1. **equality**: N optimizer steps (each of ``accum`` micro-batches, the first ones under
   ``no_sync``) with ``ScratchDDP`` and with ``torch.nn.parallel.DistributedDataParallel`` from
   the same start; rank 1 perturbs its initial weights first, so the broadcast is exercised.
   Final parameters are saved per rank and wrapper (``--save-params``) and compared.
2. **sweep**: step time, all-reduce calls per step and the share of communication that overlapped
   backward, per bucket size (and DDP's step time at the same ``bucket_cap_mb``).
3. **trace**: a ``torch.profiler`` Chrome trace of rank 0 over a few steps at the smallest bucket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from feedrank.data.batch import Batch
from feedrank.labs.base import LabContext
from feedrank.labs.ddp_scratch import ScratchDDP, overlap_share
from feedrank.models.losses import select_rows, two_tower_loss
from feedrank.train.distributed import init_distributed, shutdown

#: A collective waits this long for its peer before raising: under the launcher's deadline
#: (``feedrank.labs.ddp.launch``), so a rank whose peer died fails with its own error.
COLLECTIVE_TIMEOUT_S = 120.0


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s contiguous share of a global batch."""
    per = len(batch) // world
    return select_rows(batch, torch.arange(rank * per, (rank + 1) * per))


def wrap(kind: str, model: nn.Module, bucket_bytes: int) -> nn.Module:
    if kind == "scratch":
        return ScratchDDP(model, bucket_bytes=bucket_bytes)
    return DistributedDataParallel(model, bucket_cap_mb=bucket_bytes / 2**20)


def train_step(wrapped: nn.Module, opt: torch.optim.Optimizer, micro: list[Batch]) -> None:
    """One optimizer step over ``micro`` micro-batches: all but the last under ``no_sync``."""
    for j, batch in enumerate(micro):
        sync = contextlib.nullcontext() if j == len(micro) - 1 else wrapped.no_sync()
        with sync:
            loss, _ = two_tower_loss(wrapped, batch)
            (loss / len(micro)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fresh_model(ctx: LabContext, rank: int) -> nn.Module:
    model = ctx.two_tower()
    if rank:  # a different start on rank 1: only the wrapper's broadcast makes the replicas equal
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model


def equality(ctx: LabContext, batches: list[Batch], args: argparse.Namespace, rank: int, world: int) -> dict:
    finals = {}
    for kind in ("scratch", "ddp"):
        torch.manual_seed(1234 + rank)
        wrapped = wrap(kind, fresh_model(ctx, rank), args.bucket_bytes[0])
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, foreach=False)
        for step in range(args.steps):
            micro = batches[step * args.accum: (step + 1) * args.accum]
            train_step(wrapped, opt, [shard(b, rank, world) for b in micro])
        finals[kind] = {k: v.detach().clone() for k, v in wrapped.module.state_dict().items()}
        if args.save_params:
            torch.save(finals[kind], Path(args.save_params) / f"final_{kind}_rank{rank}.pt")
    diff = max(float((finals["scratch"][k].float() - finals["ddp"][k].float()).abs().max()) for k in finals["ddp"])
    return {"steps": args.steps, "accum": args.accum, "max_abs_diff_scratch_vs_ddp": diff}


def sweep(ctx: LabContext, batches: list[Batch], args: argparse.Namespace, rank: int, world: int) -> list[dict]:
    rows = []
    shards = [shard(b, rank, world) for b in batches]
    for bucket_bytes in args.bucket_bytes:
        row: dict = {"bucket_bytes": bucket_bytes}
        for kind in ("scratch", "ddp"):
            wrapped = wrap(kind, fresh_model(ctx, rank), bucket_bytes)
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, foreach=False)
            times, calls, overlaps = [], [], []
            for i in range(args.warmup + args.timed):
                dist.barrier()
                if kind == "scratch":
                    wrapped.stats.reset()
                start = time.perf_counter()
                train_step(wrapped, opt, [shards[i % len(shards)]])
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
                    if kind == "scratch":
                        stats = wrapped.stats
                        calls.append(stats.all_reduce_calls)
                        overlaps.append(overlap_share(stats.intervals, stats.backward_ends[-1]))
                        row["timeline_ms"] = {  # the last timed step, relative to its start
                            "all_reduce": [[1000 * (a - start), 1000 * (b - start)] for a, b in stats.intervals],
                            "backward_end": 1000 * (stats.backward_ends[-1] - start)}
            row[f"{kind}_step_ms"] = 1000 * statistics.median(times)
            if kind == "scratch":
                row["buckets"] = len(wrapped.buckets)
                row["all_reduce_calls_per_step"] = statistics.mean(calls)
                row["overlap_share"] = statistics.mean(overlaps)
        rows.append(row)
    return rows


def trace(ctx: LabContext, batches: list[Batch], args: argparse.Namespace, rank: int, world: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    wrapped = wrap("scratch", fresh_model(ctx, rank), min(args.bucket_bytes))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, foreach=False)
    shards = [shard(b, rank, world) for b in batches]
    train_step(wrapped, opt, [shards[0]])  # warm-up outside the trace
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(3):
            train_step(wrapped, opt, [shards[(i + 1) % len(shards)]])
    if rank == 0:
        prof.export_chrome_trace(str(args.trace))
    comm = [e for e in prof.events() if "all_reduce" in e.name or "allreduce" in e.name]
    return {"trace": str(args.trace), "all_reduce_events": len(comm),
            "bucket_bytes": min(args.bucket_bytes), "buckets": len(wrapped.buckets)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", required=True, help="the parent's LabContext as JSON (feedrank.labs.ddp.context_json)")
    p.add_argument("--out", required=True, help="rank 0 writes its JSON here")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="global rows per micro-batch (split over ranks)")
    p.add_argument("--bucket-bytes", type=int, nargs="+", default=[64 * 1024])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=8)
    p.add_argument("--parts", nargs="+", default=["equality", "sweep", "trace"])
    p.add_argument("--save-params", default=None, help="folder for each rank's final parameters")
    p.add_argument("--trace", default=None, help="Chrome trace path (part 'trace')")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # identical reductions in both processes, and 2 ranks on 2 cores
    env = init_distributed("cpu", timeout_s=COLLECTIVE_TIMEOUT_S)
    rank, world = env.rank, env.world_size
    try:
        raw = json.loads(args.ctx)
        ctx = LabContext(**{**raw, "root": Path(raw["root"]), "log": Path(raw["log"]) if raw["log"] else None})
        need = max(args.steps * args.accum, args.warmup + args.timed)
        batches = ctx.batches(need, args.batch_size)
        if len(batches) < need:
            raise ValueError(f"the world has only {len(batches)} batches of {args.batch_size} rows; need {need}")
        result: dict = {"world_size": world, "batch_size": args.batch_size}
        parts = {"equality": equality, "sweep": sweep, "trace": trace}
        for name in args.parts:
            result[name] = parts[name](ctx, batches, args, rank, world)
        if rank == 0:
            Path(args.out).write_text(json.dumps(result, indent=2))
    finally:
        shutdown(env)  # a barrier first on a normal exit, none while an exception propagates
    return 0


if __name__ == "__main__":
    sys.exit(main())
