"""Per-step cost of two-tower training with the logQ-corrected sampled softmax at 100k, 1M and 10M items.

For each catalogue size it builds the real ``TwoTower`` (``loss: sampled``, ``negative_sampler:
popularity``, logQ correction on) over a synthetic catalogue with Zipf-like click counts, and times,
per optimizer step on one fixed batch (median of ``--steps`` after ``--warmup``):

- ``draw``: the sampler alone (``NegativeSampler.sample``: inverse-CDF binary search, O(K log n));
- ``fwd``: forward of both towers on the batch and the K negatives, plus the loss;
- ``bwd``: backward;
- ``opt``: the trainer's own optimizer step (``Trainer._optimizer_step``: gradient clipping at the
  default ``clip_grad_norm`` 1.0, the update, zero_grad);

in both modes of ``feedrank train``'s ``train.sparse_embeddings`` switch, on a ``Trainer`` built from
the same ``TrainConfig`` a run uses: ``dense`` (the default: dense ``nn.Embedding`` gradients, fused
AdamW over every parameter) and ``sparse`` (every embedding table with sparse gradients, stepped by
``torch.optim.SparseAdam``; the rest fused AdamW; ``feedrank.train.sparse``). The sampled softmax
itself (draw + fwd) should not grow with the catalogue; a dense table gradient, its clip and a dense
Adam update over the whole table do, O(n * dim) a step, which the sparse switch removes.

    .venv/bin/python benchmarks/sampled_softmax_scale.py                        # 100k, 1M, 10M; ~5 GB at 10M
    .venv/bin/python benchmarks/sampled_softmax_scale.py --items 100000 1000000 --id-dim 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.models import TwoTower, TwoTowerConfig, two_tower_loss
from feedrank.train import Trainer, TrainConfig

USER_CATS = (8, 12)
ITEM_CATS = (50, 6, 20)
N_USERS = 100_000


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def make_batch(gen: torch.Generator, n_items: int, batch: int, history: int) -> Batch:
    """A batch of clicked impressions over real ids (>= 2), full histories, random side features."""
    ids = lambda *shape: torch.randint(2, n_items, shape, generator=gen)  # noqa: E731
    cats = lambda sizes: torch.stack([torch.randint(2, s, (batch,), generator=gen) for s in sizes], 1)  # noqa: E731
    ones = torch.ones(batch)
    return Batch(
        user=torch.randint(2, N_USERS, (batch,), generator=gen), user_cats=cats(USER_CATS),
        history=ids(batch, history), history_mask=torch.ones(batch, history, dtype=torch.bool),
        item=ids(batch), item_cats=cats(ITEM_CATS), item_age_h=torch.rand(batch, generator=gen) * 48,
        counters=torch.rand(batch, 5, generator=gen), position=torch.zeros(batch, dtype=torch.long),
        clicked=ones, dwell_s=ones * 30, shared=ones * 0, hidden=ones * 0, weight=ones,
        item_logq=torch.full((batch,), -10.0), request=torch.arange(batch),
    )  # fmt: skip


def build(n_items: int, args: argparse.Namespace) -> TwoTower:
    cfg = TwoTowerConfig(
        loss="sampled", negative_sampler="popularity", num_negatives=args.negatives, logq_correction=True,
        item_id_dim=args.id_dim, dropout=0.0,
    )
    model = TwoTower(cfg, N_USERS, n_items, USER_CATS, ITEM_CATS, n_counters=2)
    gen = torch.Generator().manual_seed(1)
    item_cats = torch.stack([torch.randint(2, s, (n_items,), generator=gen) for s in ITEM_CATS], 1)
    counts = (1e6 / torch.arange(1, n_items + 1, dtype=torch.float64)).floor()  # Zipf(1) clicks
    model.attach_catalogue(item_cats, counts)
    return model


def time_steps(trainer: Trainer, batch: Batch, args: argparse.Namespace) -> dict:
    """Per-part times of the trainer's step; the forward and backward are ``_forward_backward``'s, split."""
    model, parts = trainer.model, {"draw": [], "fwd": [], "bwd": [], "opt": []}
    clock = time.process_time if args.cpu_time else time.perf_counter
    model.train()
    for step in range(args.warmup + args.steps):
        t0 = clock()
        model.sampler.sample(args.negatives)
        t1 = clock()
        loss, _ = two_tower_loss(trainer.module, batch)
        t2 = clock()
        loss.backward()
        t3 = clock()
        trainer._optimizer_step(trainer.cfg.lr, need_norm=False)
        t4 = clock()
        if step >= args.warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(seconds * 1e3)
    result = {name: statistics.median(values) for name, values in parts.items()}
    result["step"] = result["fwd"] + result["bwd"] + result["opt"]  # fwd already includes a draw
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--id-dim", type=int, default=32, help="item-ID table width (32 keeps dense AdamW at 10M ~5 GB)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", dest="cpu_time", action="store_false",
                        help="time by the wall clock (default: this process's CPU time, fair on a shared machine)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"batch {args.batch}, history {args.history}, K={args.negatives} popularity negatives (logQ), "
          f"item-ID dim {args.id_dim}, {args.threads} thread(s); {'CPU' if args.cpu_time else 'wall'} ms a step, median of {args.steps}", flush=True)
    print(f"{'items':>11} {'mode':>6} {'draw':>7} {'fwd':>8} {'bwd':>8} {'opt':>8} {'step':>8} {'RSS GB':>7}")
    results = []
    with tempfile.TemporaryDirectory(prefix="feedrank-softmax-") as out_dir:  # the trainer's out_dir, never written
        for n_items in args.items:
            batch = make_batch(torch.Generator().manual_seed(0), n_items, args.batch, args.history)
            for mode in ("sparse", "dense"):
                train = from_dict(TrainConfig, {"lr": 1e-3, "device": "cpu", "progress": False, "out_dir": out_dir,
                                                "sparse_embeddings": mode == "sparse"})
                with Trainer(build(n_items, args), two_tower_loss, train) as trainer:
                    row = {"items": n_items, "mode": mode, **time_steps(trainer, batch, args), "rss_gb": rss_gb()}
                results.append(row)
                print(f"{n_items:>11,} {mode:>6} {row['draw']:7.2f} {row['fwd']:8.1f} {row['bwd']:8.1f} {row['opt']:8.1f} "
                      f"{row['step']:8.1f} {row['rss_gb']:7.2f}", flush=True)
                del trainer
    for mode in ("sparse", "dense"):
        rows = [r for r in results if r["mode"] == mode]
        ratios = ", ".join(f"{r['items']:,}: {r['step'] / rows[0]['step']:.2f}x" for r in rows)
        print(f"{mode}: full step relative to {rows[0]['items']:,} items: {ratios}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
