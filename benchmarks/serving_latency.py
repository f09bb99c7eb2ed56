"""End-to-end latency of ``GET /feed`` on a 1M-item catalogue: the real server over loopback.

For each index kind (flat, IVF, HNSW) and each worker count of ``--workers`` this starts ``feedrank
serve`` in a subprocess on a free 127.0.0.1 port (``feedrank.serving.demo.ServerProcess``), then
drives it with a bounded load generator (``http.client``, keep-alive): ``--sequential`` requests one after another, then
``--clients`` concurrent clients for ``--concurrent`` requests in all (or ``--max-seconds``). It
prints p50/p95/p99 per stage (from the ``Server-Timing`` header) and end to end (client-side, so
HTTP and JSON included), QPS, the cache hit ratio and the server's CPU milliseconds per request
(all its processes, from ``/proc``: the figure a busy shared machine distorts least, and the one
that bounds QPS per core), and writes them as JSON with ``--out``.

After the servers it measures, in this process on one thread (as a worker runs), the ranker's
forward on ``--ann + --fresh`` candidates: its FLOPs (``torch.utils.flop_counter``), its bare time,
and a large fp32 matmul's GFLOP/s, the roofline; it prints the GFLOP/s the rank stage achieves
(FLOPs / the server's rank p50) and the bare forward achieves, each as a fraction of that roofline.
The summary prints each run against issue #15's targets as ratios: sequential e2e p99 against 10 ms,
concurrent QPS against 300 and concurrent p99 against 50 ms (the targets are for 2 workers).

The two-tower is a trained one scaled to ``--items`` items and ``--users`` users (``--vectors
trained``, the default): ``--trained-bundle``'s weights (``make demo`` writes ``runs/demo/bundle``),
with each ID-table row a random trained row plus ``--noise`` times that column's spread in
Gaussian noise (``scaled_two_tower``), so the item vectors are clustered as trained ones are and
the printed IVF/HNSW recall is that of a trained distribution. ``--vectors untrained`` builds a
full-size untrained two-tower (dim 64) instead. The ranker (DCN-v2, two-tower inputs) is untrained
but full-size: its 500-candidate pass costs what it would with trained weights. Users with a
history of ``--history`` engagements (seeded from a synthetic canonical log) make up most
requests; ``--cold-share`` are unknown users.

``--connect`` says how the concurrent clients open their connections: ``staggered`` (the default)
as each thread starts, ``burst`` all at once before any request, as a connection pool does. The
concurrent figures include how many clients each worker answered (``clients_per_worker``): where
the connections landed (``burst``: their first answer) and where they stayed (an answer after
their last feed). A keep-alive connection stays with the worker that accepted it unless
``feedrank.serving.balance`` moves it to even the split.

``--profile N`` also runs N feeds in-process under cProfile (after a warm-up) and prints the top
functions by cumulative time: where the milliseconds go.

    .venv/bin/python benchmarks/serving_latency.py                          # ~10 min on 2 cores
    .venv/bin/python benchmarks/serving_latency.py --kinds hnsw --workdir /tmp/serve_bench --profile 300
    .venv/bin/python benchmarks/serving_latency.py --items 100000 --sequential 100 --concurrent 200
    .venv/bin/python benchmarks/serving_latency.py --kinds ivf --workers 1,2 --sequential 200 --concurrent 300   # docs/benchmarks.md

Artifacts (bundles, log, one index per kind) are kept in ``--workdir`` and reused by later runs
(rebuilt when ``--vectors``, the source bundle, ``--noise``, ``--items`` or ``--users`` change).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import http.client
import io
import json
import os
import pstats
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from feedrank.bundle import CATALOGUE_SCHEMA, Bundle, build_two_tower, load_bundle, save_bundle
from feedrank.commands.serve import default_workers
from feedrank.config import to_dict
from feedrank.data.log import write_log
from feedrank.data.schema import TS_TYPE
from feedrank.features.build import ITEM_CAT_INDEX_COLUMNS
from feedrank.features.vocab import FIRST_ID, ITEM_CAT_COLUMNS, OOV, PAD, Vocab, Vocabularies
from feedrank.index import IndexConfig, read_manifest
from feedrank.models.quantize import QUANTIZE_MODES, quantize_ranker
from feedrank.models.ranker import ItemInputs, Ranker, RankerConfig, UserInputs
from feedrank.serving.app import ServeSettings, serving_config
from feedrank.serving.config import EventLogConfig, ServingConfig
from feedrank.serving.demo import ServerProcess
from feedrank.serving.pipeline import FeedService, set_threads

BUDGET_MS = 50.0
TARGET_SEQ_P99_MS, TARGET_QPS, TARGET_CONC_P99_MS = 10.0, 300.0, 50.0  # issue #15's acceptance
START = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)
STAGES = ("user", "ann", "rank", "rerank", "total")
TWO_TOWER = {"dim": 64, "user_id_dim": 32, "item_id_dim": 32, "cat_dim": 16, "freshness_dim": 8, "hidden": [128],
             "dropout": 0.0, "history_encoder": "mean", "max_history_len": 50}  # fmt: skip
RANKER = RankerConfig(dim=16, interaction="dcn", hidden=[256, 128], dropout=0.0, max_history_len=50, two_tower_dim=64)


# ------------------------------------------------------------------------------------------------
# artifacts


def vocabularies(n_items: int, n_users: int, like: Vocabularies | None = None) -> Vocabularies:
    """``n_items`` items and ``n_users`` users; the categoricals of ``like`` (a trained bundle's,
    so its tables fit) or made-up ones."""
    ids = lambda prefix, n: [f"{prefix}{i}" for i in range(n)]  # noqa: E731
    if like is not None:
        return Vocabularies(users=Vocab("user_id", ids("u", n_users)), items=Vocab("item_id", ids("i", n_items)),
                            user_cats=like.user_cats, item_cats=like.item_cats, tokens=like.tokens)  # fmt: skip
    return Vocabularies(
        users=Vocab("user_id", ids("u", n_users)),
        items=Vocab("item_id", ids("i", n_items)),
        user_cats={"age_bucket": Vocab("age_bucket", ids("a", 6)), "country": Vocab("country", ids("c", 30))},
        item_cats={"publisher": Vocab("publisher", ids("p", 2000)), "item_type": Vocab("item_type", ids("t", 3)),
                   "category": Vocab("category", ids("k", 20))},  # fmt: skip
    )


def catalogue(vocabs: Vocabularies, rng: np.random.Generator, cats: dict[str, np.ndarray] | None = None,
              titles: pa.ListArray | None = None) -> pa.Table:  # fmt: skip
    """One row per item index: categoricals ``cats`` (index columns, one value per row) or random
    ones, title tokens ``titles`` (one list per row) or none (ID-only models), creation over the 30
    days before START."""
    n = vocabs.n_items
    real = np.arange(n) >= FIRST_ID
    created = START - dt.timedelta(days=30)
    created_us = int(created.timestamp() * 1e6) + rng.integers(0, 30 * 86_400 * 10**6, n)
    if cats is None:
        cats = {c: np.where(real, rng.integers(FIRST_ID, len(vocabs.item_cats[name]), n), 0)
                for c, name in zip(ITEM_CAT_INDEX_COLUMNS, ITEM_CAT_COLUMNS)}  # fmt: skip
    imps = np.where(real, rng.poisson(50, n), 0)
    return pa.table({
        "item_idx": np.arange(n, dtype=np.int64),
        "item_id": pa.array([None, None, *vocabs.items.ids], pa.string()),
        **{c: v.astype(np.int64) for c, v in cats.items()},
        "created_ts": pa.array(created_us, TS_TYPE, mask=~real),
        "first_seen_ts": pa.array(created_us, TS_TYPE, mask=~real),
        "train_impressions": imps.astype(np.int64),
        "train_clicks": rng.binomial(imps, 0.05).astype(np.int64),
        "title_tokens": titles if titles is not None else pa.ListArray.from_arrays(np.zeros(n + 1, np.int32), pa.array([], pa.int64())),
    }, schema=CATALOGUE_SCHEMA)  # fmt: skip


def sampled_rows(n: int, n_source: int, rng: np.random.Generator) -> np.ndarray:
    """[n] source index of each index: PAD and OOV keep their own, every real index a random real one."""
    return np.concatenate([[PAD, OOV], rng.integers(FIRST_ID, n_source, n - FIRST_ID)])


def scaled_two_tower(source: Bundle, vocabs: Vocabularies, items: np.ndarray, users: np.ndarray, noise: float,
                     rng: np.random.Generator) -> torch.nn.Module:  # fmt: skip
    """``source``'s trained two-tower at the sizes of ``vocabs``: every weight copied; the item and
    user ID tables (the only ones whose size differs) take, for index ``j``, the trained row
    ``items[j]`` / ``users[j]`` plus Gaussian noise of ``noise`` times that column's spread over
    the trained rows, so the 1M item vectors are as clustered as trained ones (a trained item's
    copies are near it, not equal), and the index and the history lookups do real work."""
    model = build_two_tower(source.config, vocabs)
    trained = source.model.state_dict()
    n_items, n_users = source.vocabs.n_items, source.vocabs.n_users
    state = {}
    for name, value in model.state_dict().items():
        have = trained[name]
        if have.shape == value.shape:
            state[name] = have
            continue
        if have.dim() != 2 or have.shape[0] not in (n_items, n_users) or have.shape[1] != value.shape[1]:
            raise ValueError(f"{name}: cannot scale {tuple(have.shape)} to {tuple(value.shape)}")
        rows = items if have.shape[0] == n_items else users
        spread = have[FIRST_ID:].std(dim=0, keepdim=True)
        jitter = torch.from_numpy(rng.standard_normal(tuple(value.shape)).astype(np.float32)) * spread * noise
        jitter[:FIRST_ID] = 0.0
        state[name] = have[torch.from_numpy(rows)] + jitter
    model.load_state_dict(state)
    return model


def history_log(vocabs: Vocabularies, cat: pa.Table, n_users: int, per_user: int, rng: np.random.Generator) -> pa.Table:
    """``per_user`` clicks for each of the first ``n_users`` users, in the day before START, on items
    created before that day (so the log passes the schema's no-time-travel rule)."""
    day_before = int((START - dt.timedelta(days=1)).timestamp() * 1e6)
    created = cat["created_ts"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    eligible = np.flatnonzero(np.nan_to_num(created, nan=np.inf) < day_before)
    eligible = eligible[eligible >= FIRST_ID]
    rows = n_users * per_user
    items = rng.choice(eligible, rows)
    users = np.repeat(np.arange(n_users), per_user)
    ts = day_before + np.sort(rng.integers(0, 86_400 * 10**6 - 10**6, rows))
    names = lambda vocab, idx: np.array(vocab.ids, dtype=object)[idx - FIRST_ID]  # noqa: E731
    return pa.table({
        "user_id": names(vocabs.users, users + FIRST_ID), "item_id": names(vocabs.items, items),
        "ts": pa.array(ts, TS_TYPE), "request_id": [f"r{i}" for i in range(rows)],
        "clicked": np.ones(rows, bool), "dwell_s": np.full(rows, 30.0, np.float32),
        "publisher": names(vocabs.item_cats["publisher"], cat["publisher_idx"].to_numpy()[items]),
        "created_ts": cat["created_ts"].take(pa.array(items)),
        "country": names(vocabs.user_cats["country"], FIRST_ID + users % len(vocabs.user_cats["country"].ids)),
    })  # fmt: skip


def make_artifacts(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(two-tower bundle, ranker bundle, log): built once per workdir and vector mode, then reused."""
    tt_dir, rk_dir, log_dir = work / "two_tower", work / "ranker", work / "log"
    source = load_bundle(args.trained_bundle) if args.vectors == "trained" else None
    made_from = {"vectors": args.vectors, "source": source.version if source else None, "noise": args.noise,
                 "items": args.items, "users": args.users}  # fmt: skip
    stamp = work / "artifacts.json"
    if tt_dir.is_dir() and rk_dir.is_dir() and log_dir.is_dir() and stamp.exists() and json.loads(stamp.read_text()) == made_from:
        return tt_dir, rk_dir, log_dir
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vocabs = vocabularies(args.items, args.users, like=source.vocabs if source else None)
    if source is None:
        config, cat = {"two_tower": TWO_TOWER}, catalogue(vocabs, rng)
        two_tower = build_two_tower(config, vocabs)
    else:
        config = {"two_tower": source.config["two_tower"]}
        items = sampled_rows(vocabs.n_items, source.vocabs.n_items, rng)
        users = sampled_rows(vocabs.n_users, source.vocabs.n_users, rng)
        cat = catalogue(vocabs, rng, {c: source.catalogue[c].to_numpy()[items] for c in ITEM_CAT_INDEX_COLUMNS},
                        source.catalogue["title_tokens"].combine_chunks().take(items))  # a copy keeps its source's title
        two_tower = scaled_two_tower(source, vocabs, items, users, args.noise, rng)
    save_bundle(tt_dir, kind="two_tower", model=two_tower, config=config, vocabs=vocabs, catalogue=cat)
    ranker_cfg = dataclasses.replace(RANKER, two_tower_dim=two_tower.cfg.dim)
    ranker = Ranker(ranker_cfg, vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes, 2, 3)
    save_bundle(rk_dir, kind="ranker", model=ranker, config={"ranker": to_dict(ranker_cfg)}, vocabs=vocabs, catalogue=cat)
    shutil.rmtree(log_dir, ignore_errors=True)
    result = write_log(log_dir, history_log(vocabs, cat, args.history_users, args.history + 10, rng))
    if not result.ok:
        raise RuntimeError(f"synthetic log refused: {result.refused}")
    for index_dir in work.glob("index-*"):  # built for other vectors
        shutil.rmtree(index_dir)
    stamp.write_text(json.dumps(made_from))
    print(f"artifacts ({args.vectors} vectors): {args.items:,} items, {args.users:,} users, {result.rows:,} log rows "
          f"in {time.perf_counter() - t0:.0f} s")
    return tt_dir, rk_dir, log_dir


def serving_cfg(work: Path, kind: str, args: argparse.Namespace) -> ServingConfig:
    return ServingConfig(
        ann_candidates=args.ann, fresh_candidates=args.fresh, k_default=args.k, history_len=args.history,
        # the recall is measured and printed; the gate must not stop the index from being saved and
        # reused (untrained towers make unclustered vectors on which IVF/HNSW recall is low)
        start_time=START.isoformat(), index=IndexConfig(kind=kind, recall_floor=0.0), index_dir=str(work / f"index-{kind}"),
        event_log=EventLogConfig(dir=str(work / "serving_log")), quantize=args.quantize,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# load generation


_TIMING = re.compile(r"(\w+);dur=([0-9.]+)")


class Client:
    """One keep-alive HTTP/1.1 connection over the standard library's ``http.client``.

    The load generator shares the server's cores, so its own CPU counts against the server's:
    httpx spent 0.51 ms of CPU a request and this 0.14 ms, measured in one run against the same
    server (docs/benchmarks.md). Each request still sends, receives and parses all of a real
    HTTP exchange and the JSON body.
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)

    def get(self, path: str, params: dict | None = None) -> tuple[int, str, bytes]:
        """(status, Server-Timing header, body) of ``GET path?params``."""
        target = f"{path}?{urllib.parse.urlencode(params)}" if params else path
        for attempt in (0, 1):
            try:
                self.conn.request("GET", target)
                response = self.conn.getresponse()
                return response.status, response.getheader("server-timing", ""), response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()  # the server closed an idle keep-alive connection: reconnect once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


class Recorder:
    """Per-request figures: client end-to-end ms, server stage ms, path; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.e2e: list[float] = []
        self.stages: dict[str, list[float]] = {s: [] for s in STAGES}
        self.paths: list[str] = []
        self.errors = 0

    def get(self, client: Client, user: str, k: int) -> None:
        start = time.perf_counter()
        status, timing, body = client.get("/feed", {"user_id": user, "k": k})
        path = json.loads(body)["path"] if status == 200 else None
        ms = (time.perf_counter() - start) * 1000.0
        with self.lock:
            if status != 200:
                self.errors += 1
                return
            self.e2e.append(ms)
            for stage, dur in _TIMING.findall(timing):
                self.stages[stage].append(float(dur))
            self.paths.append(path)

    def summary(self, seconds: float) -> dict:
        pct = lambda xs: {f"p{q}": float(np.percentile(xs, q)) for q in (50, 95, 99)} if xs else {}  # noqa: E731
        return {"requests": len(self.e2e), "errors": self.errors, "qps": len(self.e2e) / seconds,
                "e2e_ms": pct(self.e2e), "stage_ms": {s: pct(v) for s, v in self.stages.items()},
                "paths": {p: self.paths.count(p) for p in sorted(set(self.paths))}}  # fmt: skip


def users_for(n: int, args: argparse.Namespace, rng: np.random.Generator) -> list[str]:
    """Request users: known users with a history, and a share of never-seen ones (cold start)."""
    warm = rng.integers(0, args.history_users, n)
    cold = rng.random(n) < args.cold_share
    return [f"new{i}" if c else f"u{w}" for i, (w, c) in enumerate(zip(warm, cold))]


def worker_pid(client: Client) -> int:
    """The pid of the worker that answers ``client``'s connection (``/healthz``)."""
    return json.loads(client.get("/healthz")[2])["pid"]


def split(pids: list[int]) -> list[int]:
    """How many of ``pids`` each worker has, largest first ([] when none were recorded)."""
    return sorted(Counter(pids).values(), reverse=True)


def cache_ratio(client: Client) -> float:
    """Hits / lookups since the server started, from ``feedrank_cache_lookups_total{outcome}``."""
    text = client.get("/metrics")[2].decode()
    counts = {m.group(1): float(m.group(2)) for m in re.finditer(r'^feedrank_cache_lookups_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}
    total = sum(counts.values())
    return counts.get("hit", 0.0) / total if total else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and of its live children (uvicorn's workers)."""
    tick = os.sysconf("SC_CLK_TCK")

    def own(stat: str) -> float:
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if int(proc.name) == pid or int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            total += own(stat)
    return total


def drive(url: str, pid: int, args: argparse.Namespace, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    with Client(url) as client:
        for user in users_for(20, args, rng):  # warm-up: first-call allocations, thread pool
            client.get("/feed", {"user_id": user, "k": args.k})
        seq = Recorder()
        start, cpu = time.perf_counter(), cpu_seconds(pid)
        for user in users_for(args.sequential, args, rng):
            seq.get(client, user, args.k)
        out["sequential"] = seq.summary(time.perf_counter() - start)
        out["sequential"]["server_cpu_ms"] = (cpu_seconds(pid) - cpu) * 1000.0 / max(1, args.sequential)
        out["sequential"]["cache_hit_ratio"] = cache_ratio(client)

    conc = Recorder()
    queue = users_for(args.concurrent, args, rng)
    lock, deadline = threading.Lock(), time.monotonic() + args.max_seconds
    opened = threading.Barrier(args.clients)
    landed: list[int] = []  # burst: the worker each connection landed on (its first answer)
    stayed: list[int] = []  # the worker each connection ended on (an answer after its last feed)
    finished: list[float] = []

    def worker() -> None:
        with Client(url) as client:
            if args.connect == "burst":
                opened.wait()
                client.conn.connect()
                landed.append(worker_pid(client))
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        break
                    user = queue.pop()
                conc.get(client, user, args.k)
            finished.append(time.perf_counter())
            stayed.append(worker_pid(client))

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    start, cpu = time.perf_counter(), cpu_seconds(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = conc.summary(max(finished) - start)
    out["concurrent"]["clients_per_worker"] = {"connect": args.connect, "landed": split(landed), "stayed": split(stayed)}
    out["concurrent"]["server_cpu_ms"] = (cpu_seconds(pid) - cpu) * 1000.0 / max(1, len(conc.e2e) + conc.errors)
    with Client(url) as client:
        out["concurrent"]["cache_hit_ratio"] = cache_ratio(client)
    return out


def profile(tt: Path, rk: Path, log: Path, cfg: ServingConfig, args: argparse.Namespace) -> str:
    """cProfile of ``args.profile`` in-process feeds: the top functions by cumulative time."""
    set_threads(cfg.torch_threads)  # as the server's build_service does
    service = FeedService(load_bundle(tt), cfg, ranker=load_bundle(rk), log_dir=log)
    users = users_for(args.profile + 20, args, np.random.default_rng(7))
    for user in users[:20]:
        service.feed(user, args.k)
    profiler = cProfile.Profile()
    profiler.enable()
    for user in users[20:]:
        service.feed(user, args.k)
    profiler.disable()
    service.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def timed_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls, after a warm-up."""
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0


def ranker_roofline(rk: Path, n: int, reps: int, quantize: str) -> dict:
    """The ranker's forward on ``n`` candidates of one user, on one thread: FLOPs (of the fp32 model),
    bare median time of the model as served (``quantize``: ``serving.quantize``), and the median
    GFLOP/s of a large fp32 matmul (the roofline) measured now, on the same thread."""
    set_threads(1)
    model = load_bundle(rk).model.eval()
    served = quantize_ranker(model, quantize)
    g = torch.Generator().manual_seed(0)
    sizes = lambda vocab_sizes: torch.tensor(vocab_sizes)  # noqa: E731
    user = UserInputs(user=torch.tensor(2), user_cats=torch.full((len(model.user_cats.sizes),), 2),
                      history=torch.randint(2, model.n_items, (model.cfg.max_history_len,), generator=g),
                      counters=torch.rand(model.n_user_counters, generator=g),
                      vector=torch.randn(model.cfg.two_tower_dim, generator=g) if model.cfg.two_tower_dim else None)  # fmt: skip
    items = ItemInputs(item=torch.randint(2, model.n_items, (n,), generator=g),
                       item_cats=(torch.rand(n, len(model.item_cats.sizes), generator=g) * (sizes(model.item_cats.sizes) - 2)).long() + 2,
                       item_age_h=torch.rand(n, generator=g) * 100, counters=torch.rand(n, model.n_item_counters, generator=g),
                       vectors=torch.randn(n, model.cfg.two_tower_dim, generator=g) if model.cfg.two_tower_dim else None)  # fmt: skip
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.score_candidates(user, items)
        forward_ms = timed_ms(lambda: served.score_candidates(user, items), reps)
        a, b = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        matmul_ms = timed_ms(lambda: a @ b, reps)
    return {"candidates": n, "mflop": counter.get_total_flops() / 1e6, "forward_ms": forward_ms,
            "roofline_gflops": 2 * 512 * 1024 * 1024 / matmul_ms / 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--history-users", type=int, default=2000, help="users with a seeded history")
    parser.add_argument("--vectors", choices=("trained", "untrained"), default="trained",
                        help="trained: --trained-bundle's two-tower scaled to --items (default); untrained: random weights")
    parser.add_argument("--trained-bundle", type=Path, default=Path("runs/demo/bundle"),
                        help="a trained two-tower bundle (make demo writes runs/demo/bundle)")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="trained: each scaled ID row is a trained row plus this times the column's spread in noise")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--ann", type=int, default=400)
    parser.add_argument("--fresh", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--workers", default=str(default_workers()),
                        help="comma-separated worker counts, one server each (default: feedrank serve's default)")
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=800)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--connect", choices=("staggered", "burst"), default="staggered",
                        help="concurrent clients open their connections as each starts, or all at once (a pool)")
    parser.add_argument("--cold-share", type=float, default=0.05)
    parser.add_argument("--profile", type=int, default=0, help="feeds to profile in-process (0: skip)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                        help="serving.quantize: the ranker as served (int8: docs/labs.md's quantize lab; default fp32)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="feedrank-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.vectors == "trained" and not (args.trained_bundle / "bundle.json").exists():
        parser.error(f"--trained-bundle {args.trained_bundle}: no bundle there; run `make demo` (it writes runs/demo/bundle), "
                     "pass another trained two-tower bundle, or --vectors untrained")
    tt, rk, log = make_artifacts(work, args)
    load_before = os.getloadavg()
    results = {"quantize": args.quantize, "items": args.items, "history": args.history, "candidates": args.ann + args.fresh, "vectors": args.vectors, "runs": {}}
    worker_counts = [int(w) for w in args.workers.split(",")]
    for kind in args.kinds.split(","):
        cfg = serving_cfg(work, kind, args)
        config_path = work / f"serving-{kind}.yaml"
        config_path.write_text(yaml.safe_dump({"serving": to_dict(cfg)}, sort_keys=False))
        settings = ServeSettings(bundle=str(tt), ranker=str(rk), log=str(log), config=str(config_path))
        serving_config(settings)
        for workers in worker_counts:
            start = time.perf_counter()
            with ServerProcess(settings, work, startup_timeout_s=900, workers=workers) as server:
                startup_s = time.perf_counter() - start
                with Client(server.url) as client:
                    health = json.loads(client.get("/healthz")[2])
                figures = drive(server.url, server.proc.pid, args, seed=1)
            recall = read_manifest(work / f"index-{kind}").recall
            name = f"{kind}, {workers} worker{'s' if workers > 1 else ''}"
            results["runs"][name] = {"kind": kind, "workers": workers, "startup_s": startup_s,
                                     "index": {**health["index"], "recall": recall}, **figures}  # fmt: skip
            report(name, results["runs"][name], args.vectors)
        if args.profile:
            print(profile(tt, rk, log, cfg, args))
    roof = results["ranker"] = ranker_roofline(rk, args.ann + args.fresh, reps=100, quantize=args.quantize)
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"\nranker (served as quantize={args.quantize}) forward on {roof['candidates']} candidates: {roof['mflop']:.1f} MFLOP; matmul roofline (one thread, "
          f"512x1024 @ 1024x1024, median) {roof['roofline_gflops']:.1f} GFLOP/s")
    print(f"  bare score_candidates p50 {roof['forward_ms']:.2f} ms = {roof['mflop'] / roof['forward_ms']:.1f} GFLOP/s "
          f"({roof['mflop'] / roof['forward_ms'] / roof['roofline_gflops']:.0%} of the roofline)")
    for name, r in results["runs"].items():
        rank_ms = r["sequential"]["stage_ms"]["rank"]["p50"]
        gflops = roof["mflop"] / rank_ms
        print(f"  {name}: rank stage p50 {rank_ms:.2f} ms = {gflops:.1f} GFLOP/s ({gflops / roof['roofline_gflops']:.0%} "
              f"of the roofline), {rank_ms / roof['forward_ms']:.2f}x the bare forward")
    print(f"\nsummary (ms; load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; targets: sequential e2e "
          f"p99 {TARGET_SEQ_P99_MS:g} ms, {args.clients} clients {TARGET_QPS:g} QPS at p99 {TARGET_CONC_P99_MS:g} ms)")
    for name, r in results["runs"].items():
        seq, conc = r["sequential"], r["concurrent"]
        p99 = seq["e2e_ms"]["p99"]
        print(f"  {name:18s} seq p50 {seq['e2e_ms']['p50']:6.1f}  p99 {p99:6.1f} ({p99 / TARGET_SEQ_P99_MS:.2f}x target, "
              f"{p99 / BUDGET_MS:.0%} of the 50 ms budget), server CPU {seq['server_cpu_ms']:.1f} ms/feed"
              f"  | {args.clients} clients p99 {conc['e2e_ms']['p99']:6.1f} ({conc['e2e_ms']['p99'] / TARGET_CONC_P99_MS:.2f}x)"
              f"  QPS {conc['qps']:6.1f} ({conc['qps'] / TARGET_QPS:.2f}x)  errors {conc['errors']}"
              f"  server CPU {conc['server_cpu_ms']:.1f} ms/feed")


def report(name: str, r: dict, vectors: str) -> None:
    print(f"\n=== {name}: index {r['index']['size']:,} items ({r['index']['origin']}, recall@100 {r['index']['recall']:.3f} "
          f"on these {vectors} vectors), server startup {r['startup_s']:.0f} s")
    for phase in ("sequential", "concurrent"):
        s = r[phase]
        print(f"  {phase}: {s['requests']} requests, {s['errors']} errors, {s['qps']:.1f} QPS, "
              f"cache hit ratio {s['cache_hit_ratio']:.2f}, server CPU {s['server_cpu_ms']:.2f} ms/request, paths {s['paths']}")
        if "clients_per_worker" in s:
            w = s["clients_per_worker"]
            print(f"    clients per worker ({w['connect']} connect): landed {w['landed'] or '-'}, stayed {w['stayed']}")
        print(f"    {'stage':8s} {'p50':>8s} {'p95':>8s} {'p99':>8s}")
        for stage in STAGES:
            q = s["stage_ms"][stage]
            print(f"    {stage:8s} {q['p50']:8.2f} {q['p95']:8.2f} {q['p99']:8.2f}")
        q = s["e2e_ms"]
        print(f"    {'e2e':8s} {q['p50']:8.2f} {q['p95']:8.2f} {q['p99']:8.2f}   (client side: HTTP + JSON included)")


if __name__ == "__main__":
    main()
