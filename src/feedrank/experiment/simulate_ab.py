"""A simulated A/B test: real serving pipelines, synthetic users, the production analysis.

The synthetic world (``feedrank.data.world``) knows how every user reacts to every impression, so
it can stand in for production traffic: each arm is a real ``FeedService`` (two-tower bundle,
optional ranker bundle), and the world's response model plays the users. An arm may also be the
``OracleService`` ("oracle", or "oracle:<noise>"): it ranks by the world's true click probability,
the ceiling for any model, or with noise a model of known, tunable quality.

``simulate_ab(world_dir, arms, cfg)`` runs one experiment, as production would:

1. **population**: the world's users, or a seeded sample of ``cfg.users`` of them;
2. **assignment**: ``feedrank.experiment.assignment.assign`` with ``cfg.salt`` and ``cfg.weights``,
   the same salted hash serving uses, so ``feedrank experiment analyze --salt`` re-derives it;
3. **traffic**: ``cfg.days`` days from ``cfg.start`` (default: the end of the world's log). A
   user makes Poisson(rate) requests a day, ``rate`` being the world's per-user activity (or
   ``cfg.requests_per_user_day`` for everyone), at uniform times; all requests run in time order;
4. **serving**: each request goes to its arm's ``FeedService.feed(user_id, k)``, whose clock is
   set to the request's time (item ages, "history strictly before now" and event times stay on
   simulated time);
5. **users**: ``World.respond`` draws clicks, dwell, shares and hides at the served positions and
   time; the outcomes go back through ``FeedService.record_events``, so histories, seen items and
   cached user vectors evolve within the experiment as they would in production;
6. **log**: the impressions as canonical rows (``OUT/events/``, request ids ``<arm>-<n>``), beside
   ``OUT/assignment.parquet`` (``user_id, arm`` of every user in the population) and each bundle
   arm's own serving log (``OUT/serving/<arm>/``, written by ``record_events``: the same rows);
7. **analysis**: the per-user table is built from that log (``user_metrics``; with ``cfg.cuped``
   the world's own log is the CUPED pre-period) and ``analyze`` gives lifts, CIs, p-values,
   guardrails (hide rate, publisher concentration) and the SRM check.

Everything is deterministic from ``cfg.seed``: one random stream per purpose (population,
traffic, each arm's outcomes), so an arm's outcomes do not depend on the other arm's traffic.

**Replicates** (the false-positive-rate and power checks): one experiment serves each request
once, so many experiments would cost many full serving runs. ``serve_population`` instead serves
*every* request of the population through *each* distinct arm model once (with feedback, as if
everyone were in that arm), and ``replicate_users`` then runs a cheap experiment on those feeds:
a new salt (and optionally a new sample of users) decides who is in which arm, and the world
redraws every outcome. The assumption, stated: **within a replicate the feeds are those served
under the serving pass's outcomes, so feedback effects of the replicate's own outcome draws on
later feeds are ignored**; between-arm differences in the feeds themselves (including how each
model reacted to its history) are kept. ``true_ctr`` gives the expected CTR of served feeds from
the world's click probabilities: the effect a powered test should find.

Example::

    arms = {"control": ("runs/a/bundle", None), "treatment": ("runs/b/bundle", "runs/b/ranker")}
    result = simulate_ab("runs/world_demo", arms, ABSimConfig(users=2000, days=2, salt="exp-1"))
    print(result.render_text())
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrank.bundle import Bundle, load_bundle
from feedrank.config import to_dict
from feedrank.data.log import EVENTS_DIR, read_events, write_log
from feedrank.data.schema import to_epoch_us
from feedrank.data.world import Outcomes, World, load_world
from feedrank.data.world.world import prefixed_ids
from feedrank.experiment.analyze import Analysis, analyze
from feedrank.experiment.assignment import assign, assign_index, normalise_weights
from feedrank.experiment.metrics import DEFAULT_GUARDRAILS, Guardrail, get_metric, user_metrics
from feedrank.experiment.params import check_open_unit
from feedrank.index import IndexConfig
from feedrank.progress import progress as progress_bar
from feedrank.serving.config import EventLogConfig, ServingConfig, parse_start_time
from feedrank.serving.pipeline import FeedItem, FeedResponse, FeedService
from feedrank.serving.state import EventIn

ASSIGNMENT_FILE = "assignment.parquet"
RESULT_FILE = "result.json"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US_PER_DAY = 86_400 * 1_000_000
# Random stream ids under cfg.seed, one per purpose.
_POPULATION_STREAM, _TRAFFIC_STREAM, _OUTCOME_STREAM, _ORACLE_STREAM = 0, 1, 2, 3
# Columns of the canonical log the per-user table needs.
_METRIC_COLUMNS = ["user_id", "clicked", "dwell_s", "hidden", "publisher"]

BundleRef = Bundle | str | Path
#: An arm: its two-tower bundle and optional ranker bundle (loaded ``Bundle`` or path).
ArmSpec = tuple[BundleRef, BundleRef | None]


def _flat_index() -> ServingConfig:
    # Synthetic catalogues are small: exact search keeps ANN recall noise out of the comparison.
    return ServingConfig(index=IndexConfig(kind="flat"))


@dataclass
class ABSimConfig:
    """A simulated A/B test (YAML section ``ab``); see the module docstring.

    ``users`` None: every user of the world. ``k`` None: the world's ``feed_size``.
    ``requests_per_user_day`` None: each user's own activity rate from the world. ``start`` None:
    the end of the world's log window. ``max_requests`` bounds a run (heavy-tailed activity and a
    large world multiply quickly; at ~5 ms a request, 100k requests are minutes). The serving
    settings are the service's own (``ServingConfig``); its ``event_log`` is replaced by the
    experiment's output folder.
    """

    users: int | None = None
    days: int = 1
    k: int | None = None
    requests_per_user_day: float | None = None
    start: str | None = None
    salt: str = "ab-sim"
    weights: list[float] | None = None
    seed: int = 0
    metrics: list[str] = field(default_factory=lambda: ["ctr", "time_spent"])
    alpha: float = 0.05
    cuped: bool = True
    guardrails: list[Guardrail] = field(default_factory=lambda: list(DEFAULT_GUARDRAILS))
    max_requests: int = 200_000
    serving: ServingConfig = field(default_factory=_flat_index)

    def validate(self) -> None:
        if self.users is not None and self.users < 1:
            raise ValueError(f"users must be >= 1 or null (all), got {self.users}")
        if self.days < 1:
            raise ValueError(f"days must be >= 1, got {self.days}")
        if self.k is not None and not 1 <= self.k <= self.serving.k_max:
            raise ValueError(f"k must be in [1, serving.k_max={self.serving.k_max}], got {self.k}")
        if self.requests_per_user_day is not None and not (
            np.isfinite(self.requests_per_user_day) and self.requests_per_user_day > 0
        ):
            raise ValueError(f"requests_per_user_day must be > 0 or null, got {self.requests_per_user_day}")
        if self.start is not None:
            parse_start_time(self.start)
        if not self.salt:
            raise ValueError("salt must be a non-empty string")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.metrics:
            raise ValueError("metrics must name at least one metric")
        for name in self.metrics:
            get_metric(name)
        check_open_unit(self.alpha, "alpha")
        for g in self.guardrails:
            g.validate()
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {self.max_requests}")
        self.serving.validate()


# ------------------------------------------------------------------------------------------------
# traffic


@dataclass(frozen=True)
class Requests:
    """Feed requests in time order: who asks, and when (epoch microseconds)."""

    user_idx: np.ndarray  # [R] int64 world user index
    ts_us: np.ndarray  # [R] int64, non-decreasing

    def __len__(self) -> int:
        return len(self.user_idx)

    def subset(self, mask: np.ndarray) -> Requests:
        return Requests(self.user_idx[mask], self.ts_us[mask])


def sample_population(world: World, users: int | None, seed: int) -> np.ndarray:
    """The experiment's users (sorted world indices): all, or a seeded sample without replacement."""
    if users is not None and users > world.n_users:
        raise ValueError(f"users={users:,} but the world has {world.n_users:,} users")
    if users is None or users == world.n_users:
        return np.arange(world.n_users)
    rng = np.random.default_rng([seed, _POPULATION_STREAM])
    return np.sort(rng.choice(world.n_users, size=users, replace=False))


