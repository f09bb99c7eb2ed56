"""Per-step cost of two-tower training with the logQ-corrected sampled softmax at 100k, 1M and 10M items.

For each catalogue size it builds the real ``TwoTower`` (``loss: sampled``, ``negative_sampler:
popularity``, logQ correction on) over a synthetic catalogue with Zipf-like click counts, and times,
per optimizer step on one fixed batch (median of ``--steps`` after ``--warmup``):

- ``draw``: the sampler alone (``NegativeSampler.sample``: inverse-CDF binary search, O(K log n));
- ``fwd``: forward of both towers on the batch and the K negatives, plus the loss;
- ``bwd``: backward;
- ``opt``: the optimizer step;

twice: ``dense`` is the model and optimizer as ``feedrank train`` runs them today (``nn.Embedding``
with a dense gradient, fused AdamW over every parameter), ``sparse`` turns the shared item-ID table's
gradient sparse (``nn.Embedding.sparse``) and steps that table with ``torch.optim.SparseAdam`` (the
rest with AdamW), so the table costs only the rows a batch touches. The sampled softmax itself (draw +
fwd) should not grow with the catalogue; a dense table gradient and a dense Adam update over the whole
table do, O(n * dim) a step, which is the part that has to change (sparse rows here, TorchRec's fused
row-wise optimizer under sharding) before a 10M-item catalogue trains at the speed of a 100k one.

    .venv/bin/python benchmarks/sampled_softmax_scale.py                        # 100k, 1M, 10M; ~5 GB at 10M
    .venv/bin/python benchmarks/sampled_softmax_scale.py --items 100000 1000000 --id-dim 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from feedrank.data.batch import Batch
from feedrank.models import TwoTower, TwoTowerConfig, two_tower_loss

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


def build(n_items: int, args: argparse.Namespace, sparse: bool) -> tuple[TwoTower, list[torch.optim.Optimizer]]:
    cfg = TwoTowerConfig(
        loss="sampled", negative_sampler="popularity", num_negatives=args.negatives, logq_correction=True,
        item_id_dim=args.id_dim, dropout=0.0,
    )
    model = TwoTower(cfg, N_USERS, n_items, USER_CATS, ITEM_CATS, n_counters=2)
    gen = torch.Generator().manual_seed(1)
    item_cats = torch.stack([torch.randint(2, s, (n_items,), generator=gen) for s in ITEM_CATS], 1)
    counts = (1e6 / torch.arange(1, n_items + 1, dtype=torch.float64)).floor()  # Zipf(1) clicks
    model.attach_catalogue(item_cats, counts)
    table = model.item_tower.id_embedding
    if not sparse:
        return model, [torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)]
    table.sparse = True
    rest = [p for p in model.parameters() if p is not table.weight]
    return model, [torch.optim.SparseAdam([table.weight], lr=1e-3), torch.optim.AdamW(rest, lr=1e-3, fused=True)]


def time_steps(model: TwoTower, optimizers: list[torch.optim.Optimizer], batch: Batch, args: argparse.Namespace) -> dict:
    parts: dict[str, list[float]] = {"draw": [], "fwd": [], "bwd": [], "opt": []}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for step in range(args.warmup + args.steps):
        t0 = clock()
        model.sampler.sample(args.negatives)
        t1 = clock()
        loss, _ = two_tower_loss(model, batch)
        t2 = clock()
        loss.backward()
        t3 = clock()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
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
    for n_items in args.items:
        batch = make_batch(torch.Generator().manual_seed(0), n_items, args.batch, args.history)
        for mode in ("sparse", "dense"):
            model, optimizers = build(n_items, args, sparse=mode == "sparse")
            row = {"items": n_items, "mode": mode, **time_steps(model, optimizers, batch, args), "rss_gb": rss_gb()}
            results.append(row)
            print(f"{n_items:>11,} {mode:>6} {row['draw']:7.2f} {row['fwd']:8.1f} {row['bwd']:8.1f} {row['opt']:8.1f} "
                  f"{row['step']:8.1f} {row['rss_gb']:7.2f}", flush=True)
            del model, optimizers
    for mode in ("sparse", "dense"):
        rows = [r for r in results if r["mode"] == mode]
        ratio = rows[-1]["step"] / rows[0]["step"]
        print(f"{mode}: step at {rows[-1]['items']:,} items / at {rows[0]['items']:,} = {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
