"""End to end: event log -> feature build -> ParquetStream over 2 ranks x 2 workers -> Batch."""

import datetime as dt

import numpy as np
import pyarrow as pa
import torch

from feedrank.data.collate import BATCH_COLUMNS, Collator
from feedrank.data.log import write_log
from feedrank.data.stream import ParquetStream, make_loader
from feedrank.features import FeatureConfig, build_features, split_files


def test_built_features_stream_into_batches_across_ranks_and_workers(tmp_path):
    rng = np.random.default_rng(0)
    n_req, k = 100, 5
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    clicked = rng.random(n_req * k) < 0.3
    log = pa.table(
        {
            "user_id": [f"u{u}" for u in np.repeat(rng.integers(0, 10, n_req), k)],
            "item_id": [f"i{(r + p) % 40}" for r in range(n_req) for p in range(k)],
            "ts": [t0 + dt.timedelta(minutes=10 * r) for r in range(n_req) for _ in range(k)],
            "request_id": [f"r{r}" for r in range(n_req) for _ in range(k)],
            "position": [p for _ in range(n_req) for p in range(k)],
            "clicked": clicked,
            "dwell_s": np.where(clicked, 3.0, 0.0),
        }
    )
    assert write_log(tmp_path / "log", log).ok
    build_features(tmp_path / "log", tmp_path / "f", FeatureConfig(history_len=4, row_group_size=25), progress=False)
    files = split_files(tmp_path / "f")

    seen = []
    for rank in (0, 1):
        ds = ParquetStream(files, batch_size=16, columns=BATCH_COLUMNS, shuffle=True, seed=0, rank=rank, world_size=2)
        for batch in make_loader(ds, num_workers=2, collator=Collator(max_history=3)):
            assert batch.history.shape[1] <= 3 and batch.history.shape == batch.history_mask.shape
            assert batch.user_cats.shape == (len(batch), 2) and batch.counters.shape == (len(batch), 5)
            assert torch.isfinite(batch.item_logq).all() and torch.isfinite(batch.counters).all()
            seen += list(zip(batch.request.tolist(), batch.item.tolist()))
    assert len(seen) == 500 and len(set(seen)) == 500
