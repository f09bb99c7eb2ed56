"""The example builder against a brute-force per-row reference, and its point-in-time guarantees."""

import datetime as dt
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.config import ConfigError, from_dict
from feedrank.data.log import write_log
from feedrank.features import (
    COUNTER_COLUMNS,
    FeatureBuildError,
    FeatureConfig,
    NotTrainableError,
    Vocabularies,
    build_features,
    check_trainable,
    load_manifest,
    split_files,
)

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
US_PER_MIN = 60_000_000


def random_log(seed: int, n_requests: int = 60, per_request: int = 4, n_users: int = 8, n_items: int = 15,
               days: int = 3, click_rate: float = 0.3) -> pa.Table:  # fmt: skip
    """A small canonical log: requests of distinct items, coarse timestamps so that different
    requests often share a timestamp (ties), some items without created_ts, some hidden clicks."""
    rng = np.random.default_rng(seed)
    n = n_requests * per_request
    req = np.repeat(np.arange(n_requests), per_request)
    pos = np.tile(np.arange(per_request), n_requests)
    minutes = np.repeat(rng.integers(0, days * 24 * 6, n_requests) * 10, per_request)
    ts = np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64) + minutes * US_PER_MIN
    user = np.repeat(rng.integers(0, n_users, n_requests), per_request)
    item = (np.repeat(rng.integers(0, n_items, n_requests), per_request) + pos) % n_items
    clicked = rng.random(n) < click_rate
    created_min = np.where(np.arange(n_items) % 3 == 0, -1, rng.integers(-600, 60, n_items) - 100)
    created = pa.array(
        [None if created_min[i] == -1 else T0 + dt.timedelta(minutes=int(created_min[i])) for i in item],
        pa.timestamp("us", tz="UTC"),
    )
    return pa.table(
        {
            "user_id": [f"u{u}" for u in user],
            "item_id": [f"i{i}" for i in item],
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "request_id": [f"r{r}" for r in req],
            "position": pos.astype(np.int32),
            "clicked": clicked,
            "dwell_s": np.where(clicked, 10.0, 0.0).astype(np.float32),
            "shared": clicked & (rng.random(n) < 0.2),
            "hidden": rng.random(n) < 0.1,
            "publisher": [f"pub{i % 4}" for i in item],
            "item_type": ["video" if i % 5 == 0 else "article" for i in item],
            "created_ts": created,
            "category": [None if i % 7 == 0 else f"cat{i % 3}" for i in item],
            "age_bucket": [f"age{u % 3}" for u in user],
            "country": [["DE", "FR"][u % 2] for u in user],
        }
    )


def write(root: Path, table: pa.Table) -> Path:
    result = write_log(root, table)
    assert result.ok, result.refused
    return root


def read_split(out: Path, split: str = "train") -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in split_files(out, split)]).to_pylist()


def reference(log: pa.Table, vocabs: Vocabularies, cfg: FeatureConfig, train_end: dt.datetime | None) -> dict:
    """Brute force, one row at a time, straight from the definitions in feedrank.features.build."""
    rows = log.to_pylist()
    rows.sort(key=lambda r: (r["ts"], r["request_id"], r["position"], r["item_id"], r["user_id"]))
    item_index = {x: i + 2 for i, x in enumerate(vocabs.items.ids)}
    window = [r for r in rows if train_end is None or r["ts"] < train_end]
    eng = {}
    for r in window:
        eng[r["item_id"]] = eng.get(r["item_id"], 0) + (r["clicked"] and not r["hidden"])
    denom = sum(eng.values()) + len(eng)
    out = {}
    for r in rows:
        before = [p for p in rows if p["ts"] < r["ts"]]
        mine = [p for p in before if p["user_id"] == r["user_id"]]
        theirs = [p for p in before if p["item_id"] == r["item_id"]]
        history = [item_index.get(p["item_id"], 1) for p in mine if p["clicked"] and not p["hidden"]]
        first_seen = min(p["ts"] for p in rows if p["item_id"] == r["item_id"])
        born = r["created_ts"] or first_seen
        clicks = sum(p["clicked"] for p in theirs)
        out[(r["request_id"], r["item_id"])] = {
            "history": history[-cfg.history_len :] if cfg.history_len else [],
            "user_impressions": math.log1p(len(mine)),
            "user_clicks": math.log1p(sum(p["clicked"] for p in mine)),
            "item_impressions": math.log1p(len(theirs)),
            "item_clicks": math.log1p(clicks),
            "item_ctr": (clicks + cfg.ctr_prior_weight * cfg.ctr_prior) / (len(theirs) + cfg.ctr_prior_weight),
            "item_age_h": max((r["ts"] - born).total_seconds() / 3600, 0.0),
            "item_logq": math.log((eng.get(r["item_id"], 0) + 1) / denom),
        }
    return out


