"""Lab ``profile``: ``torch.profiler`` on feedrank's own trainer and feed service, and a diagnosis.

Two jobs are profiled:

- **training**: K steps of ``feedrank.train.Trainer`` on the demo two-tower, fed by the real
  training input path (``ParquetStream`` + ``DataLoader``, ``feedrank.train.task.epoch_batches``);
  one ``ProfilerStep`` per optimizer step (the step boundary is set just before each batch fetch,
  so a step's window holds its wait on the loader, forward, backward and optimizer).
- **serving**: N ``/feed`` requests of the real ``FeedService`` in-process, over a bundle of the
  model just trained (and a seeded ranker: serving needs its shapes, not its skill), each request
  inside a ``feed`` span. A second, short pass with the Python tracer (``with_stack``) attributes
  the request's time to the pipeline's stage functions.

Each writes a top-ops table, a Chrome trace (``*_trace.json``, open in chrome://tracing or
Perfetto) and a TensorBoard trace (``tb_*``, ``tensorboard --logdir``). The diagnosis is a set of
pure functions over ``Span`` records (name, start, end, thread), so it is tested on hand-built
profiles: ``diagnose_steps`` (share of step time waiting on the data loader, host-device syncs per
step, the top op by self time, findings in words) and ``diagnose_requests`` (share of request
time outside torch ops). On CUDA the step's syncs are also counted with
``torch.cuda.set_sync_debug_mode("warn")``.

Example::

    spans = [Span("ProfilerStep#1", 0, 100), Span("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 0, 40),
             Span("aten::mm", 50, 90), Span("aten::_local_scalar_dense", 95, 96)]
    diagnose_steps(spans).data_wait_share    # 0.4
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import statistics
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from feedrank.labs.base import DEMO_CONFIG, LabContext, LabResult, Table, intra_op_threads, write_result

NAME = "profile"
TITLE = "torch.profiler on the trainer and /feed: where the time goes, diagnosed"

STEP_PREFIX = "ProfilerStep"  # "ProfilerStep#3" in traces, "ProfilerStep*" in prof.events()
LOADER_PREFIX = "enumerate(DataLoader)"
SYNC_OPS = ("aten::_local_scalar_dense",)  # what .item(), int(t), bool(t) run: the host waits for the value
REQUEST = "feed"


@dataclass(frozen=True)
class Span:
    """One profiler event: a name and its [start, end) in microseconds on one thread."""

    name: str
    start: float
    end: float
    thread: int = 0

    @property
    def dur(self) -> float:
        return self.end - self.start


def spans_from_profiler(events: Iterable[Any]) -> list[Span]:
    """``Span`` records of a ``torch.profiler`` run's CPU events (``prof.events()``)."""
    return [Span(e.name, float(e.time_range.start), float(e.time_range.end), int(e.thread)) for e in events
            if e.device_type == torch.autograd.DeviceType.CPU]


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (overlaps counted once).

    >>> union_length([(0, 10), (5, 15), (20, 25)])
    20
    """
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def clipped(spans: Iterable[Span], window: Span) -> list[tuple[float, float]]:
    """The parts of ``spans`` inside ``window``."""
    return [(max(s.start, window.start), min(s.end, window.end)) for s in spans
            if s.end > window.start and s.start < window.end]


def self_times(spans: Sequence[Span]) -> dict[str, float]:
    """Self time per name: each span's duration minus that of the spans nested directly in it
    (on the same thread), summed over spans of one name."""
    out: dict[str, float] = defaultdict(float)
    by_thread: dict[int, list[Span]] = defaultdict(list)
    for s in spans:
        by_thread[s.thread].append(s)
    for thread_spans in by_thread.values():
        stack: list[list[Any]] = []  # [span, time of its direct children]
        for s in sorted(thread_spans, key=lambda s: (s.start, -s.end)):
            while stack and stack[-1][0].end <= s.start:
                done, child = stack.pop()
                out[done.name] += done.dur - child
            if stack:
                stack[-1][1] += s.dur
            stack.append([s, 0.0])
        for done, child in stack:
            out[done.name] += done.dur - child
    return dict(out)


@dataclass
class StepDiagnosis:
    """What is wrong with a training job, from its profile (see ``diagnose_steps``)."""

    steps: int
    step_ms: float  # mean wall time of a profiled step
    data_wait_share: float  # of step time, inside the data loader's __next__
    syncs_per_step: float  # aten::_local_scalar_dense calls per step (host waits on a tensor value)
    top_op: str  # aten op with the most self time
    top_op_share: float  # its self time / step time
    findings: list[str] = field(default_factory=list)


def diagnose_steps(spans: Sequence[Span], data_wait_threshold: float = 0.2, top_op_threshold: float = 0.3) -> StepDiagnosis:
    """Diagnose profiled training steps: the ``ProfilerStep#`` spans are the steps.

    Raises ``ValueError`` when the profile holds no step (the schedule never reached "active").
    """
    steps = [s for s in spans if s.name.startswith(STEP_PREFIX)]
    if not steps:
        raise ValueError(f"no {STEP_PREFIX}#N spans: call prof.step() once per training step")
    total = sum(s.dur for s in steps)
    loader = [s for s in spans if s.name.startswith(LOADER_PREFIX)]
    wait = sum(union_length(clipped(loader, step)) for step in steps)
    inside = [s for s in spans if any(st.start <= s.start < st.end for st in steps)]
    syncs = sum(1 for s in inside if s.name in SYNC_OPS)
    ops = {k: v for k, v in self_times(inside).items() if k.startswith("aten::")}
    top, top_us = max(ops.items(), key=lambda kv: kv[1]) if ops else ("-", 0.0)
    d = StepDiagnosis(len(steps), total / len(steps) / 1000, wait / total, syncs / len(steps), top, top_us / total)
    if d.data_wait_share > data_wait_threshold:
        d.findings.append(f"input-bound: {d.data_wait_share:.0%} of each step waits on the data loader "
                          "(more DataLoader workers, prefetch, or cheaper collation)")
    if d.syncs_per_step > 0:
        d.findings.append(f"{d.syncs_per_step:g} host-device syncs per step ({SYNC_OPS[0]}: .item(), int(t), "
                          "bool(t)); each stalls the host until the device catches up; on CUDA find them with "
                          "torch.cuda.set_sync_debug_mode('warn')")
    if d.top_op_share > top_op_threshold:
        d.findings.append(f"one op dominates: {d.top_op} takes {d.top_op_share:.0%} of step time")
    if not d.findings:
        d.findings.append("no single bottleneck: time is spread over many small ops (launch-bound)")
    return d


@dataclass
class RequestDiagnosis:
    """Where request time goes: inside torch ops or outside (Python, numpy, the index, the cache)."""

    requests: int
    request_ms: float
    torch_share: float  # of request time covered by aten ops
    outside_share: float
    top_op: str
    findings: list[str] = field(default_factory=list)


def diagnose_requests(spans: Sequence[Span], request: str = REQUEST) -> RequestDiagnosis:
    """Diagnose profiled requests: the spans named ``request`` are the requests."""
    reqs = [s for s in spans if s.name == request]
    if not reqs:
        raise ValueError(f"no {request!r} spans: wrap each request in record_function({request!r})")
    total = sum(r.dur for r in reqs)
    ops = [s for s in spans if s.name.startswith("aten::")]
    covered = sum(union_length(clipped(ops, r)) for r in reqs)
    inside = [s for s in ops if any(r.start <= s.start < r.end for r in reqs)]
    own = self_times(inside)
    top = max(own.items(), key=lambda kv: kv[1])[0] if own else "-"
    d = RequestDiagnosis(len(reqs), total / len(reqs) / 1000, covered / total, 1 - covered / total, top)
    if d.outside_share > 0.5:
        d.findings.append(f"{d.outside_share:.0%} of request time is outside torch ops: the model is not the "
                          "bottleneck; look at the Python/numpy stages (table below)")
    else:
        d.findings.append(f"{d.torch_share:.0%} of request time is in torch ops: the model dominates")
    return d


def stage_breakdown(spans: Sequence[Span], parent_suffix: str, prefix: str = "feedrank/") -> list[list[Any]]:
    """For Python-tracer spans: the functions called directly by the function whose name ends with
    ``parent_suffix`` (and whose name contains ``prefix``), with their total ms and the share of
    it inside torch ops, largest first. Rows: [function, calls, ms, share in torch ops]."""
    ops = [s for s in spans if s.name.startswith("aten::")]
    parents = [s for s in spans if s.name.endswith(parent_suffix)]
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for parent in parents:
        kids = sorted((s for s in spans if s.thread == parent.thread and parent.start <= s.start and s.end <= parent.end
                       and s is not parent and prefix in s.name), key=lambda s: (s.start, -s.end))
        end = -1.0
        for k in kids:  # direct children only: skip spans nested in the previous direct child
            if k.start < end:
                continue
            end = k.end
            name = k.name.split(prefix)[-1]
            rows[name][0] += 1
            rows[name][1] += k.dur
            rows[name][2] += union_length(clipped(ops, k))
    n = max(len(parents), 1)
    return sorted(([name, int(c / n), ms / n / 1000, (t / ms if ms else 0.0)] for name, (c, ms, t) in rows.items()),
                  key=lambda r: -r[2])


#: Optimizer kernels whose scalar reads are torch's, not the training step's (see ``run``).
OPTIMIZER_KERNELS = ("aten::_fused_adam", "aten::_foreach_", "Optimizer.step")


def sync_callers(events: Iterable[Any], steps: int) -> list[list[Any]]:
    """[caller, syncs per step]: what called each ``aten::item`` (the enclosing op, skipping the
    ``is_nonzero`` that ``bool(t)`` runs), most first. Needs the profiler's parent links, so it
    reads ``prof.events()``, not spans."""
    found: Counter = Counter()
    for e in events:
        if e.name == "aten::item":
            parent = e.cpu_parent
            while parent is not None and parent.name == "aten::is_nonzero":
                parent = parent.cpu_parent
            name = parent.name if parent is not None and not parent.name.startswith(STEP_PREFIX) else "Python"
            found[name] += 1
    return [[name, n / max(steps, 1)] for name, n in found.most_common()]


def top_ops_rows(prof: torch.profiler.profile, n: int = 12) -> list[list[Any]]:
    """[op, calls, self CPU ms, total CPU ms] of the ``n`` aten ops with the most self time."""
    avgs = [a for a in prof.key_averages() if a.key.startswith("aten::")]
    avgs.sort(key=lambda a: -a.self_cpu_time_total)
    return [[a.key, a.count, a.self_cpu_time_total / 1000, a.cpu_time_total / 1000] for a in avgs[:n]]


# ----------------------------------------------------------------------------------------------- jobs


def _handler(ctx: LabContext, name: str, sink: list[Span]) -> Callable[[torch.profiler.profile], None]:
    """When the profiler's active window ends: keep its spans in ``sink`` and write both traces. A
    profile can be saved once, and the TensorBoard trace *is* a Chrome trace (gzipped), so the
    Chrome copy is that file, unzipped."""
    import gzip
    import shutil

    folder = ctx.out / f"tb_{name}"
    tensorboard = torch.profiler.tensorboard_trace_handler(str(folder), worker_name=name, use_gzip=True)

    def on_ready(prof: torch.profiler.profile) -> None:
        sink.extend(spans_from_profiler(prof.events()))
        tensorboard(prof)
        newest = max(folder.glob(f"{name}*.pt.trace.json.gz"), key=lambda p: p.stat().st_mtime)
        with gzip.open(newest, "rb") as src, open(ctx.out / f"{name}_trace.json", "wb") as dst:
            shutil.copyfileobj(src, dst)

    return on_ready


def profile_training(ctx: LabContext, steps: int, batch_size: int
                     ) -> tuple[torch.nn.Module, torch.profiler.profile, list[Span], int | None]:
    """K profiled steps of the Trainer (after one skipped and one warm-up step, and before the last,
    whose logging and checkpoint are not a step's). Returns the model, the profiler, its spans, and
    on CUDA the syncs ``set_sync_debug_mode`` warned about in the profiled steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from feedrank.config import from_dict
    from feedrank.data.collate import Collator
    from feedrank.features.build import split_files
    from feedrank.models.losses import two_tower_loss
    from feedrank.train.task import LoaderConfig, epoch_batches
    from feedrank.train.trainer import Trainer, TrainConfig

    model = ctx.two_tower()
    cfg = from_dict(TrainConfig, {"steps": steps + 3, "lr": 1e-3, "warmup_steps": 0, "log_every": 10,
                                  "device": ctx.device, "progress": False, "tensorboard": False,
                                  "out_dir": str(ctx.out / "trainer")})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.startswith("cuda") else [])
    spans: list[Span] = []
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                   on_trace_ready=_handler(ctx, "trainer", spans))
    debug = SyncDebug(ctx.device)
    loader = LoaderConfig(batch_size=batch_size, num_workers=0, shuffle_buffer_rows=4 * batch_size, seed=ctx.seed)
    with Trainer(model, two_tower_loss, cfg) as trainer:
        data = epoch_batches(split_files(ctx.features_dir(), "train"), loader, Collator(max_history=30), trainer)

        def stepped(epoch: int) -> Iterator[Any]:
            """Each step's window starts just before its batch is fetched (step 0 at ``with prof``);
            on CUDA the sync debug mode is on from a profiled step's batch to the next fetch."""
            it = iter(data(epoch))
            for i in itertools.count():
                debug.stop()
                if i or epoch:
                    prof.step()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                if 2 <= prof.step_num < steps + 2:
                    debug.start()
                yield batch

        if trainer.state.step:
            raise RuntimeError(f"{ctx.out / 'trainer'} holds a checkpoint; the lab trains from scratch")
        try:
            with prof:
                trainer.fit(stepped)
        finally:
            debug.stop()
    return model, prof, spans, (debug.warnings if ctx.device.startswith("cuda") else None)


