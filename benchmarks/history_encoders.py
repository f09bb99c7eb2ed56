"""Two-tower training cost per history encoder: throughput (fp32 vs bf16 autocast) and checkpointing memory.

What is measured, on CPU or one CUDA device, with batch ``--batch`` (512) and padded history
length 50 (random lengths 0..50):

- throughput: examples/s of a full training step (``two_tower_loss`` forward, backward, Adam
  step), median over ``--steps`` timed steps after two warm-up steps (on CUDA each step ends with a
  synchronize, so the time is the device's, not the launch queue's);
- memory: peak bytes held by torch's allocator during one forward + backward, above what was
  live before it. On CPU it is read from the allocation/free events of ``torch.profiler``
  (profile_memory=True), on CUDA from ``torch.cuda.max_memory_allocated``. Either way it counts
  every tensor the step allocates (activations saved for backward, temporaries, gradients), not
  the process RSS or the allocator's cache. Gradient checkpointing only drops the encoder's
  activations, so the saving is reported for the whole model step, which is what decides whether
  a batch fits.

Run: ``.venv/bin/python benchmarks/history_encoders.py [--device cuda] [--batch 512] [--steps 10]
[--threads 1] [--out runs/bench/history_encoders.json]`` (on a CPU shared with other jobs,
``--threads 1`` gives far steadier figures.)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from feedrank.data.batch import Batch
from feedrank.models.losses import two_tower_loss
from feedrank.models.two_tower import TwoTower, TwoTowerConfig

HISTORY_LEN = 50
N_USERS, N_ITEMS = 50_000, 20_000
USER_CAT_SIZES, ITEM_CAT_SIZES = [10, 50], [200, 5, 30]
N_COUNTERS = 4
ENCODERS = {
    "mean": {"history_encoder": "mean"},
    "attention": {"history_encoder": "attention", "attention_query": "user"},
    "transformer": {"history_encoder": "transformer", "n_layers": 2, "n_heads": 2},
}


def synthetic_batch(batch_size: int, seed: int = 0) -> Batch:
    """A batch of clicked impressions (every row is a training pair for the in-batch softmax)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, HISTORY_LEN + 1, (batch_size,), generator=g)
    mask = torch.arange(HISTORY_LEN)[None, :] < lengths[:, None]
    ints = lambda high, *shape: torch.randint(2, high, shape, generator=g)  # noqa: E731
    return Batch(
        user=ints(N_USERS, batch_size),
        user_cats=torch.stack([ints(s, batch_size) for s in USER_CAT_SIZES], dim=1),
        history=ints(N_ITEMS, batch_size, HISTORY_LEN) * mask,
        history_mask=mask,
        item=ints(N_ITEMS, batch_size),
        item_cats=torch.stack([ints(s, batch_size) for s in ITEM_CAT_SIZES], dim=1),
        item_age_h=torch.rand(batch_size, generator=g) * 72,
        counters=torch.rand(batch_size, N_COUNTERS, generator=g),
        position=torch.zeros(batch_size, dtype=torch.long),
        clicked=torch.ones(batch_size),
        dwell_s=torch.zeros(batch_size),
        shared=torch.zeros(batch_size),
        hidden=torch.zeros(batch_size),
        weight=torch.ones(batch_size),
        item_logq=torch.full((batch_size,), -9.0),
        request=torch.arange(batch_size),
    )


def build(encoder: str, device: torch.device, grad_checkpointing: bool = False) -> TwoTower:
    torch.manual_seed(0)
    cfg = TwoTowerConfig(**ENCODERS[encoder], grad_checkpointing=grad_checkpointing)
    return TwoTower(cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, N_COUNTERS).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(encoder: str, bf16: bool, batch: Batch, steps: int) -> float:
    """Median examples/s of full training steps."""
    device = batch.item.device
    model = build(encoder, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = two_tower_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def peak_step_bytes(encoder: str, grad_checkpointing: bool, batch: Batch) -> int:
    """Peak allocator bytes above the starting level during one forward + backward."""
    device = batch.item.device
    model = build(encoder, device, grad_checkpointing)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss, _ = two_tower_loss(model, batch)
        loss.backward()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = two_tower_loss(model, batch)
        loss.backward()
    # Private but stable: the raw allocation (+bytes) / free (-bytes) events in time order.
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=512, help="examples per training step")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = synthetic_batch(args.batch).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"batch {args.batch}, history length {HISTORY_LEN}, torch {torch.__version__}, {where}")

    rows = []
    print(f"\n{'encoder':<12} {'fp32 ex/s':>10} {'bf16 ex/s':>10} {'bf16/fp32':>10}")
    for encoder in ENCODERS:
        fp32 = throughput(encoder, False, batch, args.steps)
        bf16 = throughput(encoder, True, batch, args.steps)
        rows.append({"encoder": encoder, "fp32_examples_per_s": fp32, "bf16_examples_per_s": bf16})
        print(f"{encoder:<12} {fp32:>10.0f} {bf16:>10.0f} {bf16 / fp32:>10.2f}")
    mean_fp32 = rows[0]["fp32_examples_per_s"]
    print("fp32 cost relative to mean: " + ", ".join(f"{r['encoder']} {mean_fp32 / r['fp32_examples_per_s']:.2f}x" for r in rows))

    memory = []
    print(f"\n{'encoder':<12} {'peak MB':>9} {'ckpt MB':>9} {'saved':>7}   (fp32 forward+backward, whole model)")
    for encoder in ("attention", "transformer"):
        plain, ckpt = (peak_step_bytes(encoder, flag, batch) for flag in (False, True))
        memory.append({"encoder": encoder, "peak_bytes": plain, "checkpointed_peak_bytes": ckpt})
        print(f"{encoder:<12} {plain / 1e6:>9.1f} {ckpt / 1e6:>9.1f} {1 - ckpt / plain:>7.1%}")

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"batch": args.batch, "history_len": HISTORY_LEN, "device": where,
                  "throughput": rows, "memory": memory, "config": dataclasses.asdict(TwoTowerConfig())}
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
