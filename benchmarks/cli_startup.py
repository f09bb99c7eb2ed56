"""Start-up time of the CLI and of the serving app: the wall time of ``feedrank --help``,
``feedrank serve --help``, ``feedrank ingest mind --help`` and ``python -c "import
feedrank.serving.app"``, each run in a fresh interpreter several times; prints the median, min
and max of each and writes the figures as JSON.

The serving app must import torch (its models need it), so its figure is the floor of a
``feedrank serve --workers N`` worker's start-up before it loads the models; every worker also
re-imports ``feedrank.cli`` (multiprocessing's spawn runs the ``feedrank`` script again), which
is why the CLI must stay light. Run it on an idle machine: on a loaded one every figure grows.

    python benchmarks/cli_startup.py --runs 7 --out runs/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def commands() -> dict[str, list[str]]:
    """What to time: the installed ``feedrank`` script when on PATH, else ``python -m feedrank.cli``."""
    script = shutil.which("feedrank") or str(Path(sys.executable).with_name("feedrank"))
    cli = [script] if Path(script).is_file() else [sys.executable, "-m", "feedrank.cli"]
    return {
        "feedrank --help": [*cli, "--help"],
        "feedrank serve --help": [*cli, "serve", "--help"],
        "feedrank ingest mind --help": [*cli, "ingest", "mind", "--help"],
        "import feedrank.serving.app": [sys.executable, "-c", "import feedrank.serving.app"],
    }


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (the first warms the file cache)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()

    figures = {}
    for name, argv in commands().items():
        time_once(argv)  # warm the OS file cache so the runs measure imports, not disk reads
        runs = [time_once(argv) for _ in range(args.runs)]
        figures[name] = {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs": runs}
        print(f"{name:32s} median {figures[name]['median_s']:.3f} s  (min {min(runs):.3f}, max {max(runs):.3f}, "
              f"{args.runs} runs)", flush=True)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