def draw_requests(world: World, population: np.ndarray, cfg: ABSimConfig, start_us: int) -> Requests:
    """``cfg.days`` days of requests by ``population``, Poisson per user and day, in time order."""
    rng = np.random.default_rng([cfg.seed, _TRAFFIC_STREAM])
    rate = world.user_activity[population] if cfg.requests_per_user_day is None else np.full(
        len(population), cfg.requests_per_user_day
    )
    counts = rng.poisson(rate, size=(cfg.days, len(population)))
    total = int(counts.sum())
    if total > cfg.max_requests:
        raise ValueError(
            f"{total:,} requests ({len(population):,} users x {cfg.days} day(s)) exceed "
            f"max_requests={cfg.max_requests:,}; "
            "lower users/days or raise max_requests"
        )
    users = np.repeat(np.tile(population, cfg.days), counts.ravel())
    day = np.repeat(np.arange(cfg.days), counts.sum(axis=1))
    ts = start_us + day * _US_PER_DAY + (rng.random(total) * _US_PER_DAY).astype(np.int64)
    order = np.argsort(ts, kind="stable")
    return Requests(users[order].astype(np.int64), ts[order])


# ------------------------------------------------------------------------------------------------
# serving


class SimClock:
    """The service's clock, set by the simulator to each request's time (not the wall clock)."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Served:
    """What one arm served to a sequence of requests, and how the users reacted ([R, k] arrays)."""

    name: str  # the arm; request ids are "<name>-<row>"
    requests: Requests
    items: np.ndarray  # [R, k] int64 world item index by position; -1 where the feed was shorter
    outcomes: Outcomes  # [R, k]; False / 0 on padding
    latency_ms: np.ndarray  # [R] the service's total time per request
    paths: np.ndarray  # [R] object: cached | tower | cold_start | oracle

    @property
    def shown(self) -> np.ndarray:
        return self.items >= 0


def respond(world: World, requests: Requests, items: np.ndarray, rng: np.random.Generator) -> Outcomes:
    """``World.respond`` to ``[R, k]`` feeds (``-1`` = no item in that slot: no outcome)."""
    shown = items >= 0
    rows, position = np.nonzero(shown)
    drawn = world.respond(requests.user_idx[rows], items[shown], position, requests.ts_us[rows], rng)
    full = {}
    for f in dataclasses.fields(Outcomes):
        part = getattr(drawn, f.name)
        full[f.name] = np.zeros(items.shape, dtype=part.dtype)
        full[f.name][shown] = part
    return Outcomes(**full)


def events_table(world: World, served: Served) -> pa.Table:
    """``served``'s impressions as canonical log rows (``EVENT_SCHEMA``), metadata from the world."""
    shown = served.shown
    rows, position = np.nonzero(shown)
    outcomes = Outcomes(**{f.name: getattr(served.outcomes, f.name)[shown] for f in dataclasses.fields(Outcomes)})
    return world.impressions_table(served.requests.user_idx[rows], served.items[shown], served.requests.ts_us[rows],
                                   position, prefixed_ids(f"{served.name}-", rows), outcomes)


