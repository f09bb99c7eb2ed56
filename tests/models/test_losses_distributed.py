"""Data parallelism must not change the objective: 2 gloo ranks with ``GlobalPool`` give the loss
and the gradients of one process on the union of their batches (1e-5), for every retrieval loss,
with equal, unequal and empty per-rank batches (the collectives pad to the largest rank's), under
DDP (the pool on a group of its own, as the trainer does, and on DDP's own group) and FSDP2, and
with each rank's rows as 2 micro-batches of one ``CachedStep`` (accumulation x ranks = the union).

The ranks are spawned once for the whole module (``torch.multiprocessing``, a rendezvous file
rather than a TCP port, a deadline after which they are killed, and a 60 s gloo timeout inside): a
bug here fails, never hangs, and no other process on the machine can take the rendezvous from it
(a port picked free and bound later can be, which made the test racy on a shared machine).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from feedrank.models.losses import two_tower_loss

HERE = Path(__file__).parent
WORLD = 2
DEADLINE_S = 240  # bounds a failure only: two children importing torch on a loaded machine are slow


def _worker_module():
    """The rank module by its plain name, so spawned children can import it (they get ``sys.path``)."""
    sys.path.insert(0, str(HERE))
    try:
        import test_losses_distributed_worker as worker
    finally:
        sys.path.remove(str(HERE))
    return worker


def spawn_ranks(fn, out: Path) -> None:
    """Run ``fn(rank, WORLD, rendezvous, out)`` on WORLD spawned processes; kill them past DEADLINE_S.

    ``rendezvous`` is a fresh file in ``out`` (``init_method="file://..."``): torch requires it
    absent or empty when the group starts.
    """
    sys.path.insert(0, str(HERE))  # inherited by the children at spawn time
    try:
        ctx = mp.start_processes(fn, args=(WORLD, str(out / "rendezvous"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    finally:
        sys.path.remove(str(HERE))
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    worker = _worker_module()
    out = tmp_path_factory.mktemp("ranks")
    spawn_ranks(worker.main, out)
    return worker, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def one_process(worker, case: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = worker.build_model(case)
    loss, _ = two_tower_loss(model, worker.union_batch())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


CASES = ["in_batch", "in_batch_full", "sampled", "bce"]
SPLITS = ["equal", "unequal", "empty_rank"]


@pytest.mark.slow  # spawns two ranks that import torch: 10-30 s on a loaded 2-core machine
@pytest.mark.parametrize(("wrapper", "group"), [("ddp", "own"), ("ddp", "world"), ("fsdp", "own"), ("ddp_cached", "own")])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_union(ranks, case, split, wrapper, group):
    worker, results = ranks
    if (case, wrapper) in worker.UNSUPPORTED:
        pytest.skip(worker.UNSUPPORTED[case, wrapper])
    want_loss, want_grads = one_process(worker, case)
    got = [results[r][case, split, wrapper, group] for r in range(WORLD)]
    # each rank's loss is world x its share: their mean is the union batch's loss (what the trainer logs)
    torch.testing.assert_close(sum(g["loss"] for g in got) / WORLD, want_loss, rtol=1e-5, atol=1e-6)
    for r, g in enumerate(got):
        assert set(g["grads"]) == set(want_grads), f"rank {r}: gradients of other parameters"
        for name, want in want_grads.items():  # DDP/FSDP averaged them: every rank holds the union's gradient
            torch.testing.assert_close(g["grads"][name], want, rtol=1e-5, atol=1e-6, msg=f"rank {r} {name}")


@pytest.mark.slow
def test_local_negatives_differ_from_the_union(ranks):
    """The check can fail: without the pool (the default) 2 ranks do not give the union's gradient."""
    worker, _ = ranks
    _, want = one_process(worker, "in_batch")
    grads = []
    for rank in range(WORLD):
        model = worker.build_model("in_batch")
        two_tower_loss(model, worker.rank_rows("unequal", rank))[0].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    name = "item_tower.id_embedding.weight"
    mean = (grads[0][name] + grads[1][name]) / WORLD
    assert (mean - want[name]).norm() / want[name].norm() > 0.05
