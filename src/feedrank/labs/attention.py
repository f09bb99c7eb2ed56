"""Lab ``attention``: the history encoder's attention three ways, and whether a transformer pays.

Part 1, kernels. The transformer history encoder's ``MultiHeadAttention`` (``feedrank.models.attention``)
has three interchangeable kernels: ``einsum``, ``matmul`` (explicit ``bmm`` with the transposes and
head folding it needs) and ``sdpa`` (``F.scaled_dot_product_attention``). The lab takes the demo
two-tower's first attention block (one set of weights; only ``impl`` changes) and, on real item
embeddings of real histories, checks the three agree (forward and every gradient within 1e-5, fp32),
then measures at several history lengths and batch sizes:

- forward+backward time (median of reps);
- bytes saved for backward, exact: unique storages seen by ``saved_tensors_hooks``, the weights and
  the input excluded (they exist anyway), and how many of those bytes are ``n x n`` matrices;
- what the layout costs: contiguous copies (``aten::clone`` / ``copy_`` calls and bytes, counted
  with a ``TorchDispatchMode`` over forward and backward) and the largest tensor any op produced.

Inputs are ``ctx.long_histories``: real train histories joined end to end to any length (the demo
world's are at most 50), a quarter of every other row padded, so the mask path is always measured.

Part 2, the product question. Two two-towers are trained briefly on the lab's world with
``train_retrieval`` (the demo config; mean pooling vs a 1-layer transformer encoder), their holdout
NDCG@10 compared, and each bundle served in-process by the real ``FeedService``: N feed requests
for distinct known users (so every request runs the user tower; a cache hit would hide it). The
decision is printed from the lift and the added p99.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from feedrank.labs.base import DEMO_CONFIG, LabContext, LabResult, SavedTensors, Table, median_seconds
from feedrank.models.attention import ATTENTION_IMPLS, MultiHeadAttention

NAME = "attention"
TITLE = "Attention three ways (einsum, matmul, SDPA), and is a transformer history encoder worth its latency?"

TOLERANCE = 1e-5  # fp32: forward and gradients of the three kernels
COPY_OPS = frozenset({"clone", "copy_"})  # what .contiguous() / a non-viewable reshape / einsum's permutes call
ENCODERS = ("mean", "transformer")


# ------------------------------------------------------------------------------------------------
# inputs


def attention_block(ctx: LabContext) -> tuple[MultiHeadAttention, torch.nn.Embedding]:
    """The demo transformer two-tower's first self-attention and its item table (shared weights)."""
    model = ctx.two_tower(history_encoder="transformer")
    return model.user_tower.history_encoder.blocks[0].attn, model.item_tower.id_embedding


# ------------------------------------------------------------------------------------------------
# one kernel


def forward_backward(attn: MultiHeadAttention, impl: str, x: Tensor, mask: Tensor, grad_out: Tensor):
    """Output and gradients (input first, then every parameter) of self-attention with ``impl``."""
    attn.impl = impl
    x = x.detach().requires_grad_()
    out = attn(x, x, mask)
    params = list(attn.parameters())
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out.detach(), grads


def tolerance_ratio(a: Tensor, b: Tensor) -> float:
    """max |a - b| / (TOLERANCE * max(1, max |b|)): <= 1 is agreement to 1e-5.

    Absolute for tensors of scale <= 1 (outputs, input gradients), relative to the tensor's largest
    value above that: a weight gradient sums B x n products (8,000 at n = 1000), its entries reach
    ~100, and SDPA's fused kernel sums them in another order, so they differ by ~3e-5 absolute
    while the relative difference is ~5e-7: fp32 rounding, not a bug."""
    return float((a - b).abs().max() / (TOLERANCE * max(1.0, float(b.abs().max()))))


