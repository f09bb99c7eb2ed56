"""Fault injection on the real server over loopback: are accepted events ever lost from served state?

Scenarios, each under a bounded load (``--clients`` threads, ``--seconds`` of load, at most
``--max-requests`` requests) of ``POST /events`` clicks and ``GET /feed`` calls:

- ``kill9_restart``: one worker; ``kill -9`` the server mid-load, restart it on the same serving log.
- ``redis_killed``: two workers sharing Redis; Redis is SIGKILLed mid-load and restarted (empty).
- ``redis_sigstop``: two workers; Redis is SIGSTOPped mid-load (a hung server), then SIGCONTed.
- ``worker_killed``: two workers; one worker is ``kill -9``ed mid-load (uvicorn starts another).

After each, once the load stopped, it waits (``--settle-s`` at most) until every worker's store
holds every event of the serving log (``/healthz`` ``store.journal_events``: live events applied,
replayed ones included), then prints: requests, transport errors (refused while a process was
down: expected, never a wrong answer), 5xx (must be 0), events accepted (200s), events in the
serving log, and per worker events applied; ``lost`` = accepted events missing from some worker's
store (must be 0). The world is the test suite's tiny one (a simulated log, an untrained
two-tower): the point is the state, not the ranking.

    .venv/bin/python benchmarks/faults.py
    .venv/bin/python benchmarks/faults.py --scenarios kill9_restart redis_sigstop --seconds 4

Needs ``redis-server`` on the PATH for the Redis scenarios. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
import torch

from feedrank.bundle import build_catalogue, build_two_tower, load_bundle, save_bundle
from feedrank.data.log import read_events
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.features.vocab import Vocabularies
from feedrank.serving.app import ServeSettings
from feedrank.serving.demo import ServerProcess, free_port, log_end

TT_CONFIG = {"two_tower": {"dim": 16, "user_id_dim": 8, "item_id_dim": 16, "cat_dim": 4, "freshness_dim": 4,
                           "hidden": [32], "dropout": 0.0, "max_history_len": 20}}  # fmt: skip
SCENARIOS = ("kill9_restart", "redis_killed", "redis_sigstop", "worker_killed")


class Redis:
    """A ``redis-server`` child on a fixed loopback port (restartable on the same port)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.port, self.proc = workdir, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        client, deadline = redis.Redis(port=self.port, socket_timeout=0.5), time.monotonic() + 10
        while True:
            try:
                client.ping()
                return client.close()
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)


class Load:
    """Bounded load from a few threads: clicks of random users on random items, and feeds."""

    def __init__(self, url: str, users: list[str], items: list[str], clients: int, max_requests: int, seed: int) -> None:
        self.url, self.users, self.items, self.clients, self.budget = url, users, items, clients, max_requests
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.errors = self.server_errors = self.accepted = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self.stop.is_set():
                with self.lock:
                    if self.requests >= self.budget:
                        return
                    self.requests += 1
                user = rng.choice(self.users)
                post = rng.random() < 0.5
                try:
                    if post:
                        response = client.post("/events", json={"user_id": user, "item_id": rng.choice(self.items),
                                                                "clicked": True})  # fmt: skip
                    else:
                        response = client.get("/feed", params={"user_id": user, "k": 10})
                except httpx.TransportError:
                    with self.lock:
                        self.errors += 1
                    time.sleep(0.05)  # the server is down: do not spin
                    continue
                with self.lock:
                    self.server_errors += response.status_code >= 500
                    self.accepted += post and response.status_code == 200


def worker_states(url: str, workers: int, deadline: float) -> dict[int, dict]:
    """/healthz of every worker (fresh connections until ``workers`` distinct pids answered)."""
    seen: dict[int, dict] = {}
    while len(seen) < workers and time.monotonic() < deadline:
        try:
            with httpx.Client(timeout=5.0) as client:
                health = client.get(f"{url}/healthz").json()
            seen[health["pid"]] = health
        except httpx.TransportError:
            time.sleep(0.1)
    return seen