ORACLE = "oracle"


@dataclass(frozen=True)
class Arm:
    """What serves an arm: a two-tower bundle and optional ranker, or (``two_tower`` None) the
    world's oracle (``OracleService``) with ranking noise ``oracle_noise``."""

    two_tower: Bundle | None
    ranker: Bundle | None = None
    oracle_noise: float = 0.0

    @property
    def key(self) -> tuple[str, str | None]:
        """Equal for arms that serve identically (same bundle contents, or the same oracle)."""
        if self.two_tower is None:
            return (ORACLE, str(self.oracle_noise))
        return (self.two_tower.version, None if self.ranker is None else self.ranker.version)

    @property
    def label(self) -> str:
        if self.two_tower is None:
            return f"oracle (world truth, noise {self.oracle_noise:g})"
        return self.two_tower.version[:10] + ("" if self.ranker is None else f" + ranker {self.ranker.version[:10]}")


def parse_oracle(spec: str) -> float | None:
    """The noise of an oracle arm spec (``"oracle"`` = 0, ``"oracle:0.5"`` = 0.5), None if not one."""
    if spec == ORACLE:
        return 0.0
    if not spec.startswith(ORACLE + ":"):
        return None
    try:
        noise = float(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"{spec!r}: the oracle's noise must be a number, e.g. oracle:0.5") from None
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"{spec!r}: the oracle's noise must be >= 0")
    return noise


