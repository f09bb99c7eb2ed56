"""One two-tower training step at MovieLens-100K's shapes: what the fused softmax and the dense known mask save.

The MovieLens benchmark's two-tower (configs/movielens.yaml: exact softmax over all 1,684 items,
``mask_known_positives``) trains on 80,808 ratings a epoch. Most of a step is the [B, K] logits
against the whole catalogue, their cross-entropy, the known-positive mask and their backward
(docs/benchmarks.md, "Two-tower training cost"). Three variants of the same step:

- ``fused``: ``fused_sampled_softmax_loss`` (one [B, K] buffer, masked and normalised in place,
  reused as the gradient) with the mask a row slice of the dense users x items grid;
- ``plain``: ``sampled_softmax_loss`` (``losses.FUSED_SOFTMAX = False``) with the per-cell gather
  of the dense grid;
- ``search``: ``plain`` with the binary search of every (row, item) key among the training pairs
  that the dense grid replaced (``DENSE_KNOWN_MAX_CELLS = 0``).

Measured here, in one process on synthetic data of the same shapes (943 users + padding/OOV, 1,684
items, 80,808 random positive pairs, batch ``--batch`` of clicked rows, no history as in the
benchmark's random split): the median milliseconds of

- ``mask``: the known-positive mask alone for one batch against the whole catalogue;
- ``step``: a full training step (``two_tower_loss`` forward, backward, AdamW step);

timed in alternating rounds so that a shared machine's load changes hit every variant alike.
Prints examples/s and the ratios to ``fused``. The models start from the same weights and see the
same batch, and their first losses are checked equal.

Run: ``.venv/bin/python benchmarks/movielens_two_tower_step.py [--batch 1024] [--rounds 5] [--steps 10]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from feedrank.bundle import build_two_tower
from feedrank.config import load_yaml, to_dict
from feedrank.data.batch import Batch
from feedrank.features.vocab import Vocabularies
from feedrank.models import losses, two_tower
from feedrank.models.losses import two_tower_loss
from feedrank.train.retrieval import RetrievalRunConfig

REPO = Path(__file__).resolve().parents[1]
N_USERS, N_ITEMS, N_PAIRS = 945, 1684, 80_808  # ml-100k's vocabulary sizes (with PAD and OOV) and train ratings
USER_CAT_SIZES, ITEM_CAT_SIZES = [9], [21]


class _Sizes:
    """The vocabulary sizes ``build_two_tower`` reads, without building vocabularies."""

    n_users, n_items, user_cat_sizes, item_cat_sizes, n_tokens = N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, 0


def batch_of(size: int, g: torch.Generator) -> Batch:
    ints = lambda high, *shape: torch.randint(2, high, shape, generator=g)  # noqa: E731
    zeros = torch.zeros(size)
    return Batch(
        user=ints(N_USERS, size), user_cats=ints(USER_CAT_SIZES[0], size, 1),
        history=torch.zeros(size, 1, dtype=torch.long), history_mask=torch.zeros(size, 1, dtype=torch.bool),
        item=ints(N_ITEMS, size), item_cats=ints(ITEM_CAT_SIZES[0], size, 1), item_age_h=zeros,
        counters=torch.zeros(size, 2), position=torch.zeros(size, dtype=torch.long), clicked=torch.ones(size),
        dwell_s=zeros, shared=zeros, hidden=zeros, weight=torch.ones(size), item_logq=zeros,
        request=torch.arange(size),
    )  # fmt: skip


def model_with(dense: bool) -> torch.nn.Module:
    cfg = to_dict(load_yaml(RetrievalRunConfig, REPO / "configs" / "movielens.yaml"))
    torch.manual_seed(0)
    model = build_two_tower(cfg, _Sizes())  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    model.attach_catalogue(torch.randint(2, ITEM_CAT_SIZES[0], (N_ITEMS, 1), generator=g))
    saved = two_tower.DENSE_KNOWN_MAX_CELLS
    two_tower.DENSE_KNOWN_MAX_CELLS = saved if dense else 0
    try:
        model.attach_known_positives(torch.randint(2, N_USERS, (N_PAIRS,), generator=g),
                                     torch.randint(2, N_ITEMS, (N_PAIRS,), generator=g))  # fmt: skip
    finally:
        two_tower.DENSE_KNOWN_MAX_CELLS = saved
    return model.train()


def time_ms(fn, n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


#: name -> (dense known grid, fused softmax)
VARIANTS = {"fused": (True, True), "plain": (True, False), "search": (False, False)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of every variant")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = batch_of(args.batch, torch.Generator().manual_seed(2))
    items = torch.arange(losses.FIRST_REAL_ID, N_ITEMS)
    models = {name: model_with(dense) for name, (dense, _) in VARIANTS.items()}
    reference = models["plain"].known_positive_mask(batch.user, items)
    assert torch.equal(models["search"].known_positive_mask(batch.user, items), reference)
    assert torch.equal(models["fused"].known_positive_rows(batch.user)[:, items[0]:], reference)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=0.01) for name, m in models.items()}

    def loss_of(name: str) -> torch.Tensor:
        saved = losses.FUSED_SOFTMAX
        losses.FUSED_SOFTMAX = VARIANTS[name][1]
        try:
            return two_tower_loss(models[name], batch)[0]
        finally:
            losses.FUSED_SOFTMAX = saved

    def mask(name: str) -> None:
        if VARIANTS[name][1]:
            models[name].known_positive_rows(batch.user)[:, items[0]:]
        else:
            models[name].known_positive_mask(batch.user, items)

    def step(name: str) -> None:
        loss = loss_of(name)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    with torch.no_grad():
        first = {name: loss_of(name) for name in models}
    for name in models:
        torch.testing.assert_close(first[name], first["plain"], msg=f"{name}'s loss differs from plain's")
    results: dict[str, dict[str, list[float]]] = {n: {"mask": [], "step": []} for n in models}
    for _ in range(args.rounds):
        for name in models:
            with torch.no_grad():
                results[name]["mask"].append(time_ms(lambda: mask(name), args.steps))
            results[name]["step"].append(time_ms(lambda: step(name), args.steps))
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"batch {args.batch} x {N_ITEMS} catalogue items, {N_PAIRS} known pairs, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, m in med.items():
        print(f"  {name:<7} mask {m['mask']:8.2f} ms   step {m['step']:8.2f} ms   {args.batch / m['step'] * 1000:9.0f} examples/s")
    for name in ("plain", "search"):
        print(f"  fused vs {name}: step {med[name]['step'] / med['fused']['step']:.2f}x faster "
              f"(mask {med[name]['mask'] / med['fused']['mask']:.1f}x)")


if __name__ == "__main__":
    main()