class SyncDebug:
    """On CUDA, count the synchronisations ``torch.cuda.set_sync_debug_mode('warn')`` reports
    between ``start()`` and ``stop()`` (both idempotent); does nothing on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.warnings = 0
        self._catch: Any = None

    def start(self) -> None:
        if self.cuda and self._catch is None:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.warnings += sum("synchroniz" in str(w.message) for w in self._caught)
            self._catch.__exit__(None, None, None)
            self._catch = None


def feed_service(ctx: LabContext, model: torch.nn.Module, workdir: Path):
    """A real ``FeedService`` over a bundle of ``model`` and a seeded, untrained ranker."""
    from feedrank.bundle import build_catalogue, load_bundle, save_bundle
    from feedrank.config import to_dict
    from feedrank.data.log import read_events
    from feedrank.index import IndexConfig
    from feedrank.models.ranker import Ranker, RankerConfig
    from feedrank.serving.config import EventLogConfig, ServingConfig
    from feedrank.serving.demo import log_end
    from feedrank.serving.pipeline import FeedService
    from feedrank.train.retrieval import load_run_config

    vocabs, log = ctx.vocabs, ctx.world_log()
    catalogue = build_catalogue(read_events(log), vocabs)
    config = to_dict(load_run_config(DEMO_CONFIG))
    two_tower = load_bundle(save_bundle(workdir / "two_tower", kind="two_tower", model=model.cpu(), config=config,
                                        vocabs=vocabs, catalogue=catalogue))
    torch.manual_seed(ctx.seed)
    rcfg = RankerConfig(dim=8, hidden=[32], two_tower_dim=model.cfg.dim, dropout=0.0, max_history_len=30)
    ranker = Ranker(rcfg, vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes, 2, 3)
    ranker_bundle = load_bundle(save_bundle(workdir / "ranker", kind="ranker", model=ranker,
                                            config={"ranker": to_dict(rcfg)}, vocabs=vocabs, catalogue=catalogue))
    now = [log_end(log)]

    def clock() -> dt.datetime:  # strictly increasing, from the end of the log: a replayed "now"
        now[0] += dt.timedelta(milliseconds=1)
        return now[0]

    cfg = ServingConfig(index=IndexConfig(kind="flat"), event_log=EventLogConfig(dir=str(workdir / "serving_log")))
    users = read_events(log, columns=["user_id"])["user_id"].unique().to_pylist()
    return FeedService(two_tower, cfg, ranker=ranker_bundle, log_dir=log, clock=clock), sorted(users)


def profile_feed(ctx: LabContext, service: Any, users: list[str], n: int, traced: int
                 ) -> tuple[Any, list[Span], Any, list[dict]]:
    """N profiled ``/feed`` requests (distinct users: each computes its user vector), then ``traced``
    more with the Python tracer for the stage breakdown. Returns the profiler and its spans, the
    Python-traced profiler, and each request's stage timings."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for user in users[:3]:  # warm-up: first-call costs are not a request's
        service.feed(user)
    timings = []
    spans: list[Span] = []
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=_handler(ctx, "feed", spans)) as prof:
        for user in users[3: 3 + n]:
            with record_function(REQUEST):
                timings.append(service.feed(user).timings_ms)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as stack:
        for user in users[3 + n: 3 + n + traced]:
            with record_function(REQUEST):
                service.feed(user)
    return prof, spans, stack, timings