def _load(ref: BundleRef | None, kind: str, arm: str) -> Bundle | None:
    bundle = ref if ref is None or isinstance(ref, Bundle) else load_bundle(ref)
    if bundle is not None and bundle.kind != kind:
        raise ValueError(f"arm {arm!r}: {bundle.path} is a {bundle.kind!r} bundle, expected {kind}")
    return bundle


def load_arms(arms: Mapping[str, ArmSpec | str]) -> dict[str, Arm]:
    """Every arm loaded and checked before anything runs: ``(two_tower, ranker or None)`` (bundles
    or paths), or ``"oracle"`` / ``"oracle:<noise>"``. At least 2 arms."""
    if len(arms) < 2:
        raise ValueError(f"an experiment needs at least 2 arms, got {list(arms)}")
    loaded = {}
    for name, spec in arms.items():
        noise = parse_oracle(spec) if isinstance(spec, str) else None
        if noise is not None:
            loaded[name] = Arm(None, oracle_noise=noise)
        elif isinstance(spec, tuple) and len(spec) == 2 and spec[0] is not None:
            loaded[name] = Arm(_load(spec[0], "two_tower", name), _load(spec[1], "ranker", name))
        else:
            raise ValueError(f"arm {name!r}: expected (two_tower_bundle, ranker_bundle or None) or 'oracle[:noise]', "
                             f"got {spec!r}")  # fmt: skip
    return loaded


class OracleService:
    """Ranks by the truth: each published, not yet shown item by its expected click probability at
    request time, ``true_affinity x freshness``, best first (``noise`` 0), the ceiling any model
    could reach. With ``noise`` > 0 the order is a Plackett-Luce sample (``log p + noise * Gumbel``):
    a model of known, tunable quality between the oracle and random.

    It answers ``feed`` and ``record_events`` like ``FeedService`` (the two calls ``serve`` makes),
    so it slots into an experiment as an arm. "Seen" is what it showed during the experiment.
    """

    def __init__(
        self, world: World, clock: SimClock, noise: float = 0.0, rng: np.random.Generator | None = None
    ) -> None:
        self.world, self.clock, self.noise = world, clock, noise
        self.rng = rng or np.random.default_rng(0)
        self.item_ids = world.items_table()["item_id"].to_numpy(zero_copy_only=False)
        self.publishers = world.items_table()["publisher"].to_pylist()
        self.seen: dict[str, set[int]] = {}
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids)}

    def feed(self, user_id: str, k: int) -> FeedResponse:
        started = time.perf_counter()
        items = np.arange(self.world.n_items)
        user = self.world.user_index([user_id])[0]
        age_h = self.world.item_age_h(items, to_epoch_us(self.clock()))
        p = self.world.true_affinity(user, items) * self.world.freshness(age_h)
        p[list(self.seen.get(user_id, ()))] = 0.0  # unpublished items already have p = 0 (freshness)
        with np.errstate(divide="ignore"):
            score = np.log(p)
        if self.noise > 0:
            score = score + self.noise * self.rng.gumbel(size=score.shape)
        top = np.argsort(-score, kind="stable")[:k]
        top = top[p[top] > 0]
        picks = [FeedItem(str(self.item_ids[i]), float(p[i]), ORACLE, "expected click probability", self.publishers[i])
                 for i in top]  # fmt: skip
        total_ms = (time.perf_counter() - started) * 1000.0
        return FeedResponse(user_id, picks, {"total": total_ms}, "miss", ORACLE, {ORACLE: f"noise {self.noise:g}"})

    def record_events(self, events: Sequence[EventIn]) -> int:
        for event in events:
            self.seen.setdefault(event.user_id, set()).add(self._index[event.item_id])
        return len(events)

    def close(self) -> None:
        """Nothing to flush: the oracle keeps no log (its outcomes are in ``Served``)."""


