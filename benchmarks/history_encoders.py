"""Two-tower training cost per history encoder: throughput (fp32 vs bf16 autocast) and checkpointing memory.

What is measured, on CPU, with batch 512 and padded history length 50 (random lengths 0..50):

- throughput: examples/s of a full training step (``two_tower_loss`` forward, backward, Adam
  step), median over ``--steps`` timed steps after two warm-up steps;
- memory: peak bytes held by torch's CPU allocator during one forward + backward, above what was
  live before it, read from the allocation/free events of ``torch.profiler`` (profile_memory=True).
  It counts every tensor the step allocates (activations saved for backward, temporaries,
  gradients), not the process RSS, so allocator caching and Python objects do not blur it.
  Gradient checkpointing only drops the encoder's activations, so the saving is reported for the
  whole model step, which is what decides whether a batch fits.

Run: ``.venv/bin/python benchmarks/history_encoders.py [--steps 10] [--threads 1] [--out runs/bench/history_encoders.json]``
(on a machine shared with other jobs, ``--threads 1`` gives far steadier figures.)
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

BATCH, HISTORY_LEN = 512, 50
N_USERS, N_ITEMS = 50_000, 20_000
USER_CAT_SIZES, ITEM_CAT_SIZES = [10, 50], [200, 5, 30]
N_COUNTERS = 4
ENCODERS = {
    "mean": {"history_encoder": "mean"},
    "attention": {"history_encoder": "attention", "attention_query": "user"},
    "transformer": {"history_encoder": "transformer", "n_layers": 2, "n_heads": 2},
}


def synthetic_batch(seed: int = 0) -> Batch:
    """A batch of clicked impressions (every row is a training pair for the in-batch softmax)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, HISTORY_LEN + 1, (BATCH,), generator=g)
    mask = torch.arange(HISTORY_LEN)[None, :] < lengths[:, None]
    ints = lambda high, *shape: torch.randint(2, high, shape, generator=g)  # noqa: E731
    return Batch(
        user=ints(N_USERS, BATCH),
        user_cats=torch.stack([ints(s, BATCH) for s in USER_CAT_SIZES], dim=1),
        history=ints(N_ITEMS, BATCH, HISTORY_LEN) * mask,
        history_mask=mask,
        item=ints(N_ITEMS, BATCH),
        item_cats=torch.stack([ints(s, BATCH) for s in ITEM_CAT_SIZES], dim=1),
        item_age_h=torch.rand(BATCH, generator=g) * 72,
        counters=torch.rand(BATCH, N_COUNTERS, generator=g),
        position=torch.zeros(BATCH, dtype=torch.long),
        clicked=torch.ones(BATCH),
        dwell_s=torch.zeros(BATCH),
        shared=torch.zeros(BATCH),
        hidden=torch.zeros(BATCH),
        weight=torch.ones(BATCH),
        item_logq=torch.full((BATCH,), -9.0),
        request=torch.arange(BATCH),
    )


def build(encoder: str, grad_checkpointing: bool = False) -> TwoTower:
    torch.manual_seed(0)
    cfg = TwoTowerConfig(**ENCODERS[encoder], grad_checkpointing=grad_checkpointing)
    return TwoTower(cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, N_COUNTERS)


def throughput(encoder: str, bf16: bool, batch: Batch, steps: int) -> float:
    """Median examples/s of full training steps."""
    model = build(encoder)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = two_tower_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def peak_step_bytes(encoder: str, grad_checkpointing: bool, batch: Batch) -> int:
    """Peak allocator bytes above the starting level during one forward + backward."""
    model = build(encoder, grad_checkpointing)
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = synthetic_batch()
    print(f"batch {BATCH}, history length {HISTORY_LEN}, torch {torch.__version__}, {torch.get_num_threads()} threads")

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
        result = {"batch": BATCH, "history_len": HISTORY_LEN, "threads": torch.get_num_threads(),
                  "throughput": rows, "memory": memory, "config": dataclasses.asdict(TwoTowerConfig())}
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