def agreement(attn: MultiHeadAttention, x: Tensor, mask: Tensor) -> dict[str, dict[str, float]]:
    """Each kernel against einsum: max |difference| and ``tolerance_ratio`` of the output and of
    the gradients (input and every parameter), for a fixed random output gradient."""
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    ref_out, ref_grads = forward_backward(attn, "einsum", x, mask, grad_out)
    diffs = {}
    for impl in ATTENTION_IMPLS:
        out, grads = forward_backward(attn, impl, x, mask, grad_out)
        pairs = list(zip(grads, ref_grads))
        diffs[impl] = {"forward": float((out - ref_out).abs().max()),
                       "grad": max(float((g - r).abs().max()) for g, r in pairs),
                       "ratio": max(tolerance_ratio(out, ref_out), *(tolerance_ratio(g, r) for g, r in pairs))}  # fmt: skip
    return diffs


class OpTrace(TorchDispatchMode):
    """Every aten op of a region (forward and backward): copies made for layout, largest output."""

    def __init__(self) -> None:
        super().__init__()
        self.copies, self.copy_bytes, self.largest, self.ops = 0, 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.nbytes)
                if name in COPY_OPS:
                    self.copies += 1
                    self.copy_bytes += t.nbytes
        return out


@dataclass
class KernelRun:
    impl: str
    batch: int
    length: int
    ms: float  # forward + backward, median
    saved_bytes: int  # saved for backward, weights and input excluded
    saved_nxn_bytes: int  # of which [.., n, n] matrices
    copies: int  # aten::clone / copy_ calls in forward + backward
    copy_bytes: int
    largest_bytes: int  # the largest tensor any op produced
    nxn_bytes: int  # one fp32 [B, H, n, n] attention matrix, for scale


def measure(attn: MultiHeadAttention, impl: str, x: Tensor, mask: Tensor, reps: int, device: str,
            budget_s: float | None = None) -> KernelRun:  # fmt: skip
    attn.impl = impl
    b, n = mask.shape
    grad_out = torch.ones_like(x)
    leaf = x.detach().requires_grad_()

    def step() -> None:
        leaf.grad = None
        attn.zero_grad(set_to_none=True)
        attn(leaf, leaf, mask).backward(grad_out)

    with SavedTensors(exclude=[*attn.parameters(), leaf]) as saved:
        out = attn(leaf, leaf, mask)
    out.backward(grad_out)
    saved_nxn = sum(nbytes for nbytes, shapes in saved.storages if any(s[-2:] == (n, n) for s in shapes))
    with OpTrace() as trace:
        step()  # also the timing's warm-up
    ms = median_seconds(step, reps, warmup=0, device=device, budget_s=budget_s) * 1000.0
    return KernelRun(impl, b, n, ms, saved.bytes, saved_nxn, trace.copies, trace.copy_bytes, trace.largest,
                     b * attn.n_heads * n * n * 4)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# the product question


def train_encoders(ctx: LabContext) -> dict[str, Any]:
    """Mean pooling and the transformer encoder, each trained briefly by ``train_retrieval``: bundles."""
    from feedrank.train.retrieval import load_run_config, train_retrieval

    cfg = load_run_config(DEMO_CONFIG)
    schedule = ctx.scaled(full={"epochs": 1}, quick={"epochs": 1}, tiny={"epochs": None, "steps": 3})
    cfg = dataclasses.replace(
        cfg,
        features=dataclasses.replace(cfg.features, split_at=ctx.split_at()),
        train=dataclasses.replace(cfg.train, device=ctx.device, seed=ctx.seed, progress=False, **schedule),
        eval=dataclasses.replace(cfg.eval, max_users=ctx.scaled(3000, 1000, 200)),
    )
    bundles = {}
    for encoder in ENCODERS:
        run_dir = ctx.out / "runs" / encoder
        shutil.rmtree(run_dir / "train", ignore_errors=True)  # this lab's own earlier run; features are reused
        run = dataclasses.replace(cfg, two_tower=dataclasses.replace(cfg.two_tower, history_encoder=encoder))
        bundles[encoder] = train_retrieval(ctx.world_log(), run_dir, run, progress=False)
    return bundles


