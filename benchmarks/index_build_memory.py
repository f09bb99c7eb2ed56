"""Peak memory of `feedrank index build` end to end, measured as a child process's ``ru_maxrss``.

Runs ``python -m feedrank.cli index build VECTORS --ids IDS --out OUT --config CFG`` in a child
(with ``--src`` on its PYTHONPATH, so two checkouts, before and after a change, can be compared on
the same files) and prints the child's peak RSS and wall time. The ids file (``i0``, ``i1``, ...
as a parquet column ``item_id``) is written beside the vectors in 1M-row chunks if it is missing.
The vectors are any ``(n, dim)`` float32 ``.npy``, e.g. the one
``benchmarks/index_recall_speed.py --data-dir DIR`` leaves in DIR.

    .venv/bin/python benchmarks/index_build_memory.py --vectors /tmp/idx10m/vectors.npy
    .venv/bin/python benchmarks/index_build_memory.py --vectors /tmp/idx10m/vectors.npy --src /path/to/other/src
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# The 10M settings of docs/scaling.md: IVF-PQ, 4096 lists, PQ 16 x 8 bit, re-rank x8, gate on 200 queries.
CONFIG = """index:
  kind: ivfpq
  nlist: 4096
  ivf_train_per_list: 32
  nprobe: 16
  pq_m: 16
  refine_k_factor: 8
  recall_sample: 200
"""


def write_ids(path: Path, n: int) -> None:
    """``n`` ids ``i0``.. as a parquet ``item_id`` column, written 1M rows at a time."""
    schema = pa.schema([("item_id", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 1 << 20):
            rows = np.arange(start, min(n, start + (1 << 20)))
            writer.write_table(pa.table({"item_id": pa.array(np.char.add("i", rows.astype(str)))}, schema=schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, required=True)
    parser.add_argument("--ids", type=Path, help="default: item_ids.parquet beside the vectors (written if missing)")
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the feedrank source tree the child imports")
    args = parser.parse_args()
    n = np.load(args.vectors, mmap_mode="r").shape[0]
    ids = args.ids or args.vectors.with_name("item_ids.parquet")
    if not ids.is_file():
        write_ids(ids, n)
    with tempfile.TemporaryDirectory(prefix="feedrank-index-mem-", dir=args.vectors.parent) as tmp:
        (Path(tmp) / "index.yaml").write_text(CONFIG)
        cmd = [sys.executable, "-m", "feedrank.cli", "index", "build", str(args.vectors), "--ids", str(ids),
               "--out", str(Path(tmp) / "index"), "--config", str(Path(tmp) / "index.yaml")]
        start = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(args.src)}, capture_output=True, text=True)
        wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(done.stdout.strip() or done.stderr.strip()[-2000:])
    print(f"feedrank index build of {n:,} items from {args.src}: exit {done.returncode}, wall {wall:.0f} s, "
          f"peak RSS {peak_kb:,} kB = {peak_kb / 2**20:.2f} GiB")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
