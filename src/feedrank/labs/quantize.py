"""Lab "quantize": serving-side quantization of the ranker (``feedrank.models.quantize``).

A ranker trained here in fp32 (the precision lab's ranker task, feedrank's Trainer) is quantized
every way ``quantize_ranker`` offers: dynamic int8 Linear layers (all of them, as the audit did,
or only the large ones), row-wise int8 and fp16 embedding tables, int8 Linear + embeddings, and
the large Linear layers with bf16 weights (fp32 accumulation: a CPU with AVX512-BF16 runs the GEMM
in bf16 with no per-call scale to compute).
For each: the saved model's bytes, the latency of ``Ranker.score_candidates`` for 500 candidates of
one user (the call ``FeedService._scores`` makes, under ``torch.inference_mode``; 1 thread, the
serving default ``torch_threads``, and 2), and the holdout click AUC and NDCG@10 of the value score
per request, against a tolerance (``TOLERANCE``).

Why int8 can be *slower*: ``torch.profiler``'s op table for fp32 and all-Linear int8, and sweeps of
the candidate count, the thread count and the quantized engine (x86, fbgemm, qnnpack, onednn).

The int8 kernels are CPU-only: with ``--device cuda`` the ranker trains on the GPU and is then
quantized and timed on the CPU, where serving runs it.

Example::

    ctx = LabContext(root=Path("runs/labs"), name="quantize", quick=True)
    write_result(ctx, run(ctx))
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from feedrank.data.batch import Batch
from feedrank.labs import precision
from feedrank.labs.base import LabContext, LabResult, Table, intra_op_threads
from feedrank.models.quantize import DEFAULT_MIN_LINEAR_PARAMS, model_bytes, quantize_ranker
from feedrank.models.ranker import ItemInputs, UserInputs

NAME = "quantize"
TITLE = "Serving-side quantization of the ranker: int8 / bf16 Linear, int8 / fp16 embedding tables"

#: A variant may ship when it loses at most this much holdout quality against fp32. A choice: 0.002
#: AUC is a tenth of what 270 more training steps add to the demo ranker (0.619 -> 0.640), small
#: enough that nobody would trade it for bytes or speed knowingly; NDCG@10 per request is noisier
#: (few clicks per request), hence 0.005.
TOLERANCE = {"auc": 0.002, "ndcg@10": 0.005}
N_CANDIDATES = 500  # what serving scores per request (ann_candidates)

#: name -> (quantize mode, min_linear_params); "int8_linear_all" is what the audit measured.
VARIANTS: dict[str, tuple[str, int]] = {
    "fp32": ("none", 0),
    "int8_linear_all": ("int8_linear", 0),
    "int8_linear": ("int8_linear", DEFAULT_MIN_LINEAR_PARAMS),
    "int8_embeddings": ("int8_embeddings", 0),
    "fp16_embeddings": ("fp16_embeddings", 0),
    "int8": ("int8", DEFAULT_MIN_LINEAR_PARAMS),
    "bf16_linear": ("bf16_linear", DEFAULT_MIN_LINEAR_PARAMS),
}


def candidates(holdout: list[Batch], n: int) -> tuple[UserInputs, ItemInputs]:
    """One holdout user's inputs and ``n`` holdout candidates (rows repeated when there are fewer)."""
    first = holdout[0]
    n_user = 2  # user counters come first (feedrank.features.COUNTER_COLUMNS)
    mask = first.history_mask[0]
    user = UserInputs(user=first.user[0], user_cats=first.user_cats[0], history=first.history[0][mask],
                      counters=first.counters[0, :n_user])  # fmt: skip
    rows = torch.arange(n) % sum(len(x) for x in holdout)
    cat = lambda name: torch.cat([getattr(x, name) for x in holdout])[rows]  # noqa: E731
    items = ItemInputs(item=cat("item"), item_cats=cat("item_cats"), item_age_h=cat("item_age_h"),
                       counters=cat("counters")[:, n_user:].contiguous())  # fmt: skip
    return user, items


