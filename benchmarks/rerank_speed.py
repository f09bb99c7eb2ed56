"""Latency of one ``rerank`` call at serving size (default 500 candidates, dim 64, k = 50).

The re-ranker sits inside the 50 ms p99 budget of ``GET /feed``; this prints the mean, p50 and p99
milliseconds per call over many calls on fresh random requests, the share of the budget the p99
takes, and a JSON line with the same figures.

    .venv/bin/python benchmarks/rerank_speed.py --candidates 500 --dim 64 --k 50
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from feedrank.serving.rerank import Candidates, RerankConfig, rerank

BUDGET_MS = 50.0


def random_request(rng: np.random.Generator, n: int, dim: int, n_publishers: int) -> tuple[Candidates, np.ndarray]:
    """A request like the serving pipeline's: a few near-duplicate clusters, mixed sources, ~5% seen."""
    centres = rng.normal(size=(n // 10, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.array([f"i{i}" for i in rng.choice(50 * n, n, replace=False)])
    cands = Candidates(
        item_ids=ids,
        scores=rng.normal(size=n),
        vectors=vectors,
        publishers=rng.integers(0, n_publishers, n),
        age_h=rng.exponential(48.0, n),
        sources=rng.choice(np.array(["ann", "fresh", "popular"]), n, p=[0.8, 0.1, 0.1]),
    )
    return cands, ids[rng.random(n) < 0.05]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--publishers", type=int, default=40)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    cfg = RerankConfig(k=args.k, mmr_lambda=0.7, per_publisher_cap=3, freshness_boost=0.2, freshness_half_life_h=24.0)
    requests = [random_request(rng, args.candidates, args.dim, args.publishers) for _ in range(args.calls)]
    for cands, seen in requests[:20]:  # warm-up
        rerank(cands, seen, cfg)
    times_ms = []
    for cands, seen in requests:
        start = time.perf_counter()
        rerank(cands, seen, cfg)
        times_ms.append((time.perf_counter() - start) * 1e3)
    t = np.array(times_ms)
    figures = {
        "candidates": args.candidates, "dim": args.dim, "k": args.k, "calls": args.calls,
        "mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
        "p99_share_of_budget": float(np.percentile(t, 99) / BUDGET_MS),
    }  # fmt: skip
    print(f"rerank: {args.candidates} candidates, dim {args.dim}, k={args.k}, {args.calls} calls")
    print(f"  mean {figures['mean_ms']:.2f} ms  p50 {figures['p50_ms']:.2f} ms  p99 {figures['p99_ms']:.2f} ms "
          f"({100 * figures['p99_share_of_budget']:.1f}% of the {BUDGET_MS:.0f} ms p99 budget)")  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
