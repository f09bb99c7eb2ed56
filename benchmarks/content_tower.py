"""Does content help new items? ID-only vs content-aware models on a synthetic world's holdout.

Simulates a world (default: ``configs/world_demo.yaml`` scaled down by ``--scale``), builds one
feature build, then trains each variant once:

- ``two_tower``: the retrieval model of ``configs/demo.yaml``, ID-only (``title_dim: 0``) and with
  content (``title_dim``, ``item_id_dropout``);
- ``ranker``: the ranker of ``configs/ranking_demo.yaml`` *without* two-tower inputs (so the
  comparison isolates the ranker's own item side), ID-only and with ``title_tokens`` and
  ``item_id_dropout``;
- ``ranker+tt``: the same two rankers on the ID-only two-tower's vectors, as the demo stacks them.

Each is scored on every held-out impression (the last day); the figures are AUC overall and on
impressions of *new* items (not in the training vocabulary: the model saw neither their ID nor a
click on them), with the world's oracle (``true_affinity x freshness`` at the impression's time,
the position-free click utility) for scale, and each model's share of the oracle's lift over
random, ``(AUC - 0.5) / (oracle AUC - 0.5)``.

Usage::

    .venv/bin/python benchmarks/content_tower.py                 # scale 0.3 of the demo world
    .venv/bin/python benchmarks/content_tower.py --scale 1 --out /tmp/content

One run per variant (seeded): a difference of a few thousandths is noise; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrank.bundle import Bundle
from feedrank.config import load_yaml
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.data.world.world import load_world
from feedrank.evaluate.metrics import auc
from feedrank.evaluate.ranking import RankerScorer, TwoTowerScorer, linked_two_tower, score_rows
from feedrank.features.build import split_files
from feedrank.features.vocab import OOV
from feedrank.train.ranking import load_ranking_config, train_ranking
from feedrank.train.retrieval import RetrievalRunConfig, load_run_config, train_retrieval

ROOT = Path(__file__).resolve().parents[1]
#: Content settings of the measured variants (the ID-only variants leave them at 0 / False).
TITLE_DIM = 32
ID_DROPOUT = 0.2


def holdout(features_dir: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in split_files(features_dir, "test"))


def oracle_scores(log_dir: Path, rows: pa.Table) -> np.ndarray:
    """The world's position-free click utility of each row: true affinity x freshness at its time."""
    world = load_world(log_dir)
    user, item = world.user_index(rows["user_id"]), world.item_index(rows["item_id"])
    ts_us = rows["ts"].cast(pa.int64()).to_numpy()
    return world.true_affinity(user, item) * world.freshness(world.item_age_h(item, ts_us))


def figures(scores: np.ndarray, rows: pa.Table, oracle: np.ndarray) -> dict:
    """AUC overall and on new items, and the share of the oracle's lift over random of each."""
    clicked = rows["clicked"].to_numpy(zero_copy_only=False)
    new = rows["item_idx"].to_numpy() == OOV
    out = {"new_item_share": float(new.mean())}
    for name, keep in (("all", np.ones_like(new)), ("new_items", new)):
        model, best = auc(clicked[keep], scores[keep]), auc(clicked[keep], oracle[keep])
        out[name] = {"auc": model, "oracle_auc": best, "lift_share": (model - 0.5) / (best - 0.5)}
    return out


def score(bundle: Bundle, rows: pa.Table, max_history: int) -> np.ndarray:
    if bundle.kind == "ranker":
        two_tower = linked_two_tower(bundle)
        scorer = RankerScorer(bundle.model, None if two_tower is None else two_tower.model)
    else:
        scorer = TwoTowerScorer(bundle.model)
    return score_rows(rows, scorer, max_history=max_history)["score"]


def print_table(models: dict[str, dict], width: int) -> None:
    """One line a model: AUC and share of the oracle's lift, overall and on new items."""
    print(f"{'model':<{width}} {'AUC all':>8} {'share':>6} {'AUC new':>8} {'share':>6}   (oracle AUC all / new)")
    for name, f in models.items():
        print(f"{name:<{width}} {f['all']['auc']:>8.3f} {f['all']['lift_share']:>6.0%} {f['new_items']['auc']:>8.3f} "
              f"{f['new_items']['lift_share']:>6.0%}   ({f['all']['oracle_auc']:.3f} / {f['new_items']['oracle_auc']:.3f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=str(ROOT / "configs/world_demo.yaml"))
    parser.add_argument("--scale", type=float, default=0.3, help="users and items of the world x this")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="/tmp/feedrank_content_tower")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()

    world = load_yaml(WorldConfig, args.world)
    world = dataclasses.replace(world, users=int(world.users * args.scale), items=int(world.items * args.scale))
    simulate(world, out / "log")
    retrieval = load_run_config(ROOT / "configs/demo.yaml")
    retrieval = dataclasses.replace(retrieval, train=dataclasses.replace(retrieval.train, epochs=args.epochs, progress=False))
    ranking = load_ranking_config(ROOT / "configs/ranking_demo.yaml")
    ranking = dataclasses.replace(ranking, features=retrieval.features, labels=retrieval.labels,
                                  train=dataclasses.replace(ranking.train, epochs=args.epochs, progress=False))  # fmt: skip

    results: dict = {"world": {"users": world.users, "items": world.items, "days": world.days}, "models": {}}
    rows = oracle = None
    for variant in ("id_only", "content"):
        content = variant == "content"
        tt = dataclasses.replace(retrieval.two_tower, title_dim=TITLE_DIM if content else 0,
                                 item_id_dropout=ID_DROPOUT if content else 0.0)  # fmt: skip
        run = out / variant
        bundle = train_retrieval(out / "log", run, dataclasses.replace(retrieval, two_tower=tt), progress=False)
        if rows is None:
            rows = holdout(run / "features")
            oracle = oracle_scores(out / "log", rows)
        results["models"][f"two_tower/{variant}"] = figures(score(bundle, rows, tt.max_history_len), rows, oracle)
        rk = dataclasses.replace(ranking.ranker, title_tokens=content, history_match=content and ranking.ranker.history_match,
                                 item_id_dropout=ID_DROPOUT if content else 0.0)  # fmt: skip
        ranker = train_ranking(out / "log", run, dataclasses.replace(ranking, ranker=rk), progress=False, evaluate=False)
        results["models"][f"ranker/{variant}"] = figures(score(ranker, rows, rk.max_history_len), rows, oracle)
        # as the demo runs it: on the vectors of the ID-only two-tower (a content two-tower's vectors
        # need titles at evaluation, which feedrank.evaluate.ranking.RankerScorer does not pass yet)
        stacked = train_ranking(out / "log", out / f"stacked_{variant}", dataclasses.replace(ranking, ranker=rk),
                                two_tower_bundle=out / "id_only" / "bundle", progress=False, evaluate=False)  # fmt: skip
        results["models"][f"ranker+tt/{variant}"] = figures(score(stacked, rows, rk.max_history_len), rows, oracle)
    results["seconds"] = time.perf_counter() - t0

    print(f"world: {results['world']}, held-out impressions {rows.num_rows}, "
          f"new items {results['models']['two_tower/id_only']['new_item_share']:.1%} of them")  # fmt: skip
    print_table(results["models"], width=20)
    print(f"{results['seconds']:.0f} s")
    (out / "content_tower.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