def latencies(models: dict[str, nn.Module], user: UserInputs, items: ItemInputs, reps: int,
              threads: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """p50 / p90 wall time (ms) of each model's ``score_candidates(user, items)`` on ``threads``
    intra-op threads. The models take turns call by call, so load from other processes on a shared
    machine hits them all alike instead of whichever happened to run during a busy second."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with intra_op_threads(threads):
        with torch.inference_mode():
            for m in models.values():
                for _ in range(3):
                    m.score_candidates(user, items)
            for _ in range(reps):
                for name, m in models.items():
                    t = time.perf_counter()
                    m.score_candidates(user, items)
                    times[name].append(time.perf_counter() - t)
    return {name: {"min": 1e3 * min(t), "p50": 1e3 * statistics.median(t), "p90": 1e3 * float(np.quantile(t, 0.9))}
            for name, t in times.items()}  # fmt: skip


@torch.no_grad()
def holdout_quality(model: nn.Module, holdout: list[Batch]) -> dict[str, float]:
    """Click AUC of the click probability and NDCG@10 of the value score per request (clicks as gains)."""
    from feedrank.evaluate.metrics import auc, ndcg_at_k

    preds = [model.predict(b) for b in holdout]
    clicked = np.concatenate([b.clicked.numpy() for b in holdout])
    click = np.concatenate([p["click"].numpy() for p in preds])
    value = np.concatenate([p["value"].numpy() for p in preds])
    request = np.concatenate([b.request.numpy() for b in holdout])
    return {"auc": auc(clicked, click), "ndcg@10": ndcg_at_k(clicked, value, 10, groups=request)}


def op_table(model: nn.Module, user: UserInputs, items: ItemInputs, calls: int, top: int = 8) -> tuple[list[list[Any]], dict[str, float]]:
    """``torch.profiler``'s top ops by self CPU time per ``score_candidates`` call (1 thread), and the
    per-call totals: all ops, and the int8 path's quantize/dequantize/qparams and int8 GEMM ops."""
    from torch.profiler import ProfilerActivity, profile

    with intra_op_threads(1), torch.inference_mode():
        model.score_candidates(user, items)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model.score_candidates(user, items)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [[e.key, round(e.count / calls, 1), round(e.self_cpu_time_total / calls, 1)] for e in events[:top]]
    quant = [e for e in events if any(k in e.key for k in ("quantize", "qparams", "linear_dynamic", "dequant"))]
    gemm = [e for e in events if e.key in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")]
    totals = {
        "self_us_per_call": sum(e.self_cpu_time_total for e in events) / calls,
        "ops_per_call": sum(e.count for e in events) / calls,
        "int8_path_us_per_call": sum(e.self_cpu_time_total for e in quant) / calls,
        "fp32_gemm_us_per_call": sum(e.self_cpu_time_total for e in gemm) / calls,
    }
    return rows, totals


def _with_engine(engine: str, fn: Callable[[], Any]) -> Any:
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        return fn()
    finally:
        torch.backends.quantized.engine = before


def _plot(ctx: LabContext, sweep: dict[str, dict[int, float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sweep.items():
        ns = sorted(points)
        ax.plot(ns, [points[n] for n in ns], "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(title="score_candidates latency (min over calls, 1 thread) by candidate count", xlabel="candidates", ylabel="ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ctx.out / "latency_by_candidates.png", dpi=110)
    plt.close(fig)
    return "latency_by_candidates.png"


def run(ctx: LabContext) -> LabResult:
    steps, batch_size, n_holdout, reps = (30, 512, 3, 20) if ctx.quick else (300, 1024, 20, 200)
    train_batches, holdout = precision.split_batches(ctx, steps, n_holdout, batch_size)
    task = next(t for t in precision.tasks(ctx) if t.name == "ranker")
    with intra_op_threads(precision.CPU_THREADS) if ctx.device == "cpu" else contextlib.nullcontext():
        fp32 = precision.train(ctx, task, "fp32", train_batches, holdout, steps).model.cpu().eval()
    user, items = candidates(holdout, N_CANDIDATES)

    models = {name: quantize_ranker(fp32, mode, min_params) for name, (mode, min_params) in VARIANTS.items()}
    quality = {name: holdout_quality(m, holdout) for name, m in models.items()}
    size = {name: model_bytes(m) for name, m in models.items()}
    latency = latencies(models, user, items, reps, 1)
    threaded = {t: latencies({k: models[k] for k in ("fp32", "int8_linear_all")}, user, items, reps, t) for t in (1, 2)}
    passes = {name: all(quality["fp32"][k] - quality[name][k] <= tol for k, tol in TOLERANCE.items()) for name in models}

    ops = {name: op_table(models[name], user, items, calls=reps) for name in ("fp32", "int8_linear_all")}
    counts = (100, 500, 2000, 8000) if not ctx.quick else (100, 500, 2000)
    swept = ("fp32", "int8_linear_all", "int8_linear")
    sweep: dict[str, dict[int, float]] = {name: {} for name in swept}
    for n in counts:
        u, it = candidates(holdout, n)
        for name, t in latencies({k: models[k] for k in swept}, u, it, max(5, reps * 500 // (3 * n)), 1).items():
            sweep[name][n] = t["min"]
    # Packed int8 weights are engine-specific: quantize under each engine, time under it.
    engines = {}
    for engine in (e for e in ("x86", "fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines):
        q = _with_engine(engine, lambda: quantize_ranker(fp32, "int8_linear", 0))
        engines[engine] = _with_engine(engine, lambda: latencies({"fp32": fp32, engine: q}, user, items, reps, 1))
    plot = _plot(ctx, sweep)

    base = quality["fp32"]
    rows = [[name, VARIANTS[name][0], f"{size[name] / 1e6:.3f}", f"{size[name] / size['fp32']:.2f}",
             round(latency[name]["min"], 2), round(latency[name]["p50"], 2), round(latency[name]["p90"], 2),
             round(quality[name]["auc"], 4), f"{quality[name]['auc'] - base['auc']:+.4f}",
             round(quality[name]["ndcg@10"], 4), f"{quality[name]['ndcg@10'] - base['ndcg@10']:+.4f}",
             "pass" if passes[name] else "FAIL"] for name in models]  # fmt: skip
    op_rows = [[name, *row] for name, (table, _) in ops.items() for row in table]
    sweep_rows = [[n, *(round(sweep[name][n], 3) for name in swept), f"{sweep['int8_linear_all'][n] / sweep['fp32'][n]:.2f}"]
                  for n in counts]  # fmt: skip
    figures = {
        "tolerance": TOLERANCE, "n_candidates": N_CANDIDATES, "steps": steps, "engine": torch.backends.quantized.engine,
        "variants": {name: {"mode": VARIANTS[name][0], "min_linear_params": VARIANTS[name][1], "bytes": size[name],
                            "latency_ms": latency[name], **quality[name],
                            "passes": passes[name]} for name in models},
        "threads_min_ms": {str(t): {k: v["min"] for k, v in r.items()} for t, r in threaded.items()},
        "profile": {name: totals for name, (_, totals) in ops.items()},
        "latency_by_candidates_ms": {name: {str(n): v for n, v in points.items()} for name, points in sweep.items()},
        "engines_int8_linear_all_min_ms": {e: t[e]["min"] for e, t in engines.items()},
        "engines_fp32_min_ms": {e: t["fp32"]["min"] for e, t in engines.items()},
    }  # fmt: skip
    return LabResult(
        name=NAME, title=TITLE, summary=_summary(figures, base), plots=[plot], figures=figures, device=ctx.device,
        quick=ctx.quick,
        tables=[
            Table(f"Variants: bytes, {N_CANDIDATES}-candidate score_candidates latency (CPU), holdout quality "
                  f"(tolerance: AUC drop <= {TOLERANCE['auc']}, NDCG@10 drop <= {TOLERANCE['ndcg@10']})",
                  ["variant", "mode", "MB", "x fp32", "min ms", "p50 ms", "p90 ms",
                   "AUC", "dAUC", "NDCG@10", "dNDCG@10", "tolerance"], rows),
            Table(f"Top ops per score_candidates call ({N_CANDIDATES} candidates, 1 thread, torch.profiler)",
                  ["variant", "op", "calls/call", "self us/call"], op_rows),
            Table("Latency, min over calls (ms, 1 thread), by candidate count", ["candidates", *swept, "int8_linear_all / fp32"], sweep_rows),
            Table(f"Intra-op threads ({N_CANDIDATES} candidates, min ms)", ["threads", "fp32", "int8_linear_all"],
                  [[t, round(r["fp32"]["min"], 3), round(r["int8_linear_all"]["min"], 3)] for t, r in threaded.items()]),
            Table(f"int8 on every Linear by quantized engine ({N_CANDIDATES} candidates, 1 thread, min ms; fp32 timed "
                  "in turn with each)", ["engine", "int8 min ms", "fp32 min ms", "int8 / fp32"],
                  [[e, round(t[e]["min"], 3), round(t["fp32"]["min"], 3), f"{t[e]['min'] / t['fp32']['min']:.2f}"]
                   for e, t in engines.items()]),
        ],
    )  # fmt: skip


def _compare(ratio: float) -> str:
    """"1.12x slower" / "0.80x (faster)" / "about as fast" for an int8 / fp32 time ratio (5% counts as noise)."""
    if ratio > 1.05:
        return f"{ratio:.2f}x the fp32 time (slower)"
    if ratio < 0.95:
        return f"{ratio:.2f}x the fp32 time (faster)"
    return f"{ratio:.2f}x the fp32 time (the same, within noise)"


def _trend(r_lo: float, r_hi: float) -> str:
    if r_hi < r_lo - 0.05:
        return "int8 gains more the more rows a call scores"
    if r_hi > r_lo + 0.05:
        return "int8's gain does not grow with the rows per call here"
    return "the rows per call change little"


def _summary(f: dict[str, Any], base: dict[str, float]) -> str:
    """The lab's argument, from its ``figures`` alone (so it can be rebuilt from a result.json).
    Comparisons use the fastest of the interleaved calls (other processes only add time); p50 is
    what a request sees on this machine."""
    v, p, sweep = f["variants"], f["profile"], f["latency_by_candidates_ms"]
    ms = lambda name: v[name]["latency_ms"]["min"]  # noqa: E731
    p50 = lambda name: v[name]["latency_ms"]["p50"]  # noqa: E731
    threads = f["threads_min_ms"]
    mb = lambda name: v[name]["bytes"] / 1e6  # noqa: E731
    fp, q_all = p["fp32"], p["int8_linear_all"]
    counts = sorted(int(n) for n in sweep["fp32"])
    lo, hi = str(counts[0]), str(counts[-1])
    ratio = lambda name, n: sweep[name][n] / sweep["fp32"][n]  # noqa: E731
    engines = ", ".join(f"{e} {t / f['engines_fp32_min_ms'][e]:.2f}x" for e, t in f["engines_int8_linear_all_min_ms"].items())
    shipped = [name for name in VARIANTS if name != "fp32" and v[name]["passes"]]
    best = min(VARIANTS, key=ms)
    two = threads["2"]["fp32"] / threads["1"]["fp32"]
    return (
        f"Bytes (saved state dict): fp32 {mb('fp32'):.2f} MB; int8 Linear + int8 embeddings {mb('int8'):.2f} MB "
        f"({v['int8']['bytes'] / v['fp32']['bytes']:.0%}), int8 Linear alone {mb('int8_linear_all'):.2f} MB, int8 "
        f"embeddings alone {mb('int8_embeddings'):.2f} MB, fp16 embeddings {mb('fp16_embeddings'):.2f} MB (the demo "
        "ranker's MLP and cross layers outweigh its small tables; a production catalogue reverses that). "
        f"score_candidates for {f['n_candidates']} candidates on 1 thread (the serving setting), fastest call: fp32 "
        f"{ms('fp32'):.2f} ms; int8 on every Linear {ms('int8_linear_all'):.2f} ms, "
        f"{_compare(ms('int8_linear_all') / ms('fp32'))}; int8 on the >= 4096-weight Linears only "
        f"{ms('int8_linear'):.2f} ms ({_compare(ms('int8_linear') / ms('fp32'))}); int8 embeddings "
        f"{ms('int8_embeddings'):.2f} ms; fp16 embeddings {ms('fp16_embeddings'):.2f} ms; int8 {ms('int8'):.2f} ms "
        f"(fastest: {best}; p50 on this shared machine fp32 {p50('fp32'):.2f}, int8 Linear {p50('int8_linear_all'):.2f} "
        f"ms). Which kernels run (torch.profiler, per call): fp32 runs {fp['ops_per_call']:.0f} ops and spends "
        f"{fp['fp32_gemm_us_per_call']:.0f} us in its 14 GEMMs (aten::addmm); int8 runs {q_all['ops_per_call']:.0f} ops "
        f"and replaces them by quantized::linear_dynamic, {q_all['int8_path_us_per_call']:.0f} us, which per layer and "
        "call finds the activation's range, quantizes it to uint8, runs the int8 GEMM and dequantizes: a fixed cost "
        "per layer that only a large GEMM amortises, and this ranker's 14 Linears are small (176x176 at most; 4 "
        "one-output heads and 1- to 3-input dense fields)"
        f"{': leaving the small ones in fp32 is faster' if ms('int8_linear') < ms('int8_linear_all') else ''}. "
        f"By candidate count (fastest call): at {lo} candidates int8-everywhere takes "
        f"{ratio('int8_linear_all', lo):.2f}x the fp32 time (large-only {ratio('int8_linear', lo):.2f}x), at {hi} "
        f"{ratio('int8_linear_all', hi):.2f}x (large-only {ratio('int8_linear', hi):.2f}x): "
        f"{_trend(ratio('int8_linear_all', lo), ratio('int8_linear_all', hi))}. Engines (int8 / fp32, "
        f"{f['n_candidates']} candidates): {engines} (qnnpack is the ARM/mobile engine; x86 is the default here). "
        f"Threads, fp32 / int8: 1 thread {threads['1']['fp32']:.2f} / {threads['1']['int8_linear_all']:.2f} ms, 2 "
        f"threads {threads['2']['fp32']:.2f} / {threads['2']['int8_linear_all']:.2f} ms ({two:.2f}x and "
        f"{threads['2']['int8_linear_all'] / threads['1']['int8_linear_all']:.2f}x the 1-thread time; serving keeps "
        "one thread per request, since a second core serves a second request better than half of this one). "
        "Quality within the tolerance (AUC drop <= "
        f"{f['tolerance']['auc']}, NDCG@10 drop <= {f['tolerance']['ndcg@10']}): {', '.join(shipped) if shipped else 'no variant'}; "
        f"int8 {'passes' if v['int8']['passes'] else 'FAILS'} (AUC {base['auc']:.4f} -> {v['int8']['auc']:.4f}, "
        f"NDCG@10 {base['ndcg@10']:.4f} -> {v['int8']['ndcg@10']:.4f})."
    )