def assert_matches_reference(out_rows: list[dict], ref: dict) -> None:
    assert len(out_rows) == len(ref)
    for row in out_rows:
        want = ref[(row["request_id"], row["item_id"])]
        assert row["history"] == want["history"], row
        for name in (*COUNTER_COLUMNS, "item_age_h", "item_logq"):
            assert row[name] == pytest.approx(want[name], rel=1e-5, abs=1e-5), (name, row)


@pytest.mark.parametrize("seed, history_len", [(0, 3), (1, 5), (2, 0)])
def test_vectorised_build_matches_brute_force_reference(tmp_path, seed, history_len):
    log = random_log(seed)
    cfg = FeatureConfig(history_len=history_len, rows_per_file=70, row_group_size=16)
    result = build_features(write(tmp_path / "log", log), tmp_path / "out", cfg, progress=False)
    vocabs = Vocabularies.load(tmp_path / "out" / "vocab")
    rows = read_split(tmp_path / "out")
    assert_matches_reference(rows, reference(log, vocabs, cfg, None))
    assert any(len(r["history"]) == history_len for r in rows)  # truncation was exercised
    assert [f["rows"] for f in result.manifest["splits"]["train"]["files"]] == [70, 70, 70, 30]
    assert pq.ParquetFile(split_files(tmp_path / "out")[0]).metadata.num_row_groups == 5  # 70 rows / 16
    # ids map through the saved vocabularies
    users = {r["user_id"]: r["user_idx"] for r in rows}
    assert all(vocabs.users.lookup([u])[0] == idx for u, idx in users.items())


def test_split_reference_and_test_rows_see_training_history(tmp_path):
    log = random_log(2)
    split_at = "2024-01-02T12:00:00+00:00"
    cfg = FeatureConfig(history_len=5, split_at=split_at)
    result = build_features(write(tmp_path / "log", log), tmp_path / "out", cfg, progress=False)
    vocabs = Vocabularies.load(tmp_path / "out" / "vocab")
    ref = reference(log, vocabs, cfg, dt.datetime.fromisoformat(split_at))
    train, test = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "test")
    assert_matches_reference(train + test, ref)
    boundary = dt.datetime.fromisoformat(split_at)
    assert all(r["ts"] < boundary for r in train) and all(r["ts"] >= boundary for r in test)
    assert sum(len(r["history"]) > 0 for r in test) > 0
    assert result.manifest["splits"]["test"]["rows"] == len(test)
    # vocabularies come from the training rows only
    assert set(vocabs.items.ids) == {r["item_id"] for r in train}


