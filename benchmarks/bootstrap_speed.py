"""Paired bootstrap: the group re-weighting fast path against re-scoring the resampled rows.

Default workload (the report's): 200k impressions in 20k requests, 3 models, metrics gauc, mrr,
ndcg@5, ndcg@10 and log_loss, 500 resamples. The row path is the same ``bootstrap_models`` with
each metric's ``decomposition`` removed, i.e. the per-replicate implementation that was the only
one before. It is too slow to run for all resamples, so it runs twice, with ``--old-resamples``
n1 and n2 resamples, and is extrapolated linearly: seconds per replicate = (t2 - t1) / (n2 - n1),
fixed cost (point estimates, layout) = t1 - n1 * that; total = fixed + resamples * per replicate.

Both paths draw the same clusters for the same seed, so the first n2 replicates of the fast run
must equal the row path's up to float rounding: the script prints the largest difference.

    .venv/bin/python benchmarks/bootstrap_speed.py --rows 200000 --requests 20000 --resamples 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from feedrank.evaluate.bootstrap import BootstrapTable, bootstrap_models, get_metric

METRICS = ("gauc", "mrr", "ndcg@5", "ndcg@10", "log_loss")


def holdout(rows: int, requests: int, n_models: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Interleaved request ids, ~10% CTR, and models of increasing quality (probabilities in (0, 1))."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, requests, rows)
    affinity = rng.normal(0, 1, rows)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-(affinity - 2.3)))).astype(np.float64)
    scores = {
        f"model{m}": 1 / (1 + np.exp(-(affinity * (m + 1) / n_models - 2.3 + rng.normal(0, 1, rows))))
        for m in range(n_models)
    }
    return labels, groups, scores


def timed(fn) -> tuple[float, BootstrapTable]:
    start = time.perf_counter()
    table = fn()
    return time.perf_counter() - start, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--old-resamples", type=int, nargs=2, default=(10, 30), metavar=("N1", "N2"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n1, n2 = args.old_resamples
    if not 0 < n1 < n2 <= args.resamples:
        raise SystemExit(f"--old-resamples needs 0 < N1 < N2 <= --resamples, got {n1} {n2}")

    labels, groups, scores = holdout(args.rows, args.requests, args.models, args.seed)
    fast_metrics = [get_metric(name) for name in METRICS]
    row_metrics = [dataclasses.replace(m, decomposition=None) for m in fast_metrics]

    def run(metrics, n_resamples):
        return lambda: bootstrap_models(labels, scores, groups, metrics, n_resamples=n_resamples, seed=args.seed)

    print(f"{args.rows:,} rows, {args.requests:,} requests, {args.models} models, "
          f"metrics {', '.join(METRICS)}, {args.resamples} resamples")  # fmt: skip
    fast_s, fast = timed(run(fast_metrics, args.resamples))
    t1, _ = timed(run(row_metrics, n1))
    t2, rows = timed(run(row_metrics, n2))
    per_replicate = (t2 - t1) / (n2 - n1)
    fixed = t1 - n1 * per_replicate  # small and noisy on a shared machine; may come out below 0
    row_s = fixed + args.resamples * per_replicate
    difference = float(np.max(np.abs(fast.replicates[:, :, :n2] - rows.replicates)))

    print(f"  fast path (group re-weighting)  {fast_s:8.2f} s for {args.resamples} resamples")
    print(f"  row path (re-score every replicate): {t1:.2f} s for {n1}, {t2:.2f} s for {n2} resamples "
          f"-> {per_replicate * 1e3:.0f} ms per replicate + {fixed:.2f} s fixed")  # fmt: skip
    print(f"  row path extrapolated          {row_s:8.2f} s for {args.resamples} resamples")
    print(f"  speed-up: {row_s / fast_s:.1f}x")
    print(f"  largest |fast - row| over the first {n2} replicates (same seed): {difference:.2e}")
    print(json.dumps({
        "rows": args.rows, "requests": args.requests, "models": args.models, "metrics": list(METRICS),
        "resamples": args.resamples, "fast_s": fast_s, "row_s_extrapolated": row_s,
        "row_ms_per_replicate": per_replicate * 1e3, "row_fixed_s": fixed, "speedup": row_s / fast_s,
        "max_abs_difference": difference,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
