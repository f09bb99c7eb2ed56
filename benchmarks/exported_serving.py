"""Serve from ``torch.export`` or from eager? The two calls a feed request makes, measured both ways.

A feed request runs the user tower once (one user, history of ``--history``) and the ranker once
over ``--candidates`` items. Both capture as whole graphs since input checks left ``forward``
(``tests/models/test_export.py``); this measures whether the exported program
(``torch.export.export(...).module()``) is at least as fast as eager ``nn.Module`` calls, in
``torch.inference_mode`` with one intra-op thread (the serving default), on demo-sized models.
Serving switches to the exported program only if it wins here.

    python benchmarks/exported_serving.py --reps 300
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from feedrank.bundle import build_ranker
from feedrank.config import load_yaml, to_dict
from feedrank.labs.base import LabContext
from feedrank.models.ranker import ItemInputs, UserInputs
from feedrank.train.ranking import RankingRunConfig


class RankerScore(nn.Module):
    """``Ranker.score_candidates`` over plain tensors (export takes tensors, not the dataclasses)."""

    def __init__(self, ranker: nn.Module) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(self, user, user_cats, history, counters, vector, item, item_cats, item_age_h, item_counters, vectors):
        preds = self.ranker.score_candidates(UserInputs(user, user_cats, history, counters, vector),
                                             ItemInputs(item, item_cats, item_age_h, item_counters, vectors))
        return preds["click"], preds["dwell"], preds["share"], preds["hide"]


def timed(fn, args, reps: int) -> list[float]:
    with torch.inference_mode():
        for _ in range(20):
            fn(*args)
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/labs"), help="labs folder (the demo world is reused)")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--history", type=int, default=30)
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)

    ctx = LabContext(root=args.root, name="exported_serving", quick=True)
    vocabs = ctx.vocabs
    two_tower = ctx.two_tower().eval()
    ranking_cfg = load_yaml(RankingRunConfig, Path(__file__).parents[1] / "configs" / "ranking_demo.yaml")
    config = to_dict(ranking_cfg)
    config["ranker"]["two_tower_dim"] = two_tower.cfg.dim  # as serving sizes it from the two-tower bundle
    ranker = build_ranker(config, vocabs).eval()

    g = torch.Generator().manual_seed(0)
    n, length = args.candidates, args.history
    batch = ctx.batches(1, 1)[0]
    history = torch.randint(2, vocabs.n_items, (1, length), generator=g)
    user_args = (batch.user, batch.user_cats, batch.counters,
                 two_tower.item_tower.id_embedding(history).detach(), torch.ones(1, length, dtype=torch.bool))
    dim = two_tower.cfg.dim
    score_args = (batch.user[0], batch.user_cats[0], history[0], torch.rand(ranker.n_user_counters, generator=g),
                  torch.randn(dim, generator=g), torch.randint(2, vocabs.n_items, (n,), generator=g),
                  torch.stack([torch.randint(0, s, (n,), generator=g) for s in vocabs.item_cat_sizes], 1),
                  torch.rand(n, generator=g) * 48, torch.rand(n, ranker.n_item_counters, generator=g),
                  torch.randn(n, dim, generator=g))
    score = RankerScore(ranker).eval()

    rows = []
    for name, module, inputs in (("user tower, 1 user", two_tower.user_tower, user_args),
                                 (f"ranker, {n} candidates", score, score_args)):
        with torch.inference_mode():
            eager_out = module(*inputs)
        exported = torch.export.export(module, inputs).module()
        with torch.inference_mode():
            exported_out = exported(*inputs)
        torch.testing.assert_close(exported_out, eager_out)
        eager, export = timed(module, inputs, args.reps), timed(exported, inputs, args.reps)
        rows.append((name, statistics.median(eager), pct(eager, 0.99), statistics.median(export), pct(export, 0.99)))

    print(f"{'call':<24} {'eager p50':>10} {'eager p99':>10} {'export p50':>11} {'export p99':>11} {'export/eager p50':>17}")
    for name, e50, e99, x50, x99 in rows:
        print(f"{name:<24} {e50:>9.3f}ms {e99:>9.3f}ms {x50:>10.3f}ms {x99:>10.3f}ms {x50 / e50:>16.2f}x")


if __name__ == "__main__":
    main()
