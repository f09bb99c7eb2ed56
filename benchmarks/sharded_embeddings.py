"""Per-rank memory and step time of a two-tower with 1M-user x 64 and 1M-item x 64 ID tables:
TorchRec-sharded tables (``train.embeddings: torchrec``) on 1 and 2 ranks vs plain DDP.

Each configuration is a ``torchrun`` launch of this file (``--worker``) on gloo/CPU that trains the
two-tower with the Trainer and the in-batch softmax loss on pre-built synthetic batches (so data
generation is not timed) and reports, per rank:

- parameter bytes this rank holds (the ID tables' local shards + the replicated rest),
- AdamW state bytes this rank holds (``exp_avg``, ``exp_avg_sq``, ``step``),
- the median optimizer-step time after warm-up (forward, backward, AdamW, all collectives),
- the process's peak RSS (it includes building the whole model once before sharding: see
  the limits in docs/scaling.md).

    python benchmarks/sharded_embeddings.py                       # 1M users + 1M items, 12 steps
    python benchmarks/sharded_embeddings.py --users 100000 --items 100000 --steps 6   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = [  # (name, ranks, embeddings, sharding)
    ("plain, 1 process", 1, "torch", "auto"),
    ("DDP, 2 ranks", 2, "torch", "auto"),
    ("TorchRec, 1 rank", 1, "torchrec", "auto"),
    ("TorchRec table-wise, 2 ranks", 2, "torchrec", "table_wise"),
    ("TorchRec column-wise, 2 ranks", 2, "torchrec", "column_wise"),
]


def worker(args: argparse.Namespace) -> None:
    from feedrank.config import from_dict
    from feedrank.data.batch import Batch
    from feedrank.models.losses import two_tower_loss
    from feedrank.models.two_tower import TwoTower, TwoTowerConfig
    from feedrank.train import Trainer, TrainConfig

    torch.manual_seed(0)
    cfg = TwoTowerConfig(dim=64, user_id_dim=64, item_id_dim=64, cat_dim=16, hidden=[256], dropout=0.0)
    model = TwoTower(cfg, args.users, args.items, [8], [50, 4], n_counters=2)
    train_cfg = from_dict(TrainConfig, {
        "steps": args.steps, "lr": 1e-3, "log_every": args.steps, "device": "cpu", "progress": False,
        "out_dir": str(args.out / "train"), "embeddings": args.embeddings, "embedding_sharding": args.sharding,
        "keep_checkpoints": 1,
    })
    ticks: list[float] = []
    with Trainer(model, two_tower_loss, train_cfg) as trainer:
        env = trainer.env
        g = torch.Generator().manual_seed(1 + env.rank)
        b, hist = args.batch, 20
        batches = []
        for _ in range(args.steps):
            lengths = torch.randint(0, hist + 1, (b,), generator=g)
            mask = torch.arange(hist)[None, :] < lengths[:, None]
            batches.append(Batch(
                user=torch.randint(2, args.users, (b,), generator=g),
                user_cats=torch.randint(0, 8, (b, 1), generator=g),
                history=torch.randint(2, args.items, (b, hist), generator=g) * mask, history_mask=mask,
                item=torch.randint(2, args.items, (b,), generator=g),
                item_cats=torch.stack([torch.randint(0, 50, (b,), generator=g), torch.randint(0, 4, (b,), generator=g)], 1),
                item_age_h=torch.rand(b, generator=g) * 48, counters=torch.rand(b, 2, generator=g),
                position=torch.zeros(b, dtype=torch.long), clicked=torch.ones(b), dwell_s=torch.zeros(b),
                shared=torch.zeros(b), hidden=torch.zeros(b), weight=torch.ones(b), item_logq=torch.zeros(b),
                request=torch.arange(b)))

        def data(epoch: int):
            for batch in batches:
                ticks.append(time.perf_counter())  # asked for the next batch: the previous step is done
                yield batch

        params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        trainer.fit(data)
        optim = sum(t.numel() * t.element_size() for st in trainer.optimizer.state.values()
                    for t in st.values() if isinstance(t, torch.Tensor))
    steps = [b - a for a, b in zip(ticks, ticks[1:])][args.warmup:]
    record = {"rank": env.rank, "world_size": env.world_size, "param_bytes": params, "optim_bytes": optim,
              "step_s": statistics.median(steps), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (args.out / f"rank{env.rank}.json").write_text(json.dumps(record))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=512, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    p.add_argument("--embeddings", default="torch")
    p.add_argument("--sharding", default="auto")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from feedrank.train.distributed import run_torchrun

    print(f"two-tower, ID tables {args.users:,} users x 64 + {args.items:,} items x 64 (fp32), batch {args.batch}/rank, "
          f"gloo on CPU; load {os.getloadavg()[0]:.2f}")
    gb = 1 / 2**30
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ranks, embeddings, sharding in RUNS:
            out = Path(tmp) / f"{embeddings}_{sharding}_{ranks}"
            out.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   __file__, "--worker", "--out", str(out), "--embeddings", embeddings, "--sharding", sharding,
                   "--users", str(args.users), "--items", str(args.items), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            code, stderr = run_torchrun(cmd, timeout_s=900)
            if code != 0:
                print(f"{name}: failed\n{stderr[-3000:]}")
                continue
            recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
            rows.append((name, recs))
    print(f"\n| configuration | params / rank (GiB) | AdamW state / rank (GiB) | step (ms, median) | peak RSS / rank (GiB) |")
    print("|---|---|---|---|---|")
    for name, recs in rows:
        col = lambda key, scale: " / ".join(f"{r[key] * scale:.3f}" for r in recs)  # noqa: E731
        print(f"| {name} | {col('param_bytes', gb)} | {col('optim_bytes', gb)} | "
              f"{max(r['step_s'] for r in recs) * 1e3:.0f} | {col('peak_rss_bytes', gb)} |")
    by = {name: recs for name, recs in rows}
    if "DDP, 2 ranks" in by and "TorchRec table-wise, 2 ranks" in by:
        ddp = max(r["param_bytes"] + r["optim_bytes"] for r in by["DDP, 2 ranks"])
        trec = max(r["param_bytes"] + r["optim_bytes"] for r in by["TorchRec table-wise, 2 ranks"])
        print(f"\nlargest rank's params + AdamW state, TorchRec table-wise / DDP, 2 ranks: {trec / ddp:.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