def feed_latencies(ctx: LabContext, bundles: dict[str, Any], n_requests: int) -> dict[str, dict[str, float]]:
    """Per bundle, p50/p99 of ``FeedService.feed`` (total and the user-tower stage) over distinct
    known users. The services answer alternately, user by user, so a load spike on a shared
    machine lands on both rather than on whichever ran second."""
    import faiss

    from feedrank.data.log import read_events
    from feedrank.serving.config import EventLogConfig, ServingConfig
    from feedrank.serving.pipeline import FeedService, set_threads

    split_at = dt.datetime.fromisoformat(ctx.split_at())
    seen = read_events(ctx.world_log(), columns=["user_id"], end=split_at)  # users with a history at serving time
    users = list(dict.fromkeys(seen["user_id"].to_pylist()))
    warmup = min(10, len(users) // 4)
    threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    services: dict[str, FeedService] = {}
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in bundles}
    try:
        for name, bundle in bundles.items():
            log_cfg = EventLogConfig(dir=str(ctx.out / "serving_log" / name), durable=False)
            cfg = ServingConfig(start_time=ctx.split_at(), event_log=log_cfg)
            services[name] = FeedService(bundle, cfg, log_dir=ctx.world_log())
        set_threads(cfg.torch_threads)  # as the server does
        for i, user in enumerate(users[: warmup + n_requests]):
            for name, service in services.items():
                response = service.feed(user)
                if i >= warmup:
                    timings[name].append({**response.timings_ms, "tower": float(response.path == "tower")})
    finally:
        for service in services.values():
            service.close()
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    out = {}
    for name, rows in timings.items():
        total, user = np.array([r["total"] for r in rows]), np.array([r["user"] for r in rows])
        out[name] = {"requests": len(rows), "tower_share": float(np.mean([r["tower"] for r in rows])),
                     "p50_ms": float(np.percentile(total, 50)), "p99_ms": float(np.percentile(total, 99)),
                     "user_p50_ms": float(np.percentile(user, 50)), "user_p99_ms": float(np.percentile(user, 99))}  # fmt: skip
    return out


def decision(ndcg: dict[str, float], latency: dict[str, dict[str, float]], budget_ms: float) -> str:
    """The sentence the product question ends with, computed from the measured lift and latency."""
    lift = ndcg["transformer"] - ndcg["mean"]
    rel = lift / ndcg["mean"] if ndcg["mean"] else float("nan")
    added = latency["transformer"]["p99_ms"] - latency["mean"]["p99_ms"]
    p99 = latency["transformer"]["p99_ms"]
    head = (f"A transformer pays for itself only if {lift:+.4f} NDCG@10 ({rel:+.1%}) on the holdout is worth "
            f"{added:+.2f} ms of p99 per feed request ({latency['mean']['p99_ms']:.2f} -> {p99:.2f} ms, "
            f"budget {budget_ms:.0f} ms).")  # fmt: skip
    if lift <= 0:
        return head + " Here it does not: it is no better on NDCG@10, so keep mean pooling."
    if added <= 0:
        return head + " Here it does: better NDCG@10 at no measurable p99 cost."
    fits = "fits" if p99 <= budget_ms else "does not fit"
    return head + (f" Here it buys {lift / added:.4f} NDCG@10 per added ms and {fits} the latency budget: "
                   "take it if that exchange rate beats the next-best use of those milliseconds.")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# report