def open_service(
    arm: Arm,
    world: World,
    world_dir: str | Path,
    serving: ServingConfig,
    start: dt.datetime,
    log_dir: Path,
    rng: np.random.Generator,
) -> tuple[FeedService | OracleService, SimClock]:
    """The arm's service on simulated time: a ``FeedService`` with its store seeded from the world's
    log and its serving log written (buffered: one file per POST would dominate the run) under
    ``log_dir``; or the ``OracleService`` (``rng``: its ranking noise)."""
    clock = SimClock(start)
    if arm.two_tower is None:
        return OracleService(world, clock, arm.oracle_noise, rng), clock
    sink = EventLogConfig(dir=str(log_dir), durable=False, flush_rows=serving.event_log.flush_rows,
                          flush_interval_s=serving.event_log.flush_interval_s)  # fmt: skip
    cfg = dataclasses.replace(serving, event_log=sink, start_time=None)
    return FeedService(arm.two_tower, cfg, ranker=arm.ranker, log_dir=world_dir, clock=clock), clock


def serve(
    world: World,
    service: FeedService | OracleService,
    clock: SimClock,
    requests: Requests,
    k: int,
    rng: np.random.Generator,
    name: str,
    progress: bool = False,
) -> Served:
    """Serve ``requests`` in order through ``service``, let the world respond, feed the outcomes back.

    One ``feed`` and one ``record_events`` per request (the per-request loop is the serving API
    itself); item ids map to world indices through the world's catalogue (``i<idx>``), and an id
    the world does not know is an error naming it.
    """
    n = len(requests)
    item_of_id = dict(zip(world.items_table()["item_id"].to_pylist(), range(world.n_items)))
    items = np.full((n, k), -1, np.int64)
    clicked, shared, hidden = (np.zeros((n, k), bool) for _ in range(3))
    dwell = np.zeros((n, k), np.float32)
    latency = np.zeros(n)
    paths = np.empty(n, dtype=object)
    for r in progress_bar(range(n), desc=f"serve {name}", unit="req", enabled=progress):
        user, ts_us = int(requests.user_idx[r]), int(requests.ts_us[r])
        clock.now = _EPOCH + dt.timedelta(microseconds=ts_us)
        user_id = f"u{user}"
        response = service.feed(user_id, k)
        latency[r], paths[r] = response.timings_ms["total"], response.path
        ids = [item.item_id for item in response.items]
        if not ids:
            continue
        unknown = [i for i in ids if i not in item_of_id]
        if unknown:
            raise KeyError(f"request {r} (user {user_id}): served item {unknown[0]!r} is not in the world's catalogue")
        shown = np.array([item_of_id[i] for i in ids], np.int64)
        m = len(shown)
        out = world.respond(np.int64(user), shown, np.arange(m), np.int64(ts_us), rng)
        items[r, :m], clicked[r, :m], dwell[r, :m] = shown, out.clicked, out.dwell_s
        shared[r, :m], hidden[r, :m] = out.shared, out.hidden
        request_id = f"{name}-{r}"
        service.record_events([
            EventIn(user_id=user_id, item_id=ids[p], ts=clock.now, clicked=bool(out.clicked[p]),
                    dwell_s=float(out.dwell_s[p]), shared=bool(out.shared[p]), hidden=bool(out.hidden[p]),
                    request_id=request_id, position=p)
            for p in range(m)
        ])  # fmt: skip
    return Served(name, requests, items, Outcomes(clicked, dwell, shared, hidden), latency, paths)


