"""Lab ``compile``: eager against ``torch.compile`` on the demo two-tower, and when compile pays back.

What it measures:

1. **graph breaks**: ``torch._dynamo.explain`` over the training loss on a fixed-shape batch
   (clicked rows only, so filtering to the training pairs does not change the batch size): how
   many graphs dynamo cut the step into, and why (each reason with the line of feedrank that
   caused it).
2. **modes**: compile time of the first call (cold: a fresh inductor cache, as on a new machine;
   warm: the same compile again with the cache filled), steady-state time per call (median),
   graph breaks and recompiles from ``torch._dynamo.utils.counters``, and the break-even point
   ``compile time / (eager - compiled) per call``. The training step (forward + backward) and the
   serving forward (``user_vectors`` under ``inference_mode``) are compiled separately.
3. **variable-length histories**: the same rows collated at several history lengths (a batch's
   length is its longest history) through the compiled serving forward: ``dynamic=False``
   compiles once per length, ``dynamic=True`` once for all (symbolic length), and padding to a
   few length buckets once per bucket, at the price of computing on padding.

Quick mode compiles the training step with the ``aot_eager`` backend (dynamo + AOTAutograd, no
code generation: it shows the graph breaks and the tracing cost, not inductor's speed), compiles
only the serving forward with inductor (mode default), and counts variable-length compiles with
the ``eager`` backend: how often dynamo recompiles is dynamo's decision, the backend only sets the
price of each compile, which full mode measures with inductor. Inductor needs a C++ compiler; if it
fails here the lab says so and measures with ``aot_eager``.

Example::

    result = run(LabContext(root=Path("runs/labs"), name="compile", quick=True))
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from feedrank.data.batch import Batch
from feedrank.data.collate import Collator
from feedrank.labs.base import LabContext, LabResult, Table, intra_op_threads, write_result
from feedrank.models.losses import two_tower_loss

NAME = "compile"
TITLE = "torch.compile: graph breaks, compile time, and when it pays back"

#: History lengths of the variable-length sweep and the padding buckets (the demo's max is 30).
LENGTHS = {False: (4, 8, 12, 16, 20, 25, 30), True: (4, 9, 16, 23, 30)}  # by ctx.quick
BUCKETS = (10, 20, 30)


@dataclass
class Variant:
    """One way to run a step: eager, or compiled with a mode / backend."""

    target: str  # "train step", "serving forward" or "tower MLP" (the item tower's MLP, fwd + bwd)
    mode: str  # "eager" or a torch.compile mode
    backend: str = "inductor"
    cold: bool = True  # a fresh inductor cache; False: the machine's cache as found (warm after first use)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fixed_batches(ctx: LabContext, n: int, size: int, max_history: int = 30) -> list[Batch]:
    """``n`` batches of exactly ``size`` clicked rows, histories padded to ``max_history``: the
    in-batch loss trains on clicked rows only, so these keep one shape through the row filter (a
    fixed-shape training step)."""
    rows = ctx.rows(n * size * 40)
    rows = rows.filter(rows["clicked"])
    if rows.num_rows < n * size:
        raise ValueError(f"only {rows.num_rows} clicked rows; need {n * size} for {n} batches of {size}")
    collate = Collator(max_history=max_history)  # a batch's length is its longest history: pad to the max
    return [pad_history(collate(rows.slice(i * size, size)), max_history).to(ctx.device) for i in range(n)]


def pad_history(batch: Batch, length: int) -> Batch:
    """``batch`` with its history right-padded (mask False) to ``length`` columns."""
    extra = length - batch.history.shape[1]
    if extra < 0:
        raise ValueError(f"history of length {batch.history.shape[1]} is longer than the bucket {length}")
    return dataclasses.replace(batch, history=F.pad(batch.history, (0, extra)),
                               history_mask=F.pad(batch.history_mask, (0, extra), value=False))


def bucket_of(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``length``.

    >>> bucket_of(11, (10, 20, 30))
    20
    """
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def explain_breaks(model: torch.nn.Module, batch: Batch) -> tuple[int, int, list[list]]:
    """(graphs, graph breaks, [[reason, where, count]]) of the training loss under dynamo."""
    torch._dynamo.reset()
    out = torch._dynamo.explain(lambda b: two_tower_loss(model, b)[0])(batch)
    where = Counter()
    for reason in out.break_reasons:
        frame = next((f for f in reversed(reason.user_stack) if "feedrank" in f.filename), None)
        loc = f"{frame.filename.split('feedrank/')[-1]}:{frame.lineno} {frame.line}" if frame else "?"
        where[(reason.reason.splitlines()[0][:90], loc)] += 1
    rows = [[r, loc, n] for (r, loc), n in where.most_common()]
    return out.graph_count, out.graph_break_count, rows


