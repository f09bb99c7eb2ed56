"""The user store (seeded from a log, updated by events), id lookups and the serving log sink."""

import datetime as dt
import fcntl
import itertools
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from feedrank.data.log import read_events, write_log
from feedrank.data.schema import EVENT_SCHEMA, TS_TYPE, conform, validate
from feedrank.features.vocab import OOV, Vocab, stable_hash
from feedrank.serving.config import EventLogConfig
from feedrank.serving.follow import LogFollower
from feedrank.serving.state import (
    EVENT_ID,
    SERVING_LOG_SCHEMA,
    EventIn,
    EventSink,
    UserStore,
    VocabIndex,
    read_log_file,
    remove_stale_temp_files,
)

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
h = lambda hours: T0 + dt.timedelta(hours=hours)  # noqa: E731
ITEMS = Vocab("item_id", ["a", "b", "c", "d"])  # indices 2, 3, 4, 5


def events(rows: list[tuple]) -> pa.Table:
    """(user, item, hour, clicked, hidden, country) rows as a canonical table."""
    user, item, hour, clicked, hidden, country = zip(*rows)
    return conform(pa.table({
        "user_id": list(user), "item_id": list(item), "ts": pa.array([h(x) for x in hour], TS_TYPE),
        "request_id": [f"r{i}" for i in range(len(rows))], "clicked": list(clicked), "hidden": list(hidden),
        "country": list(country),
    })).cast(EVENT_SCHEMA)  # fmt: skip


_IDS = itertools.count()


def served(rows: list[tuple], ids: list[str] | None = None) -> pa.Table:
    """``events(rows)`` as serving-log rows: fresh event ids unless ``ids`` are given."""
    ids = ids if ids is not None else [f"e{next(_IDS)}" for _ in rows]
    return events(rows).append_column(SERVING_LOG_SCHEMA.field(EVENT_ID), pa.array(ids, pa.string()))


LOG = [
    ("u1", "a", 1, True, False, "DE"),
    ("u1", "b", 2, False, False, "DE"),
    ("u1", "c", 3, True, True, "DE"),  # clicked then hidden: not history, but seen
    ("u1", "zz", 4, True, False, "FR"),  # unknown item: OOV in history, not in seen; latest country
    ("u1", "d", 5, True, False, "FR"),
    ("u2", "b", 1, False, False, None),
]


@pytest.fixture
def log_dir(tmp_path):
    write_log(tmp_path, events(LOG))
    return tmp_path


def test_store_seeds_history_seen_counts_and_attributes_from_the_log(log_dir):
    store = UserStore.from_log(log_dir, ITEMS, history_len=2, max_seen=10, end=h(24))
    view = store.view("u1", h(25))
    assert view.history.tolist() == [OOV, 5]  # last 2 engaged: zz (OOV), d
    assert sorted(view.seen.tolist()) == [2, 3, 4, 5]
    assert (view.impressions, view.clicks, view.cats["country"], view.stored) == (5, 4, "FR", True)
    assert store.view("u2", h(25)).history.tolist() == [] and store.view("u2", h(25)).seen.tolist() == [3]
    nobody = store.view("u9", h(25))
    assert (nobody.stored, nobody.impressions, nobody.history.size) == (False, 0, 0)
    assert len(store) == 2


def test_seeding_reads_only_rows_before_end_and_bounds_seen(log_dir):
    store = UserStore.from_log(log_dir, ITEMS, history_len=5, max_seen=2, end=h(3))
    view = store.view("u1", h(3))
    assert view.history.tolist() == [2] and view.impressions == 2  # rows at 1 h and 2 h only
    store = UserStore.from_log(log_dir, ITEMS, history_len=5, max_seen=2, end=h(24))
    assert sorted(store.view("u1", h(25)).seen.tolist()) == [5]  # last 2 impressions: zz (not an item), d


def test_events_update_the_user_and_history_is_strictly_before_now(log_dir):
    store = UserStore.from_log(log_dir, ITEMS, history_len=3, max_seen=3, end=h(24))
    new = served([("u1", "b", 30, True, False, None), ("u3", "a", 31, False, False, None)])
    store.apply(new, np.array([3, 2]))
    assert store.view("u1", h(30)).history.tolist() == [OOV, 5]  # ts == now is not before now
    view = store.view("u1", h(30.5))
    assert view.history.tolist() == [OOV, 5, 3]
    assert (view.impressions, view.clicks, view.cats["country"]) == (6, 5, "FR")
    assert view.seen.tolist()[-1] == 3 and len(view.seen) == 3  # most recent last, bounded at max_seen
    u3 = store.view("u3", h(32))
    assert (u3.stored, u3.history.tolist(), u3.seen.tolist(), u3.impressions) == (True, [], [2], 1)
    assert len(store) == 3


def test_store_without_a_log_refuses_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no event log"):
        UserStore.from_log(tmp_path, ITEMS, 5, 5)


