"""Acceptance of the ranking pipeline on the synthetic world: does the ranker beat everything simpler?

The whole pipeline as the demo runs it (``feedrank.train.ranking.run_pipeline``): simulate the
world, train the two-tower, train the ranker on its frozen vectors with negatives down-sampled,
evaluate on the held-out last day (MIND protocol, one candidate list per request), write the report.

Acceptance (printed as PASS/FAIL, exit status 1 on a FAIL):

- the ranker beats the two-tower score alone and each baseline (popularity, recency, random) on
  AUC and on NDCG@10 of the holdout, with the 95% paired-bootstrap interval of the difference
  (requests resampled) above zero;
- its click probabilities are calibrated after the down-sampling correction: ECE < 0.02.

Usage::

    .venv/bin/python benchmarks/ranking_synthetic.py                      # the demo world, 1000 resamples
    .venv/bin/python benchmarks/ranking_synthetic.py --world my_world.yaml --resamples 300 --out /tmp/rk

Writes OUT/ranking_synthetic.json (figures, comparisons, checks, seconds per stage) beside the run
(OUT/log, OUT/run with OUT/run/report.html).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from feedrank.commands.train import ranking_tables
from feedrank.config import load_yaml
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.train.ranking import load_ranking_config, run_pipeline
from feedrank.train.retrieval import load_run_config

BASELINES = ("two_tower", "popularity", "recency", "random")
METRICS = ("auc", "ndcg@10")
MAX_ECE = 0.02


def checks(doc: dict) -> list[dict]:
    """One row per acceptance criterion of the module docstring, from a ranking metrics.json document."""
    by_pair = {(c["a"], c["b"], c["metric"]): c for c in doc["comparisons"]}
    rows = []
    for baseline in BASELINES:
        for metric in METRICS:
            c = by_pair.get((baseline, "ranker", metric))
            ok = c is not None and c["ci"] is not None and c["ci"][0] > 0
            rows.append({"check": f"ranker - {baseline} {metric} > 0", "ok": ok,
                         "figure": None if c is None else {"delta": c["delta"], "ci": c["ci"]}})  # fmt: skip
    ece = doc["models"]["ranker"]["ece"]
    rows.append({"check": f"ranker ece < {MAX_ECE}", "ok": ece["value"] is not None and ece["value"] < MAX_ECE, "figure": ece})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=Path("configs/world_demo.yaml"))
    parser.add_argument("--retrieval", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--ranking", type=Path, default=Path("configs/ranking_demo.yaml"))
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ranking_synthetic"))
    args = parser.parse_args()

    console = Console()
    ranking_cfg = load_ranking_config(args.ranking)
    ranking_cfg = dataclasses.replace(ranking_cfg, eval=dataclasses.replace(ranking_cfg.eval, n_resamples=args.resamples))
    retrieval_cfg = load_run_config(args.retrieval)
    shutil.rmtree(args.out, ignore_errors=True)

    seconds = {}
    start = time.perf_counter()
    summary = simulate(load_yaml(WorldConfig, args.world), args.out / "log", progress=True)
    seconds["simulate"] = time.perf_counter() - start
    start = time.perf_counter()
    result = run_pipeline(args.out / "log", args.out / "run", retrieval_cfg, ranking_cfg)
    seconds["train, evaluate, report"] = time.perf_counter() - start

    doc = result.ranker.metrics["eval"]
    for table in ranking_tables(doc):
        console.print(table)
    rows = checks(doc)
    for row in rows:
        console.print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['check']}: {row['figure']}")
    h = doc["holdout"]
    console.print(f"world: {summary.events:,} events; holdout {h['impressions']:,} impressions in {h['requests']:,} "
                  f"requests; negative_rate {h['negative_rate']}; {args.resamples} resamples")  # fmt: skip
    console.print(f"seconds: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; report {result.report}")
    out = {"world": str(args.world), "events": summary.events, "holdout": h, "models": doc["models"],
           "comparisons": doc["comparisons"], "checks": rows, "seconds": seconds}  # fmt: skip
    (args.out / "ranking_synthetic.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
