"""Memory and speed of the whole training pipeline by log size: simulate -> features -> one two-tower pass.

For each ``--rows`` (approximate impressions) it runs three stages, each in its own child process so
its peak RSS (``os.wait4``'s ``ru_maxrss``) is its alone:

- ``simulate``: ``feedrank simulate`` (streams the log day by day);
- ``features``: ``feedrank features build`` (point-in-time examples; no test split);
- ``train``: one pass of the default two-tower over the train split, built the way ``feedrank train
  retrieval`` builds it (``build_two_tower``, ``ParquetStream`` + ``Collator`` keeping clicked rows,
  fused AdamW, 1 thread), timing the wait for each batch (the loader) apart from the step (forward,
  loss, backward, optimizer) in wall and CPU time, so it prints examples/s and the loader's share;
  then, in the same child, the ``training_catalogue`` that run reads from the log (its own peak).

The world (``--users``, ``--items``) is fixed and only the simulated days grow with ``--rows``.
Prints per stage: seconds (wall and CPU), peak RSS, bytes on disk, CPU-us a row, and the RSS growth
per extra row between the smallest and the largest size: a streaming stage has ~0 B a row, an
in-memory one does not. ``--limit-gib`` (4) is the bound a stage must stay under to PASS.
``--out`` writes every figure as JSON (what ``tests/data/test_streaming_memory.py`` reads).

    .venv/bin/python benchmarks/train_100m.py --rows 1000000 2000000 3000000 --max-batches 300 --work /tmp/t100m
    .venv/bin/python benchmarks/train_100m.py --rows 100000 800000 --users 1000 --items 1000 --history-len 5 \
        --max-batches 40 --shuffle-buffer-rows 8192 --row-group-size 8192 --chunk-rows 8192   # the CI test's sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FEED_SIZE = 10  # the simulator's default feed
STAGES = ("simulate", "features", "train")


def days_for(rows: int, users: int) -> int:
    """Days of simulation for about ``rows`` impressions: one ``FEED_SIZE`` feed a user a day.

    The world (users, items) stays fixed across sizes and only the days grow, so the RSS growth
    between sizes is what each stage keeps per logged row, not per user or item.
    """
    return max(1, round(rows / (users * FEED_SIZE)))


def stage(cmd: list[str]) -> dict:
    """Run one stage in a fresh child; its wall and CPU seconds and its own peak RSS (MiB)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode()  # progress bars and one JSON line: small
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    last = out.strip().splitlines()[-1] if out.strip() else ""
    extra = json.loads(last) if last.startswith("{") else {}
    # the train child resets its peak before the catalogue read (``reset_peak_rss``), which resets the
    # kernel's ``ru_maxrss`` too: its pass peak, reported apart, is part of the stage's peak
    peak = max(usage.ru_maxrss / 1024, extra.get("pass_peak_mib", 0.0))
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, **extra, "peak_rss_mib": peak}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train_pass(features_dir: Path, log_dir: Path, batch_size: int, max_batches: int | None, threads: int,
               shuffle_buffer_rows: int | None) -> None:
    """Child: one pass of the default two-tower (in-batch softmax) over ``features_dir``'s train split,
    then the training catalogue ``feedrank train retrieval`` reads before it; prints one JSON line.

    The pass runs first so that its peak RSS (``pass_peak_mib``: interpreter, model, optimizer, loader,
    steps) is not hidden by the catalogue's read of the whole log, measured after it on its own
    (``catalogue_added_mib``); the in-batch loss does not draw from the catalogue, the sampled one does.
    """
    import torch

    from feedrank.bundle import build_two_tower
    from feedrank.config import to_dict
    from feedrank.data.collate import BATCH_COLUMNS, Collator
    from feedrank.data.stream import ParquetStream, make_loader
    from feedrank.features import FeatureConfig, split_files
    from feedrank.features.build import VOCAB_DIR
    from feedrank.features.vocab import Vocabularies
    from feedrank.models.losses import two_tower_loss
    from feedrank.train.retrieval import LabelWeights, RetrievalRunConfig, clicked_rows
    from feedrank.train.task import batch_limits, training_catalogue

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = RetrievalRunConfig(features=FeatureConfig())
    vocabs = Vocabularies.load(features_dir / VOCAB_DIR)
    model = build_two_tower(to_dict(cfg), vocabs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    collator = Collator(max_history=cfg.two_tower.max_history_len, weight=LabelWeights(cfg.labels),
                        limits=batch_limits(vocabs), keep=clicked_rows)  # fmt: skip
    stream = ParquetStream(split_files(features_dir, "train"), batch_size, columns=BATCH_COLUMNS, shuffle=True, seed=0,
                           shuffle_buffer_rows=shuffle_buffer_rows or cfg.loader.shuffle_buffer_rows)  # fmt: skip
    loader_s = step_s = loader_cpu_s = step_cpu_s = 0.0  # wall, and this process's CPU (fair on a shared machine)
    pairs = batches = 0
    batches_iter = iter(make_loader(stream, 0, collator))
    while max_batches is None or batches < max_batches:
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(batches_iter, None)
        t1, c1 = time.perf_counter(), time.process_time()
        if batch is None:
            break
        loss, _ = two_tower_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)  # the step is done when its loss is on the host
        t2, c2 = time.perf_counter(), time.process_time()
        loader_s, step_s = loader_s + (t1 - t0), step_s + (t2 - t1)
        loader_cpu_s, step_cpu_s = loader_cpu_s + (c1 - c0), step_cpu_s + (c2 - c1)
        pairs += len(batch)
        batches += 1
    impressions = min(stream.total_rows, batches * batch_size)
    pass_peak = _status_mib("VmHWM")
    del batches_iter
    gc.collect()
    start = _status_mib("VmRSS")
    reset_peak_rss()  # from here VmHWM is the catalogue read's own peak
    catalogue = training_catalogue(log_dir, vocabs, cfg.features)
    print(json.dumps({
        "batches": batches, "impressions": impressions, "pairs": pairs, "loader_s": loader_s, "step_s": step_s,
        "impressions_per_s": impressions / (loader_s + step_s), "pairs_per_s": pairs / (loader_s + step_s),
        "loader_share": loader_s / (loader_s + step_s), "loader_cpu_s": loader_cpu_s, "step_cpu_s": step_cpu_s,
        "loader_cpu_us_per_impression": 1e6 * loader_cpu_s / impressions, "step_cpu_us_per_impression": 1e6 * step_cpu_s / impressions,
        "pass_peak_mib": pass_peak,
        "catalogue_added_mib": _status_mib("VmHWM") - start, "catalogue_items": catalogue.num_rows,
        "last_loss": loss_value, "params": sum(p.numel() for p in model.parameters()),
    }))  # fmt: skip


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last reset) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_size(rows: int, work: Path, args: argparse.Namespace) -> dict:
    """Every stage of ``args.stages`` at one size; each stage's figures are also appended to
    ``work/stages.jsonl`` as it ends, so a long run that is stopped keeps what it measured."""
    users, items, days = args.users, args.items, days_for(rows, args.users)
    log_dir, features_dir = work / f"log-{rows}", work / f"features-{rows}"
    python = [sys.executable]
    result = _Logged({"rows_target": rows, "users": users, "items": items, "days": days}, work / "stages.jsonl")
    if "simulate" in args.stages:
        simulated = stage(python + ["-m", "feedrank.cli", "simulate", "--out", str(log_dir), "--overwrite",
                                    "--users", str(users), "--items", str(items), "--days", str(days),
                                    "--seed", "0"])  # fmt: skip
        result["events"] = json.loads((log_dir / "summary.json").read_text())["events"]
        result["simulate"] = simulated | {"disk_bytes": disk_bytes(log_dir)}
    if "features" in args.stages:
        cmd = python + ["-m", "feedrank.cli", "features", "build", str(log_dir), str(features_dir)]
        overrides = {"row_group_size": args.row_group_size, "history_len": args.history_len}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            (work / "features.yaml").write_text(json.dumps({"features": overrides}) + "\n")  # JSON is YAML
            cmd += ["--config", str(work / "features.yaml")]
        if args.chunk_rows:
            cmd += ["--chunk-rows", str(args.chunk_rows)]
        result["features"] = stage(cmd) | {"disk_bytes": disk_bytes(features_dir)}
    if "train" in args.stages:
        cmd = python + [__file__, "--child-train", str(features_dir), "--child-log", str(log_dir),
                        "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
        if args.shuffle_buffer_rows:
            cmd += ["--shuffle-buffer-rows", str(args.shuffle_buffer_rows)]
        if args.max_batches:
            cmd += ["--max-batches", str(args.max_batches)]
        result["train"] = stage(cmd)
    return result


class _Logged(dict):
    """A size's result dict that appends each stage's figures to a JSON-lines file when set."""

    def __init__(self, data: dict, path: Path):
        super().__init__(data)
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if key in STAGES:
            with self.path.open("a") as f:
                f.write(json.dumps({"rows_target": self["rows_target"], "stage": key, **value}) + "\n")


def report(results: list[dict], limit_mib: float) -> dict:
    """Print the table, per-row costs and RSS growth per row between the smallest and largest sizes."""
    print(f"\n{'events':>12} {'stage':>9} {'wall s':>8} {'cpu s':>8} {'us/row':>8} {'peak MiB':>9} {'disk MB':>8}  notes")
    summary: dict = {"limit_mib": limit_mib, "stages": {}}
    for r in results:
        for name in STAGES:
            s = r.get(name)
            if not s:
                continue
            notes = ""
            if name == "train":
                notes = (f"loader {s['loader_cpu_us_per_impression']:.2f} + step {s['step_cpu_us_per_impression']:.2f} CPU-us/impression; "
                         f"{s['impressions_per_s']:,.0f} impressions/s ({s['pairs_per_s']:,.0f} clicked pairs/s), "
                         f"loader {100 * s['loader_share']:.0f}% of step time; pass peak {s['pass_peak_mib']:.0f} MiB, "
                         f"then the catalogue read +{s['catalogue_added_mib']:.0f} MiB")
            # CPU-us a log row; the train pass may stop early, so its cost is per impression it read
            s["us_per_row"] = (1e6 * (s["loader_cpu_s"] + s["step_cpu_s"]) / s["impressions"] if name == "train"
                               else 1e6 * s["cpu_s"] / r["events"])
            s["pass"] = s["peak_rss_mib"] < limit_mib
            disk = f"{s['disk_bytes'] / 1e6:8.0f}" if "disk_bytes" in s else f"{'':>8}"
            print(f"{r['events']:>12,} {name:>9} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['us_per_row']:8.2f} "
                  f"{s['peak_rss_mib']:9.0f} {disk}  {'PASS' if s['pass'] else 'FAIL'} {notes}")
    if len(results) > 1:
        small, large = results[0], results[-1]
        extra = large["events"] - small["events"]
        for name in STAGES:
            if name in small and name in large:
                peaks = [("", "peak_rss_mib")] + ([(" pass", "pass_peak_mib"), (" catalogue", "catalogue_added_mib")] if name == "train" else [])
                for label, key in peaks:
                    growth = (large[name][key] - small[name][key]) * 2**20 / extra
                    summary["stages"][name + label.replace(" ", "_")] = {"rss_bytes_per_extra_row": growth,
                                                                        "peak_mib": large[name][key]}  # fmt: skip
                    print(f"{name + label:>14}: peak RSS grows {growth:7.1f} B per extra row "
                          f"({small['events']:,} -> {large['events']:,} events)")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--work", type=Path, help="keep logs and features here (default: a deleted temp dir)")
    parser.add_argument("--batch-size", type=int, default=1024, help="impressions a loader batch (clicked ones are trained)")
    parser.add_argument("--shuffle-buffer-rows", type=int, default=None, help="default: the loader config's")
    parser.add_argument("--row-group-size", type=int, default=None, help="feature files' row groups (default: the feature config's)")
    parser.add_argument("--history-len", type=int, default=None, help="features' history length (default: the feature config's)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="feature build's rows a chunk (default: the build's)")
    parser.add_argument("--max-batches", type=int, default=None, help="stop the pass after this many batches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the train pass (1: no spin-waiting on a shared machine)")
    parser.add_argument("--limit-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--child-train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        train_pass(args.child_train, args.child_log, args.batch_size, args.max_batches, args.threads, args.shuffle_buffer_rows)
        return 0
    if "simulate" not in args.stages and args.work is None:
        parser.error("--stages without simulate reads an existing log: pass --work")
    with tempfile.TemporaryDirectory(prefix="feedrank-100m-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for rows in args.rows:
            results.append(run_size(rows, work, args))
            if "events" not in results[-1]:
                results[-1]["events"] = json.loads((work / f"log-{rows}" / "summary.json").read_text())["events"]
            print(json.dumps({k: v for k, v in results[-1].items()}, default=str)[:400], flush=True)
    summary = report(results, args.limit_gib * 1024)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "sizes": results,
                                        "summary": summary}, indent=2) + "\n")  # fmt: skip
    return 0 if all(r[s]["pass"] for r in results for s in STAGES if s in r) else 1


if __name__ == "__main__":
    sys.exit(main())
