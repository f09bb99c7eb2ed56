"""The small log of the chunked-build equivalence test (``test_features_streaming.py``), and the
script that recorded the expected output with the in-memory build it replaced.

A log built so that a small chunk size meets every hard case: requests sharing timestamps (ties at
chunk boundaries), a heavy user whose history is longer than a chunk, items first shown mid-log,
titles that change (the latest wins) or are null, null ``created_ts`` and null categories, test-split
ids never seen in training (OOV and hash buckets).

    PYTHONPATH=src python tests/features/streaming_world.py   # rewrote data/streaming_expected.json
                                                               # at main b22fa92 (the in-memory build)
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrank.data.log import write_log
from feedrank.features import FeatureConfig, build_features, split_files

EXPECTED = Path(__file__).parent / "data" / "streaming_expected.json"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
US = 1_000_000

ROWS_OF = "split"  # the build whose rows are recorded too (the others: their manifest, with every file's sha256)
#: name -> FeatureConfig keys of every build the test compares.
CONFIGS: dict[str, dict] = {
    "split": {
        "history_len": 6, "split_at": "2024-01-04T00:00:00", "cutoff": "2024-01-05T06:00:00",
        "items": {"hash_buckets": 3}, "users": {"min_count": 2}, "categorical": {"max_size": 2},
        "tokens": {"min_count": 2}, "title_len": 3, "rows_per_file": 37, "row_group_size": 8,
    },
    "no_split": {"history_len": 3, "rows_per_file": 1000, "row_group_size": 16},
    "other_engagements": {"history_len": 4, "history_mode": "other_engagements", "history_seed": 7,
                          "rows_per_file": 50, "row_group_size": 13},
}  # fmt: skip


def world(seed: int = 0, days: int = 5, requests_a_day: int = 30, per_request: int = 3) -> pa.Table:
    rng = np.random.default_rng(seed)
    n_req = days * requests_a_day
    day = np.repeat(np.arange(days), requests_a_day)
    slot = rng.integers(0, 12, n_req)  # 12 two-hour slots a day: many requests share a timestamp
    ts_req = (day * 86_400 + slot * 7_200) * US
    user_req = np.where(rng.random(n_req) < 0.3, 0, rng.integers(1, 12, n_req))  # u0 is heavy
    user_req[-3:] = [90, 91, 90]  # test-period users never seen in training
    n = n_req * per_request
    req = np.repeat(np.arange(n_req), per_request)
    pos = np.tile(np.arange(per_request), n_req)
    d = np.repeat(day, per_request)
    # items 0..9 exist from day 0; 3 new items appear each day (new items mid-log)
    pool = 10 + 3 * d
    first = np.repeat(rng.integers(0, 1_000, n_req), per_request)
    item = (first + pos * 7) % pool
    clicked = rng.random(n) < 0.35
    title_word = np.array(["storm", "coast", "match", "vote", "market", "film"])
    titles = [None if i % 9 == 4 else f"{title_word[i % 6]} {title_word[(i // 6) % 6]} day{dd // 3} news"
              for i, dd in zip(item, d)]  # fmt: skip
    avail = np.maximum(0, (item - 10) // 3 + 1)  # the day the item is first offered
    created = [None if i % 4 == 1 else T0 + dt.timedelta(hours=int(a) * 24 - 3 - int(i) % 5) for i, a in zip(item, avail)]
    return pa.table({
        "user_id": [f"u{u}" for u in np.repeat(user_req, per_request)],
        "item_id": [f"i{i}" for i in item],
        "ts": pa.array(np.repeat(ts_req, per_request) + int(T0.timestamp()) * US, pa.timestamp("us", tz="UTC")),
        "request_id": [f"r{r:04d}" for r in rng.permutation(n_req)[req]],  # ids not in time order
        "position": pos.astype(np.int32),
        "clicked": clicked,
        "dwell_s": np.where(clicked, rng.exponential(20, n), 0.0).astype(np.float32),
        "shared": clicked & (rng.random(n) < 0.2),
        "hidden": rng.random(n) < 0.08,
        "publisher": [f"pub{i % 5}" for i in item],
        "item_type": ["video" if i % 5 == 0 else "article" for i in item],
        "created_ts": pa.array(created, pa.timestamp("us", tz="UTC")),
        "category": [None if i % 7 == 0 else f"cat{i % 3}" for i in item],
        "title": titles,
        "age_bucket": [None if u % 5 == 3 else f"age{u % 3}" for u in np.repeat(user_req, per_request)],
        "country": [["DE", "FR", "NL"][u % 3] for u in np.repeat(user_req, per_request)],
    })  # fmt: skip


def write_world(root: Path) -> Path:
    result = write_log(root, world())
    assert result.ok, result.refused
    return root


def comparable(manifest: dict) -> dict:
    """The manifest without what names the machine it ran on (the log's path)."""
    return {k: v for k, v in manifest.items() if k != "source_log"}


def split_rows(out: Path) -> dict[str, list[dict]]:
    """Every column of every split, as JSON-able values (timestamps as epoch microseconds)."""
    rows = {}
    for split in json.loads((out / "manifest.json").read_text())["splits"]:
        files = split_files(out, split)
        table = pa.concat_tables([pq.read_table(p) for p in files]) if files else None
        if table is not None:
            table = table.set_column(0, "ts", table["ts"].cast(pa.int64()))
        rows[split] = table.to_pydict() if table is not None else {}
    return rows


def record(work: Path) -> dict:
    log = write_world(work / "log")
    expected = {}
    for name, keys in CONFIGS.items():
        from feedrank.config import from_dict

        cfg = from_dict(FeatureConfig, keys, "features")
        result = build_features(log, work / name, cfg, progress=False)
        expected[name] = {"manifest": comparable(result.manifest)}  # its sha256s pin every file's bytes
        if name == ROWS_OF:
            expected[name]["rows"] = split_rows(work / name)  # to say which column differs, when one does
    expected["catalogue"] = catalogue_rows(training_catalogue_of(log, work / ROWS_OF))
    return expected


def training_catalogue_of(log: Path, features: Path) -> pa.Table:
    """``train.task.training_catalogue`` of the ``ROWS_OF`` build: the training window's catalogue."""
    from feedrank.config import from_dict
    from feedrank.features.build import VOCAB_DIR
    from feedrank.features.vocab import Vocabularies
    from feedrank.train.task import training_catalogue

    cfg = from_dict(FeatureConfig, CONFIGS[ROWS_OF], "features")
    return training_catalogue(log, Vocabularies.load(features / VOCAB_DIR), cfg)


def catalogue_rows(catalogue: pa.Table) -> dict:
    for name in ("created_ts", "first_seen_ts"):
        catalogue = catalogue.set_column(catalogue.schema.get_field_index(name), name, catalogue[name].cast(pa.int64()))
    return catalogue.to_pydict()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        EXPECTED.write_text(json.dumps(record(Path(tmp)), sort_keys=True) + "\n")
    print(f"wrote {EXPECTED} ({EXPECTED.stat().st_size:,} bytes)", file=sys.stderr)
