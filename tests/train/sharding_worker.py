"""A small two-tower (or ranker) trained by the Trainer, alone (plain ``nn.Embedding``) or under
torchrun with TorchRec-sharded ID tables: the one home of the task the sharding tests compare.

Every epoch is a fixed list of *global* micro-batches of ``micro * shards`` rows; a rank of a
``world``-rank job takes its contiguous slice of each, so one process (world 1) sees the union of
what ``shards`` ranks see: the same global batch. The loss is per row (BCE on the retrieval score, or on the ranker's click logit), so the union's mean loss and
gradient equal the mean over ranks of each rank's own.

    python tests/train/sharding_worker.py --out /tmp/a --steps 6 --shards 2                    # plain
    torchrun --nproc_per_node 2 tests/train/sharding_worker.py --out /tmp/b --steps 6 \\
        --shards 2 --embeddings torchrec --sharding column_wise                             # sharded
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedrank.config import from_dict
from feedrank.data.batch import Batch
from feedrank.models.ranker import Ranker, RankerConfig
from feedrank.models.two_tower import TwoTower, TwoTowerConfig
from feedrank.train import Trainer, TrainConfig
from feedrank.train.checkpoint import load_model_state

N_USERS, N_ITEMS, HISTORY = 50, 80, 5
USER_CATS, ITEM_CATS = [4], [6, 3]
BATCHES_PER_EPOCH = 4


def build_model(kind: str = "two_tower", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "ranker":
        return Ranker(RankerConfig(dim=16, hidden=[32], dropout=0.0), N_USERS, N_ITEMS, USER_CATS, ITEM_CATS,
                      n_user_counters=2)
    cfg = TwoTowerConfig(dim=16, user_id_dim=16, item_id_dim=16, cat_dim=4, freshness_dim=4, hidden=[32],
                         dropout=0.0, history_encoder="mean")
    return TwoTower(cfg, N_USERS, N_ITEMS, USER_CATS, ITEM_CATS, n_counters=2)


def pointwise_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-row means only, so the ranks' means average to the union's: BCE of ``u . v / T`` against
    ``clicked`` (two-tower); for the ranker, BCE of every binary head plus the dwell head's squared
    error (every head in the loss, as DDP needs)."""
    out = model(batch)
    if hasattr(out, "click"):
        bce = F.binary_cross_entropy_with_logits
        logits = out.click + out.position
        loss = (bce(logits, batch.clicked) + bce(out.share, batch.shared) + bce(out.hide, batch.hidden)
                + (out.dwell - torch.log1p(batch.dwell_s)).pow(2).mean())
    else:
        logits = (out.user * out.item).sum(-1) / out.temperature
        loss = F.binary_cross_entropy_with_logits(logits, batch.clicked)
    return loss, {"logit_mean": logits.detach().mean()}


def global_batch(epoch: int, i: int, rows: int) -> Batch:
    g = torch.Generator().manual_seed(10_000 * epoch + i)
    lengths = torch.randint(0, HISTORY + 1, (rows,), generator=g)
    mask = torch.arange(HISTORY)[None, :] < lengths[:, None]
    return Batch(
        user=torch.randint(1, N_USERS, (rows,), generator=g),
        user_cats=torch.stack([torch.randint(0, s, (rows,), generator=g) for s in USER_CATS], dim=1),
        history=torch.randint(2, N_ITEMS, (rows, HISTORY), generator=g) * mask,
        history_mask=mask,
        item=torch.randint(1, N_ITEMS, (rows,), generator=g),
        item_cats=torch.stack([torch.randint(0, s, (rows,), generator=g) for s in ITEM_CATS], dim=1),
        item_age_h=torch.rand(rows, generator=g) * 48,
        counters=torch.rand(rows, 2, generator=g),
        position=torch.zeros(rows, dtype=torch.long),
        clicked=(torch.rand(rows, generator=g) < 0.4).float(),
        dwell_s=torch.zeros(rows), shared=torch.zeros(rows), hidden=torch.zeros(rows), weight=torch.ones(rows),
        item_logq=torch.zeros(rows), request=torch.arange(rows),
    )


def make_data(micro: int, shards: int, rank: int = 0, world: int = 1) -> Callable[[int], Iterator[Batch]]:
    per_rank = micro * shards // world

    def data(epoch: int) -> Iterator[Batch]:
        for i in range(BATCHES_PER_EPOCH):
            b = global_batch(epoch, i, micro * shards)
            yield Batch(**{k: None if v is None else v[rank * per_rank:(rank + 1) * per_rank] for k, v in vars(b).items()})

    return data


def train_config(out: Path, steps: int, embeddings: str = "torch", sharding: str = "auto",
                 checkpoint_every: int = 0, clip: float | None = 0.5) -> TrainConfig:
    return from_dict(TrainConfig, {
        "steps": steps, "lr": 0.02, "warmup_steps": 1, "weight_decay": 0.01, "clip_grad_norm": clip,
        "log_every": 1, "device": "cpu", "progress": False, "out_dir": str(out), "embeddings": embeddings,
        "embedding_sharding": sharding, "checkpoint_every": checkpoint_every, "keep_checkpoints": 10,
    })


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro", type=int, default=8, help="rows per rank per micro-batch")
    p.add_argument("--shards", type=int, default=2, help="ranks the global batch is cut for")
    p.add_argument("--embeddings", default="torch")
    p.add_argument("--sharding", default="auto")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--clip", type=float, default=0.5, help="clip_grad_norm; 0 = off")
    p.add_argument("--model", choices=["two_tower", "ranker"], default="two_tower")
    args = p.parse_args(argv)

    model = build_model(args.model)
    cfg = train_config(args.out, args.steps, args.embeddings, args.sharding, args.checkpoint_every,
                       args.clip or None)
    with Trainer(model, pointwise_loss, cfg) as trainer:
        if args.resume:
            assert trainer.resume(), "nothing to resume"
        env = trainer.env
        result = trainer.fit(make_data(args.micro, args.shards, env.rank, env.world_size))
    if env.is_main:
        torch.save(load_model_state(result.checkpoint), args.out / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