def _plot(ctx: LabContext, train_top: list[list[Any]], stages: list[list[Any]], diag: StepDiagnosis,
          req: RequestDiagnosis) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r[0].replace("aten::", "") for r in train_top[:8]][::-1]
    ax1.barh(names, [r[2] for r in train_top[:8]][::-1], color="tab:blue")
    ax1.set(xlabel="self CPU ms (all profiled steps)",
            title=f"Trainer: top ops; {diag.syncs_per_step:g} syncs/step, {diag.data_wait_share:.0%} data wait")
    top = stages[:6][::-1]
    ms = [r[2] for r in top]
    torch_ms = [r[2] * r[3] for r in top]
    labels = [r[0].split(": ")[-1][:28] for r in top]
    ax2.barh(labels, torch_ms, color="tab:orange", label="in torch ops")
    ax2.barh(labels, [a - b for a, b in zip(ms, torch_ms)], left=torch_ms, color="tab:grey", label="outside torch")
    ax2.set(xlabel="ms per request (Python tracer on)", title=f"/feed stages: {req.outside_share:.0%} outside torch ops")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "profile.png", dpi=110)
    plt.close(fig)
    return ["profile.png"]


def run(ctx: LabContext) -> LabResult:

    with intra_op_threads(1):  # see its docstring
        return _run(ctx)