def scenario(name: str, args: argparse.Namespace, world: dict, work: Path) -> dict:
    workers = 1 if name == "kill9_restart" else 2
    work.mkdir(parents=True)
    config = work / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  start_time: '{world['start']}'\n"
                      f"  store: {{catch_up_interval_s: {args.catch_up_s}}}\n")  # fmt: skip
    redis_proc = None
    if workers > 1:
        redis_proc = Redis(work)
        redis_proc.start()
    settings = ServeSettings(bundle=world["bundle"], log=world["log"], config=str(config), serving_log=str(work / "serving_log"),
                             redis_url=None if redis_proc is None else redis_proc.url)  # fmt: skip
    server = ServerProcess(settings, work, workers=workers).__enter__()
    try:
        worker_states(server.url, workers, time.monotonic() + 120)
        load = Load(server.url, world["users"], world["items"], args.clients, args.max_requests, args.seed)
        faults: dict[str, Callable[[], None]] = {
            "kill9_restart": server.kill,
            "redis_killed": lambda: redis_proc.kill(),
            "redis_sigstop": lambda: redis_proc.proc.send_signal(signal.SIGSTOP),
            "worker_killed": lambda: os.kill(next(iter(worker_states(server.url, 1, time.monotonic() + 10))), signal.SIGKILL),
        }
        recoveries: dict[str, Callable[[], None]] = {
            "kill9_restart": lambda: server.__enter__(),  # same settings, same serving log
            "redis_killed": lambda: redis_proc.start(),
            "redis_sigstop": lambda: redis_proc.proc.send_signal(signal.SIGCONT),
            "worker_killed": lambda: None,  # uvicorn replaces the worker by itself
        }
        started = time.monotonic()
        load.start()
        time.sleep(args.seconds / 3)
        faults[name]()
        time.sleep(args.seconds / 3)
        recoveries[name]()
        time.sleep(args.seconds / 3)
        load.finish()
        load_s = time.monotonic() - started
        in_log = read_events(work / "serving_log").num_rows
        deadline = time.monotonic() + args.settle_s
        while True:  # every worker catches up within the interval; wait for it, bounded
            states = worker_states(server.url, workers, deadline)
            applied = {pid: s["store"]["journal_events"] for pid, s in states.items()}
            if (len(applied) == workers and min(applied.values()) >= in_log) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        lost = max(0, load.accepted - min(applied.values(), default=0))
        return {"scenario": name, "workers": workers, "load_s": round(load_s, 1), "requests": load.requests,
                "transport_errors": load.errors, "http_5xx": load.server_errors, "events_accepted": load.accepted,
                "events_in_log": in_log, "events_applied_per_worker": sorted(applied.values()), "lost": lost,
                "ok": lost == 0 and load.server_errors == 0 and len(applied) == workers}  # fmt: skip
    finally:
        server.stop()
        if redis_proc is not None:
            redis_proc.kill()


def make_world(root: Path) -> dict:
    simulate(WorldConfig(users=200, items=120, days=3, seed=1), root / "log")
    events = read_events(root / "log")
    vocabs = Vocabularies.build(events)
    torch.manual_seed(0)
    bundle = save_bundle(root / "two_tower", kind="two_tower", model=build_two_tower(TT_CONFIG, vocabs), config=TT_CONFIG,
                         vocabs=vocabs, catalogue=build_catalogue(events, vocabs))  # fmt: skip
    items = [i for i in load_bundle(bundle).catalogue["item_id"].to_pylist() if i is not None]
    users = sorted(set(events["user_id"].to_pylist()))[:50] + [f"bench-new-{i}" for i in range(50)]
    return {"bundle": str(bundle), "log": str(root / "log"), "start": log_end(root / "log").isoformat(), "items": items, "users": users}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seconds", type=float, default=6.0, help="load per scenario: fault at 1/3, recovery at 2/3")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--catch-up-s", type=float, default=0.5)
    parser.add_argument("--settle-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if shutil.which("redis-server") is None and any(s != "kill9_restart" for s in args.scenarios):
        parser.error("redis-server is not on the PATH (apt-get install redis-server); run --scenarios kill9_restart")
    results = []
    with tempfile.TemporaryDirectory(prefix="feedrank-faults-") as tmp:
        world = make_world(Path(tmp) / "world")
        for name in args.scenarios:
            r = scenario(name, args, world, Path(tmp) / name)
            results.append(r)
            print(f"{name:14s} workers={r['workers']} load {r['load_s']:4.1f} s  requests={r['requests']:5d}  "
                  f"transport_errors={r['transport_errors']:4d}  5xx={r['http_5xx']}  accepted={r['events_accepted']:4d}  "
                  f"in_log={r['events_in_log']:4d}  applied/worker={r['events_applied_per_worker']}  lost={r['lost']}  "
                  f"{'OK' if r['ok'] else 'FAIL'}", flush=True)  # fmt: skip
    print(json.dumps({"scenarios": results}))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