# ------------------------------------------------------------------------------------------------
# one experiment


@dataclass
class ArmSummary:
    """How an arm's traffic went: served volume, user-vector paths and request latency."""

    model: str
    users_assigned: int
    requests: int
    impressions: int
    cold_start_share: float
    latency_p50_ms: float
    latency_p99_ms: float

    @classmethod
    def of(cls, arm: Arm, users_assigned: int, served: Served) -> ArmSummary:
        lat = served.latency_ms
        return cls(
            model=arm.label,
            users_assigned=users_assigned,
            requests=len(served.requests),
            impressions=int(served.shown.sum()),
            cold_start_share=float(np.mean(served.paths == "cold_start")) if len(lat) else 0.0,
            latency_p50_ms=float(np.percentile(lat, 50)) if len(lat) else 0.0,
            latency_p99_ms=float(np.percentile(lat, 99)) if len(lat) else 0.0,
        )


@dataclass
class ABResult:
    """A simulated experiment: the analysis, per-arm serving figures, and where its log is."""

    analysis: Analysis
    config: ABSimConfig
    world: str
    start: dt.datetime
    population: int
    arms: dict[str, ArmSummary]
    seconds: float
    out_dir: Path | None  # None: the log lived in a temporary folder, now removed
    served: dict[str, Served] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "start": self.start.isoformat(),
            "population": self.population,
            "config": to_dict(self.config),
            "arms": {name: dataclasses.asdict(s) for name, s in self.arms.items()},
            "seconds": self.seconds,
            "out_dir": None if self.out_dir is None else str(self.out_dir),
            "analysis": self.analysis.to_dict(),
        }

    def render_text(self) -> str:
        c = self.config
        lines = [
            f"Simulated A/B on {self.world}: {self.population:,} users, {c.days} day(s) from {self.start.isoformat()}, "
            f"k={c.k}, salt {c.salt!r}, seed {c.seed}",
            "",
            f"{'arm':<12}{'users':>8}{'requests':>10}{'impressions':>13}{'cold start':>12}{'p50 ms':>9}{'p99 ms':>9}  model",
        ]
        for name, s in self.arms.items():
            lines.append(
                f"{name:<12}{s.users_assigned:>8,}{s.requests:>10,}{s.impressions:>13,}{100 * s.cold_start_share:>11.1f}%"
                f"{s.latency_p50_ms:>9.2f}{s.latency_p99_ms:>9.2f}  {s.model}"
            )
        lines += ["", "Analysis (users with at least one impression):", self.analysis.render_text()]
        if self.out_dir is not None:
            lines += ["", f"Log: {self.out_dir} ({EVENTS_DIR}/, {ASSIGNMENT_FILE}, {RESULT_FILE})"]
        return "\n".join(lines)