def _run(ctx: LabContext) -> LabResult:
    import shutil

    started = time.perf_counter()
    steps, requests, traced = (6, 30, 5) if ctx.quick else (20, 80, 20)  # a request is ~0.2 MB of trace
    for old in ("trainer", "tb_trainer", "tb_feed", "serving"):  # the lab trains and serves from scratch
        shutil.rmtree(ctx.out / old, ignore_errors=True)
    model, prof, spans, cuda_syncs = profile_training(ctx, steps, batch_size=1024)
    diag = diagnose_steps(spans)
    train_top = top_ops_rows(prof)
    sync_sites = Counter(s.name for s in spans if s.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"))
    callers = sync_callers(prof.events(), diag.steps)
    # torch's AdamW reads each parameter's step counter with .item() on CPU, in every variant
    # (fused, foreach, single-tensor; capturable=True, which keeps it on the device, is CUDA-only):
    # host memory read by the host, no device to wait for. feedrank's own step is what can regress.
    in_optimizer = sum(n for caller, n in callers if caller.startswith(OPTIMIZER_KERNELS))
    in_feedrank = diag.syncs_per_step - in_optimizer
    if in_optimizer and diag.syncs_per_step > 0:  # say which reads are torch's, in the findings too
        diag.findings = [f for f in diag.findings if "host-device syncs" not in f] + [
            f"{in_feedrank:g} syncs per step in feedrank's own step (the metrics record every "
            f"log_every steps reads its sums back once) and {in_optimizer:g} step-counter reads inside torch's "
            "AdamW (host memory on CPU; on CUDA use the fused kernel, which keeps them on the device)"]

    service, users = feed_service(ctx, model, ctx.out / "serving")
    try:
        feed_prof, feed_spans, stack_prof, timings = profile_feed(ctx, service, users, requests, traced)
    finally:
        service.close()
    req = diagnose_requests(feed_spans)
    stages = stage_breakdown(spans_from_profiler(stack_prof.events()), "): feed")
    stage_ms = {k: statistics.mean(t[k] for t in timings) for k in timings[0]}

    tables = [
        Table(f"Trainer: top ops by self CPU time over {diag.steps} steps (batch 1024)",
              ["op", "calls", "self CPU ms", "total CPU ms"], [[r[0], r[1], round(r[2], 2), round(r[3], 2)] for r in train_top]),
        Table("Trainer diagnosis", ["step ms", "data-loader wait", "syncs / step", "top op", "top op share", "findings"],
              [[round(diag.step_ms, 2), f"{diag.data_wait_share:.1%}", diag.syncs_per_step, diag.top_op,
                f"{diag.top_op_share:.1%}", " | ".join(diag.findings)]]),
        Table("Trainer: host-device syncs per step by caller (the op around aten::item; 'Python' when none: "
              ".item(), int(t) or bool(t) in feedrank code)", ["caller", "syncs / step"], callers or [["none", 0]]),
        Table(f"/feed: top ops over {req.requests} requests", ["op", "calls", "self CPU ms", "total CPU ms"],
              [[r[0], r[1], round(r[2], 2), round(r[3], 2)] for r in top_ops_rows(feed_prof)]),
        Table(f"/feed: where a request's time goes (Python tracer on, {traced} requests; it inflates Python time)",
              ["function called by FeedService.feed", "calls / request", "ms / request", "share in torch ops"],
              [[r[0], r[1], round(r[2], 3), f"{r[3]:.0%}"] for r in stages[:10]]),
    ]
    summary = (
        f"Trainer ({diag.steps} profiled steps of {diag.step_ms:.1f} ms): {diag.data_wait_share:.0%} of step time "
        f"waits on the DataLoader, {diag.syncs_per_step:g} scalar reads per step "
        f"({', '.join(f'{k} x{v}' for k, v in sync_sites.items()) or 'none'} in {diag.steps} steps; by caller: "
        f"{', '.join(f'{r[0]} {r[1]:g}' for r in callers) or 'none'} per step): {in_feedrank:g} in feedrank's own "
        f"step, {in_optimizer:g} inside torch's AdamW, which reads its step counters on the host on CPU (no device "
        f"to wait for; on CUDA the fused kernel keeps them on the device), top op "
        f"{diag.top_op} ({diag.top_op_share:.0%} of step time). "
        + (f"CUDA sync debug mode warned {cuda_syncs} times. " if cuda_syncs is not None else "")
        + f"/feed ({req.requests} requests, {req.request_ms:.2f} ms mean; stages user {stage_ms['user']:.2f} / "
        f"ann {stage_ms['ann']:.2f} / rank {stage_ms['rank']:.2f} / rerank {stage_ms['rerank']:.2f} ms): "
        f"{req.outside_share:.0%} of request time is outside torch ops; the largest stage is "
        f"{stages[0][0] if stages else '-'} ({stages[0][3]:.0%} of it in torch ops). "
        f"Findings: {' '.join(diag.findings + req.findings)}. Measured with 1 intra-op thread on 2 shared CPU "
        f"cores: timings are noisy."
    )
    figures = {"train": dataclasses.asdict(diag), "train_sync_ops": dict(sync_sites), "train_sync_callers": callers,
               "train_syncs_in_feedrank_code": in_feedrank, "train_syncs_in_optimizer": in_optimizer, "cuda_sync_warnings": cuda_syncs,
               "feed": dataclasses.asdict(req), "feed_stage_ms": stage_ms, "feed_stages": stages,
               "traces": sorted(p.name for p in ctx.out.glob("*_trace.json")),
               "tensorboard": ["tb_trainer", "tb_feed"], "seconds": time.perf_counter() - started}
    result = LabResult(NAME, TITLE, summary, tables, _plot(ctx, train_top, stages, diag, req), figures, ctx.device, ctx.quick)
    write_result(ctx, result)
    return result
