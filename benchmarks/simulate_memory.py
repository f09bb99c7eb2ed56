"""Peak memory and speed of `feedrank simulate` at scale (target: peak RSS < 2 GiB).

Runs the real CLI in a child process, so the figure is the whole command's peak resident set
(interpreter, imports, world, one chunk in flight, Parquet writer), read from the kernel's
accounting of finished children (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, KiB on Linux).

    .venv/bin/python benchmarks/simulate_memory.py                      # 100k users, 50k items, 14 days
    .venv/bin/python benchmarks/simulate_memory.py --users 10000 --days 2

Prints events, seconds, events/s (per wall and per CPU second: the machine may be shared), peak
RSS (MiB) and PASS/FAIL, then the same as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_MIB = 2048


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the log here (default: a deleted temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="feedrank-sim-") as tmp:
        out = args.out or Path(tmp) / "log"
        cmd = [
            sys.executable, "-m", "feedrank.cli", "simulate", "--out", str(out), "--overwrite",
            "--users", str(args.users), "--items", str(args.items), "--days", str(args.days), "--seed", str(args.seed),
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return proc.returncode
        summary = json.loads((out / "summary.json").read_text())

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib = usage.ru_maxrss / 1024
    cpu_s = usage.ru_utime + usage.ru_stime
    result = {
        "users": args.users,
        "items": args.items,
        "days": args.days,
        "events": summary["events"],
        "simulate_s": round(summary["seconds"], 2),
        "wall_s": round(wall, 2),  # includes interpreter start-up and imports
        "events_per_s": round(summary["events_per_s"]),
        # CPU seconds of the whole command: a fairer figure than wall time on a shared machine.
        "cpu_s": round(cpu_s, 2),
        "events_per_cpu_s": round(summary["events"] / cpu_s),
        "peak_rss_mib": round(peak_mib, 1),
        "limit_mib": LIMIT_MIB,
        "pass": peak_mib < LIMIT_MIB,
    }
    print(f"events       {result['events']:,}")
    print(f"seconds      {result['simulate_s']} (simulate), {result['wall_s']} (whole command)")
    print(f"events/s     {result['events_per_s']:,} (wall), {result['events_per_cpu_s']:,} per CPU second ({result['cpu_s']} CPU s)")
    print(f"peak RSS     {result['peak_rss_mib']} MiB (limit {LIMIT_MIB} MiB): {'PASS' if result['pass'] else 'FAIL'}")
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