def test_vocab_index_matches_vocab_lookup_including_hash_buckets():
    for vocab in (Vocab("x", ["a", "b"]), Vocab("x", ["a", "b"], hash_buckets=7)):
        index = VocabIndex(vocab)
        values = ["a", "b", "new", "other", None]
        assert index.many(values).tolist() == vocab.lookup(values).tolist()
        assert index.known("a") and not index.known("new") and not index.known(None)
        assert index.index_of("a") == index("a") and index.index_of("new") == index.index_of(None) == -1
    assert VocabIndex(Vocab("x", [], hash_buckets=3))("q") == 2 + int(stable_hash(["q"])[0] % np.uint64(3))


def test_event_model_names_the_bad_field():
    with pytest.raises(ValidationError, match="dwell_s"):
        EventIn(user_id="u", item_id="i", dwell_s=-1)
    with pytest.raises(ValidationError, match="dwell_s"):
        EventIn(user_id="u", item_id="i", dwell_s=float("nan"))
    with pytest.raises(ValidationError, match="surprise"):
        EventIn(user_id="u", item_id="i", surprise=1)
    with pytest.raises(ValidationError, match="user_id"):
        EventIn(user_id="", item_id="i")


def test_durable_sink_writes_one_file_per_write_readable_by_read_events(tmp_path):
    sink = EventSink(EventLogConfig(dir=str(tmp_path), durable=True))
    sink.write(served([("u1", "a", 1, True, False, "DE"), ("u1", "b", 30, False, False, "DE")]))  # two days
    sink.write(served([("u2", "c", 2, False, False, None)]))
    files = sorted(p.relative_to(tmp_path).parts[1] for p in (tmp_path / "events").glob("date=*/part-*.parquet"))
    assert files == ["date=2024-01-01", "date=2024-01-01", "date=2024-01-02"]
    assert not list(tmp_path.rglob(".*.tmp"))
    assert read_events(tmp_path).num_rows == 3 and sink.rows_written == 3
    sink.close()


def _part_files(root: Path) -> int:
    return len(list((root / "events").glob("date=*/part-*.parquet")))


def test_buffered_sink_flushes_on_size_and_at_close(tmp_path):
    # an interval no test outlives: only size and close may flush here, whatever the machine's load
    sink = EventSink(EventLogConfig(dir=str(tmp_path), durable=False, flush_rows=3, flush_interval_s=3600))
    sink.write(served([("u1", "a", 1, True, False, None)]))
    assert _part_files(tmp_path) == 0  # buffered
    sink.write(served([("u1", "a", 2, True, False, None), ("u2", "b", 2, False, False, None)]))
    assert _part_files(tmp_path) == 1  # 3 rows reached flush_rows: one file for their day
    sink.write(served([("u4", "d", 3, False, False, None)]))
    assert _part_files(tmp_path) == 1
    sink.close()
    assert _part_files(tmp_path) == 2 and read_events(tmp_path).num_rows == 4


def test_buffered_sink_flushes_on_time(tmp_path):
    sink = EventSink(EventLogConfig(dir=str(tmp_path), durable=False, flush_rows=3, flush_interval_s=0.2))
    sink.write(served([("u1", "a", 1, True, False, None)]))
    deadline = time.monotonic() + 60  # the timer flushes ~0.2 s after the write; the deadline only bounds a failure
    while _part_files(tmp_path) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _part_files(tmp_path) == 1 and sink.rows_written == 1  # below flush_rows: the timer wrote it
    sink.close()
    assert _part_files(tmp_path) == 1  # nothing was left to flush at close


def test_an_event_id_is_applied_once_however_often_it_arrives(log_dir):
    store = UserStore.from_log(log_dir, ITEMS, history_len=3, max_seen=10, end=h(24))
    batch = served([("u1", "b", 30, True, False, None), ("u9", "a", 31, False, False, None)], ids=["x1", "x2"])
    assert store.apply(batch, np.array([3, 2])).tolist() == [True, True]
    before = (store.view("u1", h(40)), store.view("u9", h(40)))
    assert store.apply(batch, np.array([3, 2])).tolist() == [False, False]  # a retry, a replay, a bus copy
    assert store.unapplied(batch).tolist() == [False, False]
    again = served([("u1", "b", 30, True, False, None)] * 2, ids=["x3", "x3"])
    assert store.unapplied(again).tolist() == [True, False]  # a repeat inside one batch is caught too
    after = (store.view("u1", h(40)), store.view("u9", h(40)))
    for old, new in zip(before, after):
        assert (old.impressions, old.clicks, old.history.tolist(), old.seen.tolist()) == \
               (new.impressions, new.clicks, new.history.tolist(), new.seen.tolist())  # fmt: skip
    assert len(store) == 3