def test_features_never_see_the_future(tmp_path):
    """Rows after T must not change any feature of earlier rows: append a burst of clicks by the
    same users on the same items (ties at one timestamp: test_same_timestamp_clicks_are_excluded)."""
    past = random_log(3, days=2)
    t_future = T0 + dt.timedelta(days=2)
    future = past.slice(0, 40).to_pydict()
    future["ts"] = [t_future + dt.timedelta(minutes=i) for i in range(40)]
    future["request_id"] = [f"future{i}" for i in range(40)]
    future["clicked"] = [True] * 40
    future["dwell_s"] = [30.0] * 40
    future["hidden"] = [False] * 40
    full = pa.concat_tables([past, pa.table(future, schema=past.schema)])
    cfg = FeatureConfig(history_len=10)
    build_features(write(tmp_path / "past", past), tmp_path / "a", cfg, progress=False)
    build_features(write(tmp_path / "full", full), tmp_path / "b", cfg, progress=False)

    def decoded(out: Path) -> dict:
        vocabs = Vocabularies.load(out / "vocab")
        items = ["<pad>", "<oov>", *vocabs.items.ids]
        return {
            (r["request_id"], r["item_id"]): (
                [items[i] for i in r["history"]], r["item_age_h"], *(r[c] for c in COUNTER_COLUMNS)
            )
            for r in read_split(out)
        }

    a, b = decoded(tmp_path / "a"), decoded(tmp_path / "b")
    assert {k: b[k] for k in a} == a
    # and the future rows did see the past: otherwise the comparison above would be vacuous
    assert any(len(b[(f"future{i}", future["item_id"][i])][0]) > 0 for i in range(40))


def test_same_timestamp_clicks_are_excluded():
    """Two items in one request (same ts): a click on one must not show in the other's features."""
    rows = {
        "user_id": ["u", "u", "u"],
        "item_id": ["a", "b", "c"],
        "ts": [T0, T0, T0 + dt.timedelta(minutes=1)],
        "request_id": ["r1", "r1", "r2"],
        "position": [0, 1, 0],
        "clicked": [True, False, False],
    }
    by_item = {r["item_id"]: r for r in _build_rows(pa.table(rows))}
    assert by_item["b"]["history"] == [] and by_item["b"]["user_clicks"] == 0.0
    assert by_item["b"]["user_impressions"] == 0.0
    assert by_item["c"]["history"] == [2]  # "a" is the only item id with index 2 (count tie, id order)
    assert by_item["c"]["user_impressions"] == pytest.approx(math.log1p(2))


def _build_rows(table: pa.Table, **cfg) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        build_features(write(root / "log", table), root / "out", FeatureConfig(**cfg), progress=False)
        return read_split(root / "out")


