"""Throughput of the evaluation metrics on a MIND-sized evaluation (default 10M rows, 1M requests).

Prints rows/s for auc, group_auc and ndcg@10 (plus mrr, which shares the ndcg sort), the ratio
against scikit-learn's roc_auc_score for the global AUC, and the ratio of the metrics' one-argsort
group sort (``_lexsort``) against ``np.lexsort`` on the same (label, -score, group) keys.

    .venv/bin/python benchmarks/metrics_speed.py --rows 10000000 --groups 1000000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from feedrank.evaluate.metrics import _lexsort, auc, group_auc, mrr, ndcg_at_k


def best_of(repeats: int, fn: Callable[[], float]) -> tuple[float, float]:
    """Fastest wall time over ``repeats`` runs (the least disturbed by other processes)."""
    times, value = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--groups", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    groups = rng.integers(0, args.groups, args.rows)  # interleaved request ids, ~rows/groups each
    scores = rng.random(args.rows, dtype=np.float32)
    labels = (rng.random(args.rows) < 0.04 + 0.1 * scores).astype(np.float32)  # ~9% CTR, informative

    cases: dict[str, Callable[[], float]] = {
        "auc": lambda: auc(labels, scores),
        "sklearn roc_auc_score": lambda: float(roc_auc_score(labels, scores)),
        "group_auc": lambda: group_auc(labels, scores, groups),
        "ndcg@10": lambda: ndcg_at_k(labels, scores, 10, groups),
        "mrr": lambda: mrr(labels, scores, groups),
        "group sort (_lexsort)": lambda: float(_lexsort([labels, -scores, groups])[0]),
        "np.lexsort": lambda: float(np.lexsort([labels, -scores, groups])[0]),
    }
    print(f"{args.rows:,} rows, {args.groups:,} groups, best of {args.repeats}")
    results = {}
    for name, fn in cases.items():
        seconds, value = best_of(args.repeats, fn)
        results[name] = {"seconds": seconds, "rows_per_s": args.rows / seconds, "value": value}
        print(f"  {name:<22} {seconds:7.2f} s  {args.rows / seconds / 1e6:7.2f} M rows/s  value {value:.6g}")
    ratio = results["sklearn roc_auc_score"]["seconds"] / results["auc"]["seconds"]
    print(f"  auc speed-up over sklearn: {ratio:.2f}x (values differ by "
          f"{abs(results['auc']['value'] - results['sklearn roc_auc_score']['value']):.2e})")
    sort_ratio = results["np.lexsort"]["seconds"] / results["group sort (_lexsort)"]["seconds"]
    print(f"  group sort speed-up over np.lexsort: {sort_ratio:.2f}x")
    print(json.dumps({"rows": args.rows, "groups": args.groups, "results": results}))


if __name__ == "__main__":
    main()