def _prepare_out(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output directory {out} exists and is not empty: choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def experiment_start(world: World, start: str | None) -> dt.datetime:
    """``start`` as a datetime, or the end of the world's log window (the day after its last day)."""
    return parse_start_time(start) if start is not None else world.config.start + dt.timedelta(days=world.config.days)


@dataclass
class _Setup:
    """Everything checked and derived before a run writes anything."""

    world: World
    arms: dict[str, Arm]
    cfg: ABSimConfig  # with k resolved
    start: dt.datetime
    population: np.ndarray
    requests: Requests


def _setup(world_dir: str | Path, arms: Mapping[str, ArmSpec | str], cfg: ABSimConfig | None) -> _Setup:
    cfg = cfg or ABSimConfig()
    cfg.validate()
    world = load_world(world_dir)
    loaded = load_arms(arms)
    normalise_weights(cfg.weights, list(loaded))
    cfg = dataclasses.replace(cfg, k=cfg.k or min(world.config.feed_size, cfg.serving.k_max))
    start = experiment_start(world, cfg.start)
    population = sample_population(world, cfg.users, cfg.seed)
    return _Setup(world, loaded, cfg, start, population, draw_requests(world, population, cfg, to_epoch_us(start)))


def simulate_ab(
    world_dir: str | Path,
    arms: Mapping[str, ArmSpec | str],
    cfg: ABSimConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> ABResult:
    """One simulated experiment (module docstring). Arms are compared with the first one (control).

    ``out_dir`` keeps the experiment's log (``events/``), ``assignment.parquet``, ``result.json``
    and each bundle arm's own serving log (``serving/<arm>/``); it must be new or empty. None runs
    in a temporary folder removed afterwards. Every input (world, bundles, config) is checked
    before anything is written.
    """
    s = _setup(world_dir, arms, cfg)
    cfg, names = s.cfg, list(s.arms)
    started = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="feedrank-ab-") if out_dir is None else None
    out = Path(scratch.name) if scratch is not None else _prepare_out(out_dir)
    try:
        user_ids = prefixed_ids("u", s.population)
        arm_of_user = assign(user_ids, cfg.salt, names, cfg.weights)
        pq.write_table(pa.table({"user_id": user_ids, "arm": pa.array(arm_of_user.astype(str))}), out / ASSIGNMENT_FILE)
        arm_of_request = arm_of_user[np.searchsorted(s.population, s.requests.user_idx)]
        served = {}
        for i, name in enumerate(names):
            service, clock = open_service(s.arms[name], s.world, world_dir, cfg.serving, s.start, out / "serving" / name,
                                          np.random.default_rng([cfg.seed, _ORACLE_STREAM, i]))  # fmt: skip
            try:
                rng = np.random.default_rng([cfg.seed, _OUTCOME_STREAM, i])
                served[name] = serve(s.world, service, clock, s.requests.subset(arm_of_request == name), cfg.k, rng,
                                     name, progress)  # fmt: skip
            finally:
                service.close()
        written = write_log(out, pa.concat_tables(events_table(s.world, served[n]) for n in names))
        if not written.ok:
            raise ValueError(f"{out}: the experiment log failed validation: {written.refused}")
        analysis = analyze_log(out, world_dir if cfg.cuped else None, names, cfg)
        summaries = {n: ArmSummary.of(s.arms[n], int(np.sum(arm_of_user == n)), served[n]) for n in names}
        result = ABResult(analysis, cfg, str(world_dir), s.start, len(s.population), summaries,
                          time.perf_counter() - started, None if scratch else out, served)  # fmt: skip
        if scratch is None:
            (out / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        return result
    finally:
        if scratch is not None:
            scratch.cleanup()


def analyze_log(log_dir: str | Path, pre_dir: str | Path | None, arms: Sequence[str], cfg: ABSimConfig) -> Analysis:
    """The production readout of an experiment log: per-user sums (arms by ``cfg.salt``; CUPED on
    ``pre_dir``'s log when given), then ``analyze`` with SRM and guardrails."""
    events = read_events(log_dir, columns=_METRIC_COLUMNS)
    if events.num_rows == 0:
        raise ValueError(f"{log_dir}: the experiment logged no impressions (no requests, or every feed was empty)")
    pre = read_events(pre_dir, columns=_METRIC_COLUMNS) if pre_dir is not None else None
    table = user_metrics(events, assign(events["user_id"], cfg.salt, arms, cfg.weights), pre)
    return analyze(table, arms, metrics=cfg.metrics, alpha=cfg.alpha, guardrails=cfg.guardrails, weights=cfg.weights,
                   use_cuped=cfg.cuped)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# replicates: serve once per model, re-randomise assignment and outcomes


def serve_population(
    world_dir: str | Path, arms: Mapping[str, ArmSpec | str], cfg: ABSimConfig | None = None, progress: bool = False
) -> dict[str, Served]:
    """Every request of the population served by each arm's model, as if everyone were in it.

    Arms that serve identically (``Arm.key``) share one serving pass: identical arms get
    identical feeds, so an A/A comparison differs only by assignment and outcome draws. The
    serving logs go to a temporary folder (replicates redraw the outcomes anyway).
    """
    s = _setup(world_dir, arms, cfg)
    by_model: dict[tuple[str, str | None], Served] = {}
    served = {}
    with tempfile.TemporaryDirectory(prefix="feedrank-ab-pop-") as scratch:
        for i, (name, arm) in enumerate(s.arms.items()):
            if arm.key not in by_model:
                service, clock = open_service(arm, s.world, world_dir, s.cfg.serving, s.start, Path(scratch) / name,
                                              np.random.default_rng([s.cfg.seed, _ORACLE_STREAM, i]))  # fmt: skip
                try:
                    rng = np.random.default_rng([s.cfg.seed, _OUTCOME_STREAM, i])
                    by_model[arm.key] = serve(s.world, service, clock, s.requests, s.cfg.k, rng, name, progress)
                finally:
                    service.close()
            served[name] = by_model[arm.key]
    return served


def replicate_feeds(
    world: World,
    served: Mapping[str, Served],
    salt: str,
    rng: np.random.Generator,
    users: int | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[Served, np.ndarray]:
    """One replicate experiment on ``serve_population``'s feeds: its impressions and each row's arm.

    ``users`` (None: all) users are drawn with ``rng`` from those with at least one request and
    put in arms by ``salt``; each sees the feeds its arm's model served, and the world draws fresh
    outcomes with ``rng``. Returns the replicate as one ``Served`` and the arm of each request.
    """
    names = list(served)
    first = next(iter(served.values())).requests
    for name, feeds in served.items():
        r = feeds.requests
        if not (np.array_equal(r.user_idx, first.user_idx) and np.array_equal(r.ts_us, first.ts_us)):
            raise ValueError(f"arm {name!r} was served other requests than arm {names[0]!r}: serve both with one config")
    exposed = np.unique(first.user_idx)
    if users is not None:
        if not 1 <= users <= len(exposed):
            raise ValueError(f"users must be in [1, {len(exposed)}] (the users with a request), got {users}")
        exposed = rng.choice(exposed, size=users, replace=False)
    arm_code = np.full(world.n_users, -1, np.int64)
    arm_code[exposed] = assign_index(prefixed_ids("u", exposed), salt, names, weights)
    code = arm_code[first.user_idx]
    rows = np.flatnonzero(code >= 0)
    code = code[rows]
    pick = lambda field: np.stack([getattr(served[n], field) for n in names])[code, rows]  # noqa: E731
    requests = first.subset(rows)
    items = pick("items")
    feeds = Served("replicate", requests, items, respond(world, requests, items, rng), pick("latency_ms"), pick("paths"))
    return feeds, np.asarray(names, dtype=object)[code]


def replicate_users(
    world: World,
    served: Mapping[str, Served],
    salt: str,
    rng: np.random.Generator,
    users: int | None = None,
    weights: Sequence[float] | None = None,
    pre_events: pa.Table | None = None,
) -> pa.Table:
    """The per-user table of one replicate (``replicate_feeds``), as ``analyze`` takes it;
    ``pre_events`` (the world's log) adds the CUPED ``pre_*`` columns."""
    feeds, arm_of_request = replicate_feeds(world, served, salt, rng, users, weights)
    rows, _ = np.nonzero(feeds.shown)
    return user_metrics(events_table(world, feeds), arm_of_request[rows], pre_events)


def true_ctr(world: World, served: Served) -> float:
    """The expected CTR of ``served``'s impressions under the world's response model:
    ``mean(examination(position) * true_affinity * freshness(age))``, no sampling noise."""
    shown = served.shown
    rows, position = np.nonzero(shown)
    user, item = served.requests.user_idx[rows], served.items[shown]
    age_h = world.item_age_h(item, served.requests.ts_us[rows])
    return float(np.mean(world.examination(position) * world.true_affinity(user, item) * world.freshness(age_h)))