def _plots(ctx: LabContext, runs: list[KernelRun]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for key, ylabel, file in (("ms", "forward+backward ms", "time_vs_length.png"),
                              ("saved_bytes", "bytes saved for backward", "saved_bytes_vs_length.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for impl, style in zip(ATTENTION_IMPLS, ("-", "--", ":")):  # einsum and matmul often overlap
            for batch, marker in zip(sorted({r.batch for r in runs}), "os^v"):
                pts = sorted((r.length, getattr(r, key)) for r in runs if r.impl == impl and r.batch == batch)
                ax.plot(*zip(*pts), linestyle=style, marker=marker, label=f"{impl}, batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="history length n", ylabel=ylabel, title=f"{ylabel} vs history length")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(ctx.out / file, dpi=100)
        plt.close(fig)
        names.append(file)
    return names


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def _layout_summary(runs: list[KernelRun], diffs: dict[str, dict[str, dict[str, float]]]) -> str:
    """The memory-layout argument, every clause read off the measurements at the largest size."""
    big = max(runs, key=lambda r: (r.length, r.batch))
    at = {r.impl: r for r in runs if (r.length, r.batch) == (big.length, big.batch)}
    worst = max(per["ratio"] for d in diffs.values() for per in d.values())

    def kernel(r: KernelRun) -> str:
        made = "materialises" if r.largest_bytes >= r.nxn_bytes else "never materialises"
        return (f"{r.impl} {made} it (largest tensor {_mb(r.largest_bytes)} MB), saves {_mb(r.saved_bytes)} MB for "
                f"backward ({_mb(r.saved_nxn_bytes)} MB of it in n x n storages), makes {r.copies} contiguous copies "
                f"({_mb(r.copy_bytes)} MB) and takes {r.ms:.1f} ms")  # fmt: skip

    small = min(runs, key=lambda r: (r.length, r.batch))
    growth = {impl: at[impl].saved_bytes / max(1, next(r for r in runs if r.impl == impl and
                                                        (r.length, r.batch) == (small.length, big.batch)).saved_bytes)
              for impl in at}  # fmt: skip
    return (
        f"The three kernels {'agree' if worst <= 1 else 'DISAGREE'}: the worst forward or gradient error against "
        f"einsum is {worst:.2f}x the tolerance (max |a - b| <= {TOLERANCE:g} max(1, max |b|) per tensor, fp32). "
        f"At n = {big.length}, batch {big.batch}, one fp32 attention matrix [B, H, n, n] is {_mb(big.nxn_bytes)} MB: "
        + "; ".join(kernel(at[i]) for i in ATTENTION_IMPLS) + ". "
        "Why: the heads are a transposed view of the projections ([B, n, H, d] -> [B, H, n, d]); bmm needs "
        "3-D batches, so einsum (which lowers to permute + reshape + bmm) and matmul (reshape(b*h, n, d) of q, "
        "k, v, and again for the output and the gradients) copy them into contiguous memory, and both compute "
        "the full score matrix, whose softmax output they keep for backward. SDPA is one fused kernel "
        "(_scaled_dot_product_flash_attention_for_cpu on CPU) that reads the strided views as they are and "
        "tiles the softmax, keeping q, k, v, the output and one log-sum-exp per row. "
        f"From n = {small.length} to {big.length} the saved bytes grow "
        + ", ".join(f"{growth[i]:.0f}x ({i})" for i in ATTENTION_IMPLS)
        + f": the explicit kernels' as n^2 once the matrix dominates, SDPA's as n ({big.length // small.length}x)."
    )


def run(ctx: LabContext) -> LabResult:
    torch.manual_seed(ctx.seed)
    attn, table = attention_block(ctx)
    attn, table = attn.to(ctx.device), table.to(ctx.device)
    lengths = ctx.scaled(full=[50, 200, 1000], quick=[50, 200, 1000], tiny=[8, 16])
    batches = ctx.scaled(full=[8, 32], quick=[2, 8], tiny=[2, 3])
    reps = ctx.scaled(full=10, quick=3, tiny=1)
    budget_s = ctx.scaled(full=3.0, quick=1.0)  # per measurement: the n = 1000 points get fewer reps

    # agreement: a real padded batch (with empty histories, if any) and every measured size
    real = ctx.batches(n=1, batch_size=ctx.scaled(256, 64, 16), max_history=30)[0]
    with torch.no_grad():
        x_real = table(real.history.to(ctx.device))
    diffs = {f"real batch {tuple(real.history.shape)}": agreement(attn, x_real, real.history_mask.to(ctx.device))}
    runs = []
    for length in lengths:
        for batch in batches:
            history, mask = ctx.long_histories(batch, length)
            with torch.no_grad():
                x = table(history.to(ctx.device))
            mask = mask.to(ctx.device)
            if batch == batches[0]:
                diffs[f"n={length}, batch {batch}"] = agreement(attn, x, mask)
            runs += [measure(attn, impl, x, mask, reps, ctx.device, budget_s) for impl in ATTENTION_IMPLS]
    agree = all(per["ratio"] <= 1.0 for d in diffs.values() for per in d.values())

    bundles = train_encoders(ctx)
    ndcg = {e: float(b.metrics["eval"]["models"]["two_tower"]["ndcg@10"]["value"]) for e, b in bundles.items()}
    n_requests = ctx.scaled(full=500, quick=200, tiny=10)
    latency = feed_latencies(ctx, bundles, n_requests)
    from feedrank.serving.config import ServingConfig

    verdict = decision(ndcg, latency, ServingConfig().latency_budget_ms)

    tables = [
        Table("Kernels: forward+backward time and memory (fp32, saved bytes exclude weights and input)",
              ["impl", "batch", "n", "fwd+bwd ms", "saved MB", "saved n x n MB", "copies", "copy MB", "largest tensor MB"],
              [[r.impl, r.batch, r.length, round(r.ms, 3), _mb(r.saved_bytes), _mb(r.saved_nxn_bytes), r.copies,
                _mb(r.copy_bytes), _mb(r.largest_bytes)] for r in runs]),
        Table("Agreement with einsum: max |difference|",
              ["input", "impl", "forward", "gradients", "of tolerance"],
              [[where, impl, f"{d['forward']:.1e}", f"{d['grad']:.1e}", round(d["ratio"], 3)] for where, per in diffs.items()
               for impl, d in per.items() if impl != "einsum"]),
        Table("Transformer vs mean pooling: holdout quality and feed latency (FeedService, in-process)",
              ["encoder", "NDCG@10", "feed p50 ms", "feed p99 ms", "user tower p50 ms", "user tower p99 ms", "requests"],
              [[e, round(ndcg[e], 4), round(latency[e]["p50_ms"], 3), round(latency[e]["p99_ms"], 3),
                round(latency[e]["user_p50_ms"], 3), round(latency[e]["user_p99_ms"], 3), latency[e]["requests"]]
               for e in ENCODERS]),
    ]  # fmt: skip
    summary = "\n\n".join([
        _layout_summary(runs, diffs) + ("" if agree else " WARNING: the kernels disagree beyond the tolerance."),
        f"Product question (two-towers trained {'3 steps' if ctx.tiny else '1 epoch'} each on "
        f"{ctx.world_log().name}; {latency['mean']['requests']} feed requests each, every one computing the "
        f"user tower): mean pooling NDCG@10 {ndcg['mean']:.4f}, transformer {ndcg['transformer']:.4f}; feed p99 "
        f"{latency['mean']['p99_ms']:.2f} vs {latency['transformer']['p99_ms']:.2f} ms.",
        verdict,
    ])  # fmt: skip
    return LabResult(
        name=NAME, title=TITLE, summary=summary, tables=tables, plots=_plots(ctx, runs),
        figures={"tolerance": TOLERANCE, "agree": agree, "agreement": diffs,
                 "kernels": [dataclasses.asdict(r) for r in runs],
                 "product": {"ndcg@10": ndcg, "latency": latency, "decision": verdict,
                             "ndcg_lift": ndcg["transformer"] - ndcg["mean"],
                             "added_p99_ms": latency["transformer"]["p99_ms"] - latency["mean"]["p99_ms"]}},
        device=ctx.device, quick=ctx.quick,
    )  # fmt: skip