def test_evicted_users_are_rebuilt_exactly_from_the_journal(log_dir):
    rows = [(u, item, 30 + i, i % 3 != 0, i % 5 == 0, None)
            for i, (u, item) in enumerate(zip(["u1", "u2", "u3", "u1", "u4"] * 6, "abcdabcdab" * 3))]  # fmt: skip
    item_idx = np.array([ITEMS.ids.index(r[1]) + 2 for r in rows])
    bounded = UserStore.from_log(log_dir, ITEMS, history_len=3, max_seen=3, end=h(24), max_live_users=1)
    unbounded = UserStore.from_log(log_dir, ITEMS, history_len=3, max_seen=3, end=h(24))
    for i in range(0, len(rows), 4):  # several POSTs: users leave and come back to the overlay
        part = served(rows[i : i + 4], ids=[f"e{j}" for j in range(i, min(i + 4, len(rows)))])
        bounded.apply(part, item_idx[i : i + 4])
        unbounded.apply(part, item_idx[i : i + 4])
    assert bounded.stats()["live_users"] == 1 and bounded.rebuilt > 0
    for user in ("u1", "u2", "u3", "u4", "u9"):
        a, b = bounded.view(user, h(100)), unbounded.view(user, h(100))
        assert (a.impressions, a.clicks, a.history.tolist(), a.seen.tolist(), a.cats, a.stored) == \
               (b.impressions, b.clicks, b.history.tolist(), b.seen.tolist(), b.cats, b.stored), user  # fmt: skip
    assert len(bounded) == len(unbounded) == 4 and bounded.stats()["live_users"] == 1  # views rebuild, within the bound
    replay = served(rows[:4], ids=["e0", "e1", "e2", "e3"])  # evicted users still refuse their old ids
    assert not bounded.apply(replay, item_idx[:4]).any()
    with pytest.raises(ValueError, match="max_live_users"):
        UserStore(ITEMS, 3, 3, max_live_users=0)


def test_the_serving_log_is_a_canonical_log_with_event_ids(tmp_path):
    sink = EventSink(EventLogConfig(dir=str(tmp_path)))
    sink.write(served([("u1", "a", 1, True, False, "DE"), ("u2", "b", 2, False, False, None)], ids=["k1", "k2"]))
    sink.close()
    canonical = read_events(tmp_path)
    assert canonical.schema.names == EVENT_SCHEMA.names and validate(canonical).ok  # what `feedrank validate` reads
    (path,) = (tmp_path / "events").glob("date=*/part-*.parquet")
    assert read_log_file(path)[EVENT_ID].to_pylist() == ["k1", "k2"]
    legacy = tmp_path / "legacy.parquet"  # written before events had ids
    pq.write_table(events([("u3", "c", 3, False, False, None)] * 2), legacy)
    assert read_log_file(legacy)[EVENT_ID].to_pylist() == ["legacy.parquet#0", "legacy.parquet#1"]


def test_stale_temp_files_are_removed_and_live_or_new_ones_kept(tmp_path):
    day = tmp_path / "events" / "date=2024-01-01"
    day.mkdir(parents=True)
    stale, locked, fresh = (day / f".part-{n}.parquet.abc.tmp" for n in ("stale", "locked", "fresh"))
    other = day / ".unrelated.tmp"
    for path in (stale, locked, other):
        path.write_bytes(b"half a file")
        os.utime(path, (time.time() - 60, time.time() - 60))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer in another process
    try:
        fresh.write_bytes(b"being written")
        os.utime(fresh, (time.time() + 60, time.time() + 60))  # newer than the sink below: not touched either
        sink = EventSink(EventLogConfig(dir=str(tmp_path)))
        assert sink.stale_removed == 1 and not stale.exists()
        assert locked.exists() and other.exists()
        assert remove_stale_temp_files(tmp_path, older_than=time.time() + 120) == 1 and not fresh.exists()
    finally:
        os.close(fd)
    sink.close()


def test_follower_reads_each_new_file_once_and_skips_marked_ones(tmp_path):
    follower = LogFollower(tmp_path)
    assert follower.poll() is None  # no log yet
    mine = EventSink(EventLogConfig(dir=str(tmp_path)), on_written=follower.mark)
    theirs = EventSink(EventLogConfig(dir=str(tmp_path)))
    mine.write(served([("u1", "a", 1, True, False, None)], ids=["m1"]))
    theirs.write(served([("u2", "b", 2, False, False, None), ("u3", "c", 30, False, False, None)], ids=["t1", "t2"]))
    assert sorted(follower.poll()[EVENT_ID].to_pylist()) == ["t1", "t2"]  # two files, two days; not ours
    assert follower.poll() is None
    theirs.write(served([("u2", "d", 2, True, False, None)], ids=["t3"]))  # same day folder, later
    assert follower.poll()[EVENT_ID].to_pylist() == ["t3"]
    assert (follower.files_read, follower.rows_read) == (3, 3)
    mine.close()
    theirs.close()


def test_follower_skips_a_damaged_file_and_reads_the_rest(tmp_path):
    sink = EventSink(EventLogConfig(dir=str(tmp_path)))
    sink.write(served([("u1", "a", 1, True, False, None)], ids=["good"]))
    (tmp_path / "events" / "date=2024-01-01" / "part-damaged.parquet").write_bytes(b"not parquet")
    follower = LogFollower(tmp_path)
    assert follower.poll()[EVENT_ID].to_pylist() == ["good"]
    assert follower.unreadable == 1 and follower.poll() is None  # logged once, not retried forever
    sink.close()