def test_build_is_byte_identical_across_runs(tmp_path):
    log_dir = write(tmp_path / "log", random_log(4))
    cfg = FeatureConfig(history_len=4, split_at="2024-01-02T00:00:00", rows_per_file=50, row_group_size=20)
    a = build_features(log_dir, tmp_path / "a", cfg, progress=False)
    b = build_features(log_dir, tmp_path / "b", cfg, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert len(files) > 5
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a.manifest["content_hash"] == b.manifest["content_hash"]
    # rebuilding in place replaces the previous build and gives the same bytes again
    build_features(log_dir, tmp_path / "a", cfg, progress=False)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_cutoff_replays_the_past_exactly(tmp_path):
    """Building the full log with cutoff=T gives the same examples as a log that ends at T."""
    log = random_log(5)
    cutoff = T0 + dt.timedelta(days=2)
    past = log.filter(pa.compute.less(log["ts"], pa.scalar(cutoff, pa.timestamp("us", tz="UTC"))))
    build_features(write(tmp_path / "past", past), tmp_path / "a", FeatureConfig(), progress=False)
    res = build_features(write(tmp_path / "full", log), tmp_path / "b", FeatureConfig(cutoff=cutoff.isoformat()), progress=False)
    assert res.manifest["splits"]["train"]["rows"] == past.num_rows < log.num_rows
    for rel in ["train/part-00000.parquet", "vocab/item_id.json", "vocab/user_id.json"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_unknown_ids_in_test_split_are_oov_and_counted(tmp_path):
    rows = {
        "user_id": ["u1", "u1", "new_user", "u1"],
        "item_id": ["a", "b", "a", "zzz"],
        "ts": [T0, T0 + dt.timedelta(hours=1), T0 + dt.timedelta(days=1), T0 + dt.timedelta(days=1, hours=1)],
        "request_id": ["r1", "r2", "r3", "r4"],
        "clicked": [True, False, True, False],
        "publisher": ["p", "p", "p", "brand-new"],
    }
    cfg = FeatureConfig(split_at=(T0 + dt.timedelta(hours=12)).isoformat())
    result = build_features(write(tmp_path / "log", pa.table(rows)), tmp_path / "out", cfg, progress=False)
    oov = result.manifest["splits"]["test"]["oov"]
    assert (oov["user_id"], oov["item_id"], oov["publisher"]) == (1, 1, 1)
    assert result.manifest["splits"]["train"]["oov"]["user_id"] == 0
    test = {r["request_id"]: r for r in read_split(tmp_path / "out", "test")}
    assert test["r3"]["user_idx"] == 1 and test["r4"]["item_idx"] == 1 and test["r4"]["publisher_idx"] == 1
    assert test["r4"]["history"] == [2]  # u1 clicked "a" in training, and new_user's click is another user


def test_empty_log_cutoff_and_split_errors_keep_previous_build(tmp_path):
    with pytest.raises(FeatureBuildError, match="no event log"):
        build_features(tmp_path / "nothing", tmp_path / "out", progress=False)
    log_dir = write(tmp_path / "log", random_log(6))
    build_features(log_dir, tmp_path / "out", FeatureConfig(history_len=2), progress=False)
    before = load_manifest(tmp_path / "out")
    with pytest.raises(FeatureBuildError, match="no rows before cutoff 2023-01-01"):
        build_features(log_dir, tmp_path / "out", FeatureConfig(cutoff="2023-01-01"), progress=False)
    with pytest.raises(FeatureBuildError, match="no events before split_at 2023-06-01"):
        build_features(log_dir, tmp_path / "out", FeatureConfig(split_at="2023-06-01"), progress=False)
    assert load_manifest(tmp_path / "out") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_config_is_strict():
    assert from_dict(FeatureConfig, {"history_len": 10, "items": {"hash_buckets": 64}}).items.hash_buckets == 64
    with pytest.raises(ConfigError, match="unknown key.*'history_length'"):
        from_dict(FeatureConfig, {"history_length": 10})
    with pytest.raises(ConfigError, match="items: unknown key.*'bucket'"):
        from_dict(FeatureConfig, {"items": {"bucket": 3}})
    with pytest.raises(ConfigError, match="split_at: not an ISO-8601 timestamp: 'tomorrow'"):
        from_dict(FeatureConfig, {"split_at": "tomorrow"})
    with pytest.raises(ConfigError, match="split_at .* must be before cutoff"):
        from_dict(FeatureConfig, {"split_at": "2024-02-01", "cutoff": "2024-01-01"})


def test_check_trainable(tmp_path):
    log = random_log(7)
    build_features(write(tmp_path / "log", log), tmp_path / "ok", progress=False)
    assert check_trainable(tmp_path / "ok")["clicks"] == int(np.sum(log["clicked"].to_numpy()))
    negative = log.set_column(log.schema.get_field_index("clicked"), "clicked", pa.array([False] * log.num_rows))
    negative = negative.set_column(negative.schema.get_field_index("dwell_s"), "dwell_s", pa.array([0.0] * log.num_rows, pa.float32()))
    negative = negative.set_column(negative.schema.get_field_index("shared"), "shared", pa.array([False] * log.num_rows))
    build_features(write(tmp_path / "neg", negative), tmp_path / "bad", progress=False)
    with pytest.raises(NotTrainableError, match="split 'train' is all-negative \\(240 impressions, 0 clicks\\)"):
        check_trainable(tmp_path / "bad")
    with pytest.raises(NotTrainableError, match="no split 'test'"):
        check_trainable(tmp_path / "ok", "test")
    with pytest.raises(FileNotFoundError, match="no feature build"):
        check_trainable(tmp_path / "missing")
