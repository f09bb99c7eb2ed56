"""The toy of the ``sparse_embeddings`` tests (an ID table feeding a small head), runnable alone or
under torchrun, so the in-process tests and the two-rank run train exactly the same thing.

Every micro-batch is a *global* batch of ``micro`` rows; a rank of a ``world``-rank job takes its
contiguous ``micro / world`` rows, so one process sees the union of what the ranks see.

    torchrun --nproc_per_node 2 tests/train/sparse_worker.py --out /tmp/run --steps 4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from feedrank.config import from_dict
from feedrank.train import Trainer, TrainConfig

N_IDS, DIM = 200, 4


class TableModel(nn.Module):
    """An ID table (padding row 0) and a small categorical table feeding a linear head."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.ids = nn.Embedding(N_IDS, DIM, padding_idx=0)
        self.cat = nn.Embedding(5, 2)
        self.head = nn.Sequential(nn.Linear(DIM + 2, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 1))

    def forward(self, ids: Tensor, cat: Tensor) -> Tensor:
        x = torch.cat([self.ids(ids).mean(1), self.cat(cat)], dim=-1)
        return self.head(x).sum(-1)


def mse(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
    return nn.functional.mse_loss(model(batch["ids"], batch["cat"]).float(), batch["y"]), {}


def make_data(micro: int = 8, batches: int = 6, rank: int = 0, world: int = 1) -> Callable[[int], Iterator[dict]]:
    """Seeded global batches over ids 0..59 only (rows 60.. are never looked up), 3 ids a row;
    this rank's slice of each, in an order that depends on the epoch."""
    g = torch.Generator().manual_seed(7)
    rows = [{"ids": torch.randint(0, 60, (micro, 3), generator=g), "cat": torch.randint(0, 5, (micro,), generator=g),
             "y": torch.randn(micro, generator=g)} for _ in range(batches)]
    part = slice(rank * micro // world, (rank + 1) * micro // world)
    rows = [{k: v[part] for k, v in row.items()} for row in rows]
    return lambda epoch: iter(rows[epoch % 2::2] + rows[1 - epoch % 2::2])


def train_config(out: str, **overrides) -> TrainConfig:
    base = {"steps": 1, "lr": 0.01, "schedule": "constant", "log_every": 1, "device": "cpu", "progress": False,
            "sparse_embeddings": True, "out_dir": out}
    return from_dict(TrainConfig, base | overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = train_config(args.out, steps=args.steps, grad_accum_steps=args.accum, clip_grad_norm=0.05)
    with Trainer(TableModel(), mse, cfg) as trainer:
        trainer.fit(make_data(rank=trainer.env.rank, world=trainer.env.world_size))
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                   Path(args.out) / f"final_rank{trainer.env.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
