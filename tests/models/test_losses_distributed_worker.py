"""Rank side of tests/models/test_losses_distributed.py (no tests here: spawned, one process per rank).

Every case builds the same seeded two-tower, cuts its rank's rows out of one seeded union batch
(``split`` rows each, unequal on purpose), wraps the model in real DDP (or FSDP2, one unit, as the
trainer does) and backpropagates
``two_tower_loss(ddp, rows, pool)`` (and, under DDP, the rows as 2 accumulated micro-batches of
``CachedStep``); it saves the loss and the (rank-averaged, unsharded) gradients. The test
compares them with one process training on the union batch. Loaded by path: the test puts this
folder on ``sys.path`` for the spawned children (pytest's importlib mode does not).
"""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from feedrank.data.batch import Batch
from feedrank.models.losses import CachedStep, GlobalPool, select_rows, two_tower_loss
from feedrank.models.two_tower import TwoTower, TwoTowerConfig
from feedrank.train.distributed import gradient_sync

_spec = importlib.util.spec_from_file_location("models_conftest_for_ranks", Path(__file__).with_name("conftest.py"))
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

#: name -> TwoTowerConfig overrides; every case runs with each split of CASE_SPLITS.
CASES = {
    "in_batch": {"loss": "in_batch"},
    # logQ, known positives masked, a learned temperature (its gradient crosses ranks too)
    "in_batch_full": {"loss": "in_batch", "mask_known_positives": True, "learn_temperature": True,
                      "temperature": 0.1, "history_encoder": "attention"},
    # the exact softmax with no age input: the same negatives on every rank and in one process
    "sampled": {"loss": "sampled", "negative_sampler": "all", "freshness_dim": 0},
    "bce": {"loss": "bce"},
}
#: FSDP2's fully_shard refuses a 0-d parameter, and a learned temperature is one (Temperature.raw).
UNSUPPORTED = {("in_batch_full", "fsdp"): "fully_shard does not support the learned temperature's 0-d parameter"}
UNION_ROWS = 13
SPLITS = {"equal": (7, 6), "unequal": (9, 4), "empty_rank": (13, 0)}


def union_batch() -> Batch:
    """The seeded union batch, with weights that differ per row (normalisation matters)."""
    b = fixtures.random_batch(UNION_ROWS, seed=3)
    g = torch.Generator().manual_seed(4)
    b.weight = torch.rand(UNION_ROWS, generator=g) + 0.5
    b.clicked = (torch.rand(UNION_ROWS, generator=g) < 0.7).float()
    b.item_logq = -torch.rand(UNION_ROWS, generator=g) * 4
    return b


def build_model(case: str) -> TwoTower:
    cfg = TwoTowerConfig(**{"dim": 16, "item_id_dim": 16, "user_id_dim": 8, "cat_dim": 4, "hidden": [32],
                            "dropout": 0.0, **CASES[case]})
    torch.manual_seed(0)
    model = TwoTower(cfg, fixtures.N_USERS, fixtures.N_ITEMS, fixtures.USER_CAT_SIZES, fixtures.ITEM_CAT_SIZES,
                     fixtures.N_COUNTERS)
    if cfg.loss == "sampled":
        model.attach_catalogue(torch.zeros(fixtures.N_ITEMS, len(fixtures.ITEM_CAT_SIZES), dtype=torch.long))
    if cfg.mask_known_positives:
        union = union_batch()
        model.attach_known_positives(union.user, torch.roll(union.item, 1))  # pairs that collide in the batch
    return model


def rank_rows(split: str, rank: int) -> Batch:
    sizes = SPLITS[split]
    start = sum(sizes[:rank])
    return select_rows(union_batch(), torch.arange(start, start + sizes[rank]))


def cached_accumulation(case: str, split: str, rank: int, group) -> dict:
    """This rank's rows as 2 micro-batches of one step (``CachedStep``, as the trainer runs it)."""
    model = build_model(case)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = rank_rows(split, rank)
    micro = [select_rows(rows, torch.arange(0, len(rows) // 2)), select_rows(rows, torch.arange(len(rows) // 2, len(rows)))]

    def backward(t: torch.Tensor, last: bool) -> None:
        with gradient_sync(ddp, enabled=last):
            t.backward()

    loss, _ = CachedStep(GlobalPool(group)).backward_step(ddp, micro, backward)
    return {"loss": loss, "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def main(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One rank: every (case, split, wrapper, group) result into ``out/rank<r>.pt``.

    The ranks meet through the file ``rendezvous``, not a TCP port another process could take.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    own = dist.new_group(backend="gloo")  # what the trainer does (feedrank.train.retrieval)
    results = {}
    for case in CASES:
        for split in SPLITS:
            for wrapper, group_name, group in (("ddp", "own", own), ("ddp", "world", dist.group.WORLD),
                                               ("fsdp", "own", own)):
                if (case, wrapper) in UNSUPPORTED:
                    continue
                model = build_model(case)
                wrapped = torch.nn.parallel.DistributedDataParallel(model) if wrapper == "ddp" else fully_shard(model)
                loss, _ = two_tower_loss(wrapped, rank_rows(split, rank), GlobalPool(group))
                loss.backward()
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                results[case, split, wrapper, group_name] = {
                    "loss": loss.detach(),
                    "grads": {n: (g.full_tensor() if wrapper == "fsdp" else g).clone() for n, g in grads.items()},
                }
            results[case, split, "ddp_cached", "own"] = cached_accumulation(case, split, rank, own)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
