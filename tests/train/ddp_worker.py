"""A toy training script for the trainer tests: runs unchanged alone or under torchrun.

It is also the one home of the toy task (model, data, loss) the in-process tests import, so the
subprocess and in-process runs train exactly the same thing.

Data layout: every epoch is a seeded permutation of a fixed synthetic set, cut into *global*
micro-batches of ``micro * shards`` rows. A process of a ``world``-rank job takes its rank's
contiguous slice of each global micro-batch, so one process (``world=1``) sees the union of what
``shards`` ranks see: the same global batch, which is what makes DDP and single-process runs equal.

    python tests/train/ddp_worker.py --out /tmp/run --steps 6                      # one process
    torchrun --nproc_per_node 2 tests/train/ddp_worker.py --out /tmp/run --steps 6  # two ranks
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from feedrank.config import from_dict
from feedrank.train import PREEMPTED_EXIT_CODE, Trainer, TrainConfig

N_ROWS, N_FEATURES = 96, 8


class TinyMLP(nn.Module):
    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)).sum(-1)  # sum, not squeeze: FSDP warns on view outputs


def mse_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    pred = model(batch["x"])
    loss = torch.nn.functional.mse_loss(pred.float(), batch["y"])
    return loss, {"pred_mean": pred.detach().float().mean()}


def dataset() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_ROWS, N_FEATURES, generator=g)
    y = x @ torch.randn(N_FEATURES, generator=g) + 0.1 * torch.randn(N_ROWS, generator=g)
    return x, y


def make_data(micro: int, shards: int = 1, rank: int = 0,
              world: int = 1) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """``data(epoch)`` for the trainer; ``len`` of an epoch is ``N_ROWS // (micro * shards)``."""
    if shards % world:
        raise ValueError(f"shards={shards} is not a multiple of world={world}")
    x, y = dataset()
    per_proc = micro * shards // world
    glob = micro * shards

    def data(epoch: int) -> Iterator[dict[str, Tensor]]:
        order = torch.randperm(N_ROWS, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, N_ROWS - glob + 1, glob):
            idx = order[start + rank * per_proc: start + (rank + 1) * per_proc]
            yield {"x": x[idx], "y": y[idx]}

    return data


def hold_at(data: Callable[[int], Iterator[dict[str, Tensor]]], trainer: Trainer, step: int,
            timeout_s: float = 600.0) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """``data`` that, once ``step`` optimizer steps are done, hands out no batch until a stop is
    requested (SIGTERM sets the trainer's flag). A preemption test's signal then always lands
    mid-run, after exactly ``step`` logged steps, however slow or fast the machine: no sleeping
    and hoping the signal comes in time. The run stops after step ``step + 1``."""

    def held(epoch: int) -> Iterator[dict[str, Tensor]]:
        for batch in data(epoch):
            deadline = time.monotonic() + timeout_s
            while trainer.state.step >= step and not trainer._stop_requested:  # the flag SIGTERM sets
                if time.monotonic() > deadline:
                    raise RuntimeError(f"held at step {step} for {timeout_s:.0f} s and no SIGTERM came")
                time.sleep(0.01)
            yield batch

    return held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro", type=int, default=4, help="rows per rank per micro-batch")
    p.add_argument("--shards", type=int, default=2, help="ranks the data is laid out for")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--hold-at", type=int, default=None, help="after this many steps, wait for SIGTERM")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # identical reductions in every process: comparable to the last bit
    cfg = from_dict(TrainConfig, {
        "steps": args.steps, "lr": 0.05, "warmup_steps": 2, "grad_accum_steps": args.accum,
        "strategy": args.strategy, "checkpoint_every": args.checkpoint_every, "log_every": 1,
        "device": "cpu", "progress": False, "out_dir": args.out, "bucket_cap_mb": 1.0,
    })
    with Trainer(TinyMLP(args.dropout), mse_loss, cfg) as trainer:
        env = trainer.env
        data = make_data(args.micro, args.shards, env.rank, env.world_size)
        if args.hold_at is not None:
            data = hold_at(data, trainer, args.hold_at)
        trainer.resume()
        result = trainer.fit(data)
        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
        torch.save({k: v.detach().cpu() for k, v in full.items()}, Path(args.out) / f"final_rank{env.rank}.pt")
    return PREEMPTED_EXIT_CODE if result.status == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
