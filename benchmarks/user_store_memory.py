"""Memory of the serving user store as live events bring new users (issue 10: 100 POSTs of 1,000 new
users each used to add ~77 MB, without bound).

Feeds ``UserStore.apply`` batches of ``--batch`` events, one event per new user, up to ``--users``
distinct users, and reads this process's resident set (``/proc/self/statm``) before and after.
Runs twice, each in its own child process (so one run's freed memory cannot flatter the other):
``bounded`` with the default ``store.max_live_users`` (an LRU of live records over the compact
journal), and ``unbounded`` with ``max_live_users`` above ``--users`` (every record kept: the old
behaviour, for comparison). After the bounded run it also checks that an evicted user's view is
rebuilt with their event.

    .venv/bin/python benchmarks/user_store_memory.py                  # 1M users
    .venv/bin/python benchmarks/user_store_memory.py --users 100000

Prints per run: RSS before/after (MiB), bytes per user, the journal's own bytes, live records,
seconds and events/s; then one JSON line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(users: int, batch: int, max_live: int) -> dict:
    from feedrank.data.schema import EVENT_SCHEMA, TS_TYPE, conform
    from feedrank.features.vocab import Vocab
    from feedrank.serving.state import EVENT_ID, SERVING_LOG_SCHEMA, UserStore

    n_items = 10_000
    items = Vocab("item_id", [f"i{i}" for i in range(n_items)])
    store = UserStore(items, history_len=50, max_seen=2000, max_live_users=max_live)
    rng = np.random.default_rng(0)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)

    def events(start: int, n: int) -> tuple[pa.Table, np.ndarray]:
        item = rng.integers(0, n_items, n)
        table = conform(pa.table({
            "user_id": [f"new-user-{u}" for u in range(start, start + n)],
            "item_id": [f"i{i}" for i in item],
            "ts": pa.array([t0 + dt.timedelta(seconds=u) for u in range(start, start + n)], TS_TYPE),
            "request_id": [f"r{start}"] * n,
            "clicked": (item % 3 == 0).tolist(),
        })).cast(EVENT_SCHEMA)  # fmt: skip
        ids = pa.array([f"e{u}" for u in range(start, start + n)], pa.string())
        return table.append_column(SERVING_LOG_SCHEMA.field(EVENT_ID), ids), item + 2

    batches = [events(start, min(batch, users - start)) for start in range(0, users, batch)]  # built before measuring
    before = rss_bytes()
    started = time.perf_counter()
    for table, idx in batches:
        store.apply(table, idx)
    seconds = time.perf_counter() - started
    after = rss_bytes()
    stats = store.stats()
    first = store.view("new-user-0", t0 + dt.timedelta(days=365))  # evicted in the bounded run: rebuilt
    assert first.stored and first.impressions == 1 and len(first.seen) == 1, first
    return {"max_live_users": max_live, "users": len(store), "rss_before_mib": round(before / 2**20, 1),
            "rss_after_mib": round(after / 2**20, 1), "bytes_per_user": round((after - before) / users, 1),
            "journal_bytes_per_user": round(stats["journal_bytes"] / users, 1), "live_records": stats["live_users"],
            "seconds": round(seconds, 2), "events_per_s": round(users / seconds)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max-live-users", type=int, default=None, help="one run with this bound (child mode)")
    args = parser.parse_args()
    if args.max_live_users is not None:
        print(json.dumps(run(args.users, args.batch, args.max_live_users)))
        return 0
    from feedrank.serving.config import StoreConfig

    results = {}
    for name, bound in (("bounded", StoreConfig().max_live_users), ("unbounded", args.users + 1)):
        proc = subprocess.run([sys.executable, __file__, "--users", str(args.users), "--batch", str(args.batch),
                               "--max-live-users", str(bound)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return proc.returncode
        results[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:9s} max_live_users={r['max_live_users']:>9,}  RSS {r['rss_before_mib']:7.1f} -> {r['rss_after_mib']:7.1f} MiB"
              f"  {r['bytes_per_user']:7.1f} B/user (journal {r['journal_bytes_per_user']:.1f})"
              f"  live records {r['live_records']:,}  {r['seconds']:.1f} s  {r['events_per_s']:,} events/s")  # fmt: skip
    print(json.dumps({"users": args.users, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
