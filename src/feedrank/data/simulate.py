"""Stream a simulated feed log to disk: the embedded default dataset of feedrank.

``simulate(cfg, out_dir)`` draws a ``World``, then for each day draws the requests (heterogeneous
users, a daily traffic curve), lets the ``LoggingPolicy`` fill each feed, lets ``World.respond``
decide the outcomes, and hands the day to ``feedrank.data.log.write_day`` as a generator of
``cfg.chunk_rows``-row tables. Only one chunk (plus the day's request list) is in memory at a time,
so memory is bounded whatever the number of events. Output::

    OUT/events/date=YYYY-MM-DD/part-*.parquet   the canonical log (validated as it is written)
    OUT/items.parquet, OUT/users.parquet        catalogue and user metadata
    OUT/truth/                                  the ground truth (``load_world(OUT)``)
    OUT/summary.json                            ``SimulationSummary``

Random streams are derived from ``cfg.seed`` per purpose and per day, so the output is byte-for-byte
reproducible and a day does not depend on how the previous one was chunked.

Example::

    summary = simulate(WorldConfig(users=1000, items=500, days=2), "runs/sim")
    world = load_world("runs/sim")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from feedrank.data.log import EVENTS_DIR, ITEMS_FILE, USERS_FILE, write_day, write_items, write_users
from feedrank.data.world import LoggingPolicy, World, WorldConfig
from feedrank.data.world.world import TRUTH_DIR, prefixed_ids
from feedrank.progress import progress as progress_bar

SUMMARY_FILE = "summary.json"
_US_PER_DAY = 86_400 * 1_000_000
_US_PER_HOUR = 3_600 * 1_000_000
# Random stream ids (stream 0 draws the world itself, in World.generate).
_POLICY_STREAM = 1
_LOG_STREAM = 2
# Share of a day's requests in each UTC hour: quiet nights, a morning and an evening peak.
_HOURLY_TRAFFIC = np.array(
    [1, 0.6, 0.4, 0.3, 0.4, 0.8, 2, 3.5, 4.5, 4, 3.5, 3.5, 4, 3.5, 3, 3, 3.5, 4.5, 5.5, 6, 5.5, 4.5, 3, 1.8]
)
_HOURLY_TRAFFIC = _HOURLY_TRAFFIC / _HOURLY_TRAFFIC.sum()


@dataclass
class SimulationSummary:
    """Headline numbers of a simulated log. Rates are per impression; dwell is over clicks."""

    users: int
    items: int
    days: int
    requests: int
    events: int
    clicks: int
    ctr: float
    mean_dwell_s: float
    share_rate: float
    hide_rate: float
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "events_per_s": self.events_per_s}


@dataclass
class _Tally:
    """Running totals, filled chunk by chunk as days stream to disk."""

    requests: int = 0
    events: int = 0
    clicks: int = 0
    dwell_s: float = 0.0
    shares: int = 0
    hides: int = 0


def simulate(cfg: WorldConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = False) -> SimulationSummary:
    """Simulate ``cfg`` into ``out_dir`` (see the module docstring); returns the summary.

    A non-empty ``out_dir`` is refused unless ``overwrite``, which replaces only what a simulation
    writes there (events, truth, items, users, summary), never other files.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    _prepare(out, overwrite)
    world = World.generate(cfg)
    world.save(out)
    write_items(out, world.items_table())
    write_users(out, world.users_table())
    policy = LoggingPolicy(world, np.random.default_rng([cfg.seed, _POLICY_STREAM]))

    tally = _Tally()
    days = progress_bar(range(cfg.days), desc="simulate", unit="day", enabled=progress)
    for day in days:
        rng = np.random.default_rng([cfg.seed, _LOG_STREAM, day])
        date = (cfg.start + dt.timedelta(days=day)).date().isoformat()
        write_day(out, date, _day_chunks(world, policy, day, rng, tally))
        days.set_postfix(events=tally.events)

    summary = SimulationSummary(
        users=cfg.users,
        items=cfg.items,
        days=cfg.days,
        requests=tally.requests,
        events=tally.events,
        clicks=tally.clicks,
        ctr=_ratio(tally.clicks, tally.events),
        mean_dwell_s=_ratio(tally.dwell_s, tally.clicks),
        share_rate=_ratio(tally.shares, tally.events),
        hide_rate=_ratio(tally.hides, tally.events),
        seconds=time.perf_counter() - started,
    )
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} is not empty; pass overwrite=True (--overwrite) to replace the simulation in it")
        for name in (EVENTS_DIR, TRUTH_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (ITEMS_FILE, USERS_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _day_chunks(world: World, policy: LoggingPolicy, day: int, rng: np.random.Generator, tally: _Tally) -> Iterator[pa.Table]:
    """One day's events as bounded tables, in time order; updates ``tally`` as chunks are made."""
    c = world.config
    day_start = int(c.start.timestamp()) * 1_000_000 + day * _US_PER_DAY
    policy.start_day(day_start)
    counts = rng.poisson(world.user_activity)
    users = np.repeat(np.arange(world.n_users), counts)
    hours = rng.choice(24, size=len(users), p=_HOURLY_TRAFFIC)
    ts = day_start + hours * _US_PER_HOUR + (rng.random(len(users)) * _US_PER_HOUR).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    users, ts = users[order], ts[order]

    per_chunk = c.chunk_rows // c.feed_size
    for s in range(0, len(users), per_chunk):
        u, t = users[s : s + per_chunk], ts[s : s + per_chunk]
        feed = policy.choose(u, t, rng)
        table = _events(world, u, t, feed, tally.requests, rng)
        tally.requests += len(u)
        tally.events += table.num_rows
        clicked = table["clicked"].to_numpy()
        tally.clicks += int(clicked.sum())
        tally.dwell_s += float(table["dwell_s"].to_numpy().sum(dtype=np.float64))
        tally.shares += int(table["shared"].to_numpy().sum())
        tally.hides += int(table["hidden"].to_numpy().sum())
        yield table


def _events(world: World, users: np.ndarray, ts: np.ndarray, feed: np.ndarray, first_request: int, rng: np.random.Generator) -> pa.Table:
    """Impressions of ``feed`` ([requests, feed_size]) with outcomes and denormalised metadata."""
    n_req, size = feed.shape
    user = np.repeat(users, size)
    item = feed.ravel()
    when = np.repeat(ts, size)
    position = np.tile(np.arange(size, dtype=np.int32), n_req)
    outcomes = world.respond(user, item, position, when, rng)
    request_ids = prefixed_ids("r", np.repeat(np.arange(first_request, first_request + n_req), size))
    return world.impressions_table(user, item, when, position, request_ids, outcomes)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0
