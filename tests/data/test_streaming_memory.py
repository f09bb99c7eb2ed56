"""The pipeline's memory does not grow with the log: simulate, the point-in-time feature build, the
two-tower pass over the features (loader + steps) and the training catalogue read, at two log sizes
a CI machine can afford (~100k and ~800k impressions).

Runs ``benchmarks/train_100m.py`` (each stage a fresh child process; peak RSS from the kernel, not
timing) with a fixed world, so only the days, and with them the rows, grow. The bound is
self-calibrated: a stage that kept even a quarter of the extra rows in memory would add a quarter of
their Arrow size, which is read from the built split itself (the in-memory feature build it
replaced grew by ~450 B a row here, several times that). Short histories (5) fill up in the first
days, so the larger log's batches are no wider than the smaller one's. The feature build runs in
chunks of 8,192 rows so that both logs span many chunks: below one chunk its memory grows with the
log up to the chunk's, by design. Run to run, the peaks move by ~10 MiB (allocator noise); the
larger log's bound is ~30 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from feedrank.data.collate import BATCH_COLUMNS
from feedrank.features import split_files

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "train_100m.py"
SMALL, LARGE = 100_000, 800_000


@pytest.mark.slow
def test_streaming_stages_keep_rss_flat_as_the_log_grows(tmp_path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(BENCHMARK), "--rows", str(SMALL), str(LARGE), "--users", "1000", "--items", "1000",
           "--history-len", "5", "--max-batches", "40", "--shuffle-buffer-rows", "8192", "--row-group-size", "8192",
           "--chunk-rows", "8192",
           "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    # Arrow's default allocator (mimalloc), as users run it: the catalogue read, whose RSS grew
    # ~30 B a row here from pages mimalloc kept after each day, now runs under the system allocator
    # itself (feedrank.data.memory) and grows ~2 MiB here (three runs: 1.3-1.9 MiB).
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    small, large = result["sizes"]
    extra_rows = large["events"] - small["events"]
    assert extra_rows > 600_000

    for size in (small, large):  # the pipeline's bound, every stage
        for stage in ("simulate", "features", "train"):
            assert size[stage]["peak_rss_mib"] < 4096, (stage, size[stage]["peak_rss_mib"])

    features = tmp_path / "work" / f"features-{LARGE}"
    train = [pq.read_table(f, columns=list(BATCH_COLUMNS)) for f in split_files(features, "train")]
    row_bytes = sum(t.nbytes for t in train) / sum(t.num_rows for t in train)
    allowed = 0.25 * row_bytes * extra_rows / 2**20  # MiB: a quarter of the extra rows held in memory
    grown = {
        "simulate": large["simulate"]["peak_rss_mib"] - small["simulate"]["peak_rss_mib"],
        "features": large["features"]["peak_rss_mib"] - small["features"]["peak_rss_mib"],
        "train pass": large["train"]["pass_peak_mib"] - small["train"]["pass_peak_mib"],
        "training catalogue": large["train"]["catalogue_added_mib"] - small["train"]["catalogue_added_mib"],
    }
    assert all(growth < allowed for growth in grown.values()), (grown, f"allowed {allowed:.1f} MiB", f"{row_bytes:.0f} B a row")
    assert large["train"]["batches"] == small["train"]["batches"] == 40


def test_system_memory_pool_is_scoped() -> None:
    """The catalogue read's allocator switch ends with its block, also when the block raises."""
    import pyarrow as pa

    from feedrank.data.memory import system_memory_pool

    before = pa.default_memory_pool().backend_name
    with system_memory_pool() as pool:
        assert pa.default_memory_pool().backend_name == pool.backend_name == "system"
        kept = pa.array(range(1000))  # made inside, freed outside
    assert pa.default_memory_pool().backend_name == before
    with pytest.raises(ValueError), system_memory_pool():
        raise ValueError("boom")
    assert pa.default_memory_pool().backend_name == before
    assert kept.sum().as_py() == 499500


def test_stream_holds_no_buffers_of_the_files_it_has_read(tmp_path) -> None:
    """Arrow memory in use at the end of a pass does not grow with the files read before: an open
    ``ParquetFile`` keeps buffers after a read, and a pass that kept every file open held them all
    (the 20M->50M train pass's +131 MiB). Arrow's own allocation count, not RSS: no allocator noise."""
    import numpy as np
    import pyarrow as pa

    from feedrank.data.stream import ParquetStream

    rng = np.random.default_rng(0)
    rows = 4096
    for i in range(40):
        table = pa.table({"x": rng.integers(0, 1000, rows), "h": pa.array([list(range(j % 7)) for j in range(rows)]),
                          "t": pa.array([f"title {j % 97}" for j in range(rows)])})  # fmt: skip
        pq.write_table(table, tmp_path / f"part-{i:05d}.parquet", row_group_size=rows // 2)

    def in_use_at_the_last_batch(n_files: int) -> int:
        files = sorted(tmp_path.glob("*.parquet"))[:n_files]
        stream = ParquetStream(files, 512, shuffle=True, seed=0, shuffle_buffer_rows=2048)
        batches, in_use = iter(stream), 0
        for _ in range(stream.num_batches()):  # the generator (and whatever it holds) is alive here
            next(batches)
            in_use = pa.total_allocated_bytes()
        return in_use

    few, many = in_use_at_the_last_batch(5), in_use_at_the_last_batch(40)
    assert many - few < 64 * 1024, (few, many)  # equal here (+64 B); keeping the 35 more files open: +280 kB
