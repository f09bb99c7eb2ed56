"""Feature build speed/memory and DataLoader throughput (rows/s into ``Batch``).

Simulates a log of about ``--events`` impressions (``feedrank.data.simulate``), builds point-in-time
features from it (in a child process, so that its peak RSS is measured alone), then reads the
training split for one epoch through ``ParquetStream`` + ``Collator`` with ``num_workers`` 0 and 2
at batch size 1024. Prints a table and writes ``OUT/loader_throughput.json``.

    .venv/bin/python benchmarks/loader_throughput.py --events 1000000 --out runs/bench_loader
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

from feedrank.data.collate import BATCH_COLUMNS, Collator
from feedrank.data.simulate import simulate
from feedrank.data.stream import ParquetStream, make_loader
from feedrank.data.world import WorldConfig
from feedrank.features import FeatureConfig, build_features, split_files

DAYS = 5
FEED_SIZE = 10


def _build(log_dir: str, out_dir: str, history_len: int, split_at: str, queue: mp.Queue) -> None:
    result = build_features(log_dir, out_dir, FeatureConfig(history_len=history_len, split_at=split_at), progress=False)
    queue.put({"seconds": result.seconds, "rows": {k: v["rows"] for k, v in result.manifest["splits"].items()}})


def build_in_child(log_dir: Path, out_dir: Path, history_len: int, split_at: str) -> dict:
    """Run the build in a fresh process; its peak RSS is RUSAGE_CHILDREN's max after it exits."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_build, args=(str(log_dir), str(out_dir), history_len, split_at, queue))
    start = time.perf_counter()
    proc.start()
    out = queue.get()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"feature build failed with exit code {proc.exitcode}")
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def loader_rows_per_s(files: list[Path], num_workers: int, batch_size: int, max_batches: int | None) -> dict:
    ds = ParquetStream(files, batch_size=batch_size, columns=BATCH_COLUMNS, shuffle=True, seed=0)
    loader = make_loader(ds, num_workers=num_workers, collator=Collator())
    rows = batches = 0
    start = time.perf_counter()
    for batch in loader:
        rows += len(batch)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {"num_workers": num_workers, "rows": rows, "batches": batches, "seconds": seconds, "rows_per_s": rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="approximate number of impressions")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_loader"))
    parser.add_argument("--history-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-batches", type=int, default=None, help="stop each loader run after this many batches")
    parser.add_argument("--skip-loader", action="store_true", help="only simulate and build (memory measurement)")
    args = parser.parse_args()

    users = max(100, args.events // (DAYS * FEED_SIZE))
    world = WorldConfig(users=users, items=max(1000, users // 4), days=DAYS, feed_size=FEED_SIZE, seed=0)
    log_dir, feat_dir = args.out / "log", args.out / "features"
    sim = simulate(world, log_dir, overwrite=True, progress=True)
    # the last simulated day is the test split
    split_at = (dt.date.fromisoformat(world.start_date) + dt.timedelta(days=DAYS - 1)).isoformat()
    build = build_in_child(log_dir, feat_dir, args.history_len, split_at)

    report = {
        "events": sim.events,
        "simulate_s": sim.seconds,
        "build": build,
        # stages only: the child's start (spawn, imports) is not part of a build's cost
        "build_events_per_s": sim.events / sum(build["seconds"].values()),
        "loader": [],
    }
    print(f"log: {sim.events:,} events ({sim.events / sim.seconds:,.0f} events/s simulated)")
    print(f"features: {sum(build['seconds'].values()):.1f} s ({build['wall_s']:.1f} s with process start) = "
          f"{report['build_events_per_s']:,.0f} events/s, "
          f"peak RSS {build['peak_rss_mib']:,.0f} MiB; stages {', '.join(f'{k} {v:.1f}s' for k, v in build['seconds'].items())}")
    if not args.skip_loader:
        files = split_files(feat_dir, "train")
        for workers in (0, 2):
            r = loader_rows_per_s(files, workers, args.batch_size, args.max_batches)
            report["loader"].append(r)
            print(f"loader num_workers={workers}: {r['rows']:,} rows in {r['seconds']:.1f} s = {r['rows_per_s']:,.0f} rows/s")
        base = report["loader"][0]["rows_per_s"]
        print(f"speed-up 2 workers / 0 workers: {report['loader'][1]['rows_per_s'] / base:.2f}x")
    (args.out / "loader_throughput.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