def counts(graphs_after_first_call: int) -> dict[str, int]:
    """Dynamo's counters since the last ``counters.clear()``: graph breaks, graphs compiled, and
    recompiles (graphs compiled after the first call: a guard failed on a later input)."""
    c = torch._dynamo.utils.counters
    graphs = c["stats"]["unique_graphs"]
    return {"graph_breaks": sum(c["graph_break"].values()), "graphs": graphs,
            "recompiles": graphs - graphs_after_first_call}


def median_ms(fn: Callable[[Batch], object], batches: list[Batch], rounds: int, device: str) -> float:
    times = []
    for _ in range(rounds):
        for b in batches:
            sync(device)
            start = time.perf_counter()
            fn(b)
            sync(device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@contextlib.contextmanager
def inductor_cache(fresh: bool) -> Iterator[None]:
    """A fresh, empty inductor cache (deleted afterwards), so a compile is timed cold, as on a new
    machine; inductor's on-disk caches would otherwise make a second run of the lab look cheap."""
    if fresh:
        from torch._inductor.utils import fresh_cache

        with fresh_cache():
            yield
    else:
        yield


def first_call_s(fn: Callable[[Batch], object], batch: Batch, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn(batch)
    sync(device)
    return time.perf_counter() - start


def measure(ctx: LabContext, v: Variant, model: torch.nn.Module, batches: list[Batch], rounds: int,
            warm: bool = False) -> dict:
    """First-call seconds (cold; with ``warm`` also the same compile again over the filled cache),
    steady ms per call and dynamo's counts for one variant."""

    def train(m: torch.nn.Module) -> Callable[[Batch], object]:
        def step(b: Batch) -> None:
            loss, _ = two_tower_loss(m, b)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    def serve(fn: Callable[[Batch], torch.Tensor]) -> Callable[[Batch], object]:
        def forward(b: Batch) -> torch.Tensor:
            with torch.inference_mode():
                return fn(b)
        return forward

    mlp = model.item_tower.mlp
    x = torch.randn(max(len(b) for b in batches), mlp[0].in_features,
                    generator=torch.Generator().manual_seed(0)).to(ctx.device)

    def tiny(m: torch.nn.Module) -> Callable[[Batch], object]:
        def step(b: Batch) -> None:
            m(x[: len(b)]).sum().backward()
            mlp.zero_grad(set_to_none=True)
        return step

    def build() -> Callable[[Batch], object]:
        wrap = {"train step": (train, model), "serving forward": (serve, model.user_vectors), "tower MLP": (tiny, mlp)}
        make, target = wrap[v.target]
        if v.mode == "eager":
            return make(target)
        return make(torch.compile(target, **({"mode": v.mode} if v.backend == "inductor" else {"backend": v.backend})))

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with inductor_cache(v.cold and v.backend == "inductor" and v.mode != "eager"):
        fn = build()
        first_s = first_call_s(fn, batches[0], ctx.device)
        graphs_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        steady = median_ms(fn, batches, rounds, ctx.device)
        found = counts(graphs_first)
        warm_s = None
        if warm and v.mode != "eager":
            torch._dynamo.reset()
            warm_s = first_call_s(build(), batches[0], ctx.device)
    compiled = v.mode != "eager"
    return {"target": v.target, "mode": v.mode, "backend": v.backend if compiled else "-",
            "cache": ("fresh" if v.cold else "as found") if compiled and v.backend == "inductor" else "-",
            "first_call_s": first_s, "warm_first_call_s": warm_s, "steady_ms": steady, **found}


def break_even(compile_s: float, eager_ms: float, compiled_ms: float) -> float | None:
    """Calls after which a compile has paid for itself; None when compiled is not faster.

    >>> break_even(30.0, eager_ms=3.0, compiled_ms=2.0)
    30000.0
    """
    saving = (eager_ms - compiled_ms) / 1000
    return compile_s / saving if saving > 0 else None


class CompileCounter:
    """A backend that counts compiles and delegates to ``inner`` (``"eager"`` or ``"inductor"``)."""

    def __init__(self, inner: str) -> None:
        self.inner, self.compiles = inner, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiles += 1
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward


def variable_lengths(ctx: LabContext, model: torch.nn.Module, rows_batches: dict[int, list[Batch]], backend: str,
                     rounds: int) -> list[dict]:
    """The compiled serving forward over ``rows_batches`` (history length -> batches), three ways,
    over the machine's inductor cache (a fresh cache per strategy would add a minute of C++ here)."""
    out = []
    for name, dynamic, pad in (("dynamic=False", False, False), ("dynamic=True", True, False),
                               (f"pad to {'/'.join(map(str, BUCKETS))}, dynamic=False", False, True)):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = CompileCounter(backend)
        fn = torch.compile(model.user_vectors, backend=counter, dynamic=dynamic)
        first, steady, first_compiles = 0.0, [], None
        with inductor_cache(False):  # the machine's cache: the compile *counts* are the point here
            for length, batches in rows_batches.items():
                if pad:
                    batches = [pad_history(b, bucket_of(length, BUCKETS)) for b in batches]
                with torch.inference_mode():
                    for batch in batches:  # every batch once first: a guard on values
                        start = time.perf_counter()     # (not only shapes) can recompile on the second
                        fn(batch)
                        first += time.perf_counter() - start
                        if first_compiles is None:
                            first_compiles = counter.compiles
                    steady.append(median_ms(fn, batches, rounds, ctx.device))
        out.append({"strategy": name, "backend": backend, "compiles": counter.compiles,
                    "recompiles": counter.compiles - first_compiles,
                    "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
                    "first_calls_s": first, "steady_ms_mean": statistics.mean(steady)})
    return out


def measure_compiled(ctx: LabContext, v: Variant, model: torch.nn.Module, batches: list[Batch], rounds: int,
                     warm: bool) -> tuple[dict, str | None]:
    """``measure`` with inductor, or, when inductor fails here (no C++ compiler, a codegen error),
    with ``aot_eager``; also returns why inductor failed (None when it worked)."""
    if v.backend != "inductor":
        return measure(ctx, v, model, batches, rounds, warm), None
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        problem = "no C++ compiler on PATH (inductor's CPU backend generates and compiles C++)"
    else:
        try:
            return measure(ctx, v, model, batches, rounds, warm), None
        except Exception as exc:  # noqa: BLE001 - any inductor failure: say why, measure with aot_eager
            problem = f"inductor failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return measure(ctx, dataclasses.replace(v, backend="aot_eager"), model, batches, rounds), problem


def _plot(ctx: LabContext, modes: list[dict], lengths: list[dict], n_lengths: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    labels = ["\n".join([m["target"], *m["mode"].split("-")]) for m in modes]
    ax1.bar(range(len(modes)), [m["steady_ms"] for m in modes], color="tab:blue")
    ax1.set(xticks=range(len(modes)), ylabel="steady ms per call (median)", title="Steady state (bars), first call (dots)")
    ax1.set_xticklabels(labels, fontsize=6.5)
    first = ax1.twinx()
    first.plot(range(len(modes)), [m["first_call_s"] for m in modes], "o", color="tab:red")
    first.set_ylabel("first call (s, includes compile)")
    ax2.bar(range(len(lengths)), [r["compiles"] for r in lengths], color="tab:green")
    ax2.set(xticks=range(len(lengths)), ylabel="graphs compiled",
            title=f"{n_lengths} history lengths through the compiled forward")
    ax2.set_xticklabels([r["strategy"] for r in lengths], fontsize=7)
    fig.tight_layout()
    fig.savefig(ctx.out / "compile_modes.png", dpi=110)
    plt.close(fig)
    return ["compile_modes.png"]


def run(ctx: LabContext) -> LabResult:
    with intra_op_threads(1):
        return _run(ctx)


def _run(ctx: LabContext) -> LabResult:
    started = time.perf_counter()
    size, n, rounds = (64, 4, 2) if ctx.quick else (256, 6, 3)
    model = ctx.two_tower().to(ctx.device)
    batches = fixed_batches(ctx, n, size)
    graphs, breaks, reasons = explain_breaks(model, batches[0])

    # Quick: only a tiny model (the item tower's MLP, one graph) is compiled, mode default, over the
    # machine's inductor cache (a fresh cache costs ~20-40 s of C++ header compiles here); the
    # training step's graph breaks come from explain above. Full: the training step in every mode
    # and the serving forward, each over a fresh cache (cold), then again over the filled one (warm).
    if ctx.quick:
        variants = [Variant("train step", "eager"), Variant("serving forward", "eager"), Variant("tower MLP", "eager"),
                    Variant("tower MLP", "default", cold=False)]
    else:
        variants = [Variant("train step", "eager"), Variant("serving forward", "eager"),
                    *(Variant("train step", m) for m in ("default", "reduce-overhead", "max-autotune")),
                    Variant("serving forward", "default")]
    results, broken = [], None
    for v in variants:
        if broken and v.mode != "eager":
            if v.mode != "default":  # aot_eager has no modes: one row is enough
                continue
            v = dataclasses.replace(v, backend="aot_eager")
        row, problem = measure_compiled(ctx, v, model, batches, rounds, warm=not ctx.quick and v.mode == "default")
        broken = broken or problem
        results.append(row)
    eager = {r["target"]: r["steady_ms"] for r in results if r["mode"] == "eager"}
    for r in results:
        r["compile_s"] = max(0.0, r["first_call_s"] - eager[r["target"]] / 1000) if r["mode"] != "eager" else 0.0
        r["warm_compile_s"] = (None if r["warm_first_call_s"] is None
                               else max(0.0, r["warm_first_call_s"] - eager[r["target"]] / 1000))
        r["speedup"] = eager[r["target"]] / r["steady_ms"]
        r["break_even_calls"] = break_even(r["compile_s"], eager[r["target"]], r["steady_ms"]) if r["mode"] != "eager" else None
    order = ["train step", "serving forward", "tower MLP"]
    results.sort(key=lambda r: (order.index(r["target"]), r["mode"] != "eager"))

    rows_src = ctx.rows(size * 40)
    rows_src = rows_src.filter(rows_src["clicked"])
    lengths_used = LENGTHS[ctx.quick]
    per_length = {L: [pad_history(Collator(max_history=L)(rows_src.slice(i * size, size)), L).to(ctx.device)
                      for i in range(2)] for L in lengths_used}  # exactly L: a batch's own longest may be shorter
    length_backend = "eager" if ctx.quick else ("aot_eager" if broken else "inductor")
    lengths = variable_lengths(ctx, model, per_length, length_backend, 1 if ctx.quick else rounds)

    compiled_train = [r for r in results if r["mode"] != "eager" and r["target"] == "train step"]
    best = min(compiled_train, key=lambda r: r["steady_ms"]) if compiled_train else None
    serve = next(r for r in results if r["target"] != "train step" and r["mode"] != "eager")
    train_wins = best is not None and best["speedup"] > 1.05
    verdict = (f"{'torch.compile (' + best['mode'] + ')' if train_wins else 'eager'} for training"
               + (f", paying back its compile after {best['break_even_calls']:,.0f} steps" if train_wins
                  and best["break_even_calls"] is not None else "")
               + f"; {'compiled' if serve['speedup'] > 1.05 else 'eager'} for serving")

    def be(r: dict) -> str:
        return "never (not faster)" if r["break_even_calls"] is None else f"{r['break_even_calls']:,.0f} calls"

    tables = [
        Table(f"Graph breaks in the training loss (torch._dynamo.explain; batch of {size} clicked rows)",
              ["reason", "where (feedrank)", "count"], reasons or [["none", "-", 0]]),
        Table("Eager vs torch.compile (compile = first call - one eager call; cold: a fresh inductor cache, "
              "warm: the same compile again over the filled cache)",
              ["target", "mode", "backend", "inductor cache", "compile s", "compile s (warm)", "steady ms", "speedup",
               "graph breaks", "graphs", "recompiles", "break-even"],
              [[r["target"], r["mode"], r["backend"], r["cache"], round(r["compile_s"], 2),
                "-" if r["warm_compile_s"] is None else round(r["warm_compile_s"], 2), round(r["steady_ms"], 3),
                round(r["speedup"], 2), r["graph_breaks"], r["graphs"], r["recompiles"],
                "-" if r["mode"] == "eager" else be(r)] for r in results]),
        Table(f"Variable-length histories (lengths {', '.join(map(str, lengths_used))}) through the compiled "
              f"serving forward, backend {length_backend}",
              ["strategy", "graphs compiled", "recompiles (after the first call)", "first calls s (total)",
               "steady ms (mean over lengths)"],
              [[r["strategy"], r["compiles"], r["recompiles"], round(r["first_calls_s"], 2), round(r["steady_ms_mean"], 3)]
               for r in lengths]),
    ]
    lead = (f"Inductor does not work here ({broken}); compiled variants use aot_eager. " if broken else
            "Inductor's C++ backend works here (g++ found). ")
    quick_note = ("Quick mode compiles only a tiny model (the item tower's MLP, forward + backward, mode default, "
                  "over the machine's inductor cache: a fresh one costs 20-40 s of C++ compiles on 2 cores) and counts "
                  "variable-length compiles with the eager backend (how often dynamo recompiles does not depend on "
                  "the backend, only the price of each compile does); run without --quick for the training step in "
                  "every mode, cold and warm. " if ctx.quick else "")
    train_line = ("" if best is None else
                  f"Training step: eager {eager['train step']:.2f} ms, best compiled ({best['mode']}) "
                  f"{best['steady_ms']:.2f} ms after {best['compile_s']:.1f} s of cold compile "
                  f"({best['speedup']:.2f}x), break-even {be(best)}. ")
    summary = (
        f"{lead}{quick_note}Dynamo captures the training loss as {graphs} graph(s) ({breaks} breaks; the top reason: "
        f"{reasons[0][0] if reasons else 'none'} at {reasons[0][1] if reasons else '-'}). {train_line}"
        f"{serve['target'].capitalize()}: eager {eager[serve['target']]:.3f} ms vs compiled "
        f"{serve['steady_ms']:.3f} ms after {serve['compile_s']:.1f} s of compile (cache {serve['cache']}; "
        f"break-even {be(serve)}). "
        f"Verdict: {verdict}. The model is a few small matmuls per call, so launch and guard overhead, not "
        f"arithmetic, bounds what compile can save; "
        + (f"{breaks} graph breaks split the loss into {graphs} graphs, each compiled and guarded on its own; "
           if breaks else "with no graph break the loss is one graph, so compile sees the whole step; ")
        + "compile pays back only when (eager - compiled) per call times the calls of a run exceeds the compile "
        f"time, on fixed shapes. Variable lengths: "
        f"dynamic=False compiled {lengths[0]['compiles']} graphs for {len(lengths_used)} lengths, dynamic=True "
        f"{lengths[1]['compiles']}, padding to {len(BUCKETS)} buckets {lengths[2]['compiles']} (each graph break "
        f"multiplies these). Measured with 1 intra-op thread on 2 shared CPU cores: timings are noisy."
    )
    figures = {"graphs": graphs, "graph_breaks": breaks, "break_reasons": reasons, "modes": results,
               "variable_lengths": lengths, "inductor_problem": broken,
               "backend": "aot_eager" if broken else "inductor", "verdict": verdict,
               "seconds": time.perf_counter() - started}
    result = LabResult(NAME, TITLE, summary, tables, _plot(ctx, results, lengths, len(lengths_used)), figures, ctx.device, ctx.quick)
    write_result(ctx, result)
    return result
