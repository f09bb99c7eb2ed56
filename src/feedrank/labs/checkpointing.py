"""Lab ``checkpointing``: gradient checkpointing on the transformer history encoder, memory vs time.

Activation (gradient) checkpointing keeps only a region's inputs in the forward pass and recomputes
its activations during backward: less memory saved for backward, one extra forward of the region.
The lab measures that trade on the demo two-tower's transformer history encoder (4 pre-LN layers,
dropout 0.1, real item embeddings of real histories) for three policies:

- ``none``: every activation kept;
- ``every other layer``: layers 0, 2, ... checkpointed;
- ``every layer``: what ``TwoTowerConfig.grad_checkpointing`` does,

each with ``torch.utils.checkpoint`` (non-reentrant) and with ``checkpoint`` below, a from-scratch
checkpoint: a custom ``torch.autograd.Function`` that runs the region under ``no_grad`` (so nothing
inside is saved), saves only its inputs, and in backward re-runs it with grad enabled from the same
RNG state (so dropout draws the same mask) and autocast state, then back-propagates through the
recomputed graph. All of them must give the gradients of no checkpointing (checked, every
parameter) and ``every layer`` must equal the model's own ``grad_checkpointing``.

The policy is applied over the encoder's public ``blocks`` (``CheckpointedBlock`` wraps a chosen
block in place), so the encoder's own forward (positions, pooling) runs unchanged.

Bytes saved for backward are exact (``SavedTensors``: unique storages, weights and the embedded
history excluded): for a checkpointed layer they are its inputs, which both implementations keep.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from feedrank.labs.base import LabContext, LabResult, SavedTensors, Table, median_seconds

NAME = "checkpointing"
TITLE = "Gradient checkpointing on the transformer history encoder: saved bytes against step time"

N_LAYERS, DROPOUT = 4, 0.1
POLICIES = ("none", "every other layer", "every layer")
METHODS = ("torch.utils.checkpoint", "from scratch")
GRAD_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------
# the from-scratch checkpoint


def _cuda_devices(tensors: tuple[Any, ...]) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if isinstance(t, Tensor) and t.is_cuda})


class _Recompute(torch.autograd.Function):
    """Forward without saving activations; backward recomputes them (see ``checkpoint``)."""

    @staticmethod
    def forward(ctx, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        ctx.fn = fn
        ctx.devices = _cuda_devices(args)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.autocast = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda")}
        tensor_at = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.tensor_at, ctx.others = tensor_at, [None if i in tensor_at else a for i, a in enumerate(args)]
        ctx.save_for_backward(*(args[i] for i in tensor_at))  # the region's inputs: all it keeps
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        args = list(ctx.others)
        inputs = [saved.detach().requires_grad_(saved.requires_grad) for saved in ctx.saved_tensors]
        for i, tensor in zip(ctx.tensor_at, inputs):
            args[i] = tensor
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=ctx.devices))  # the caller's RNG is left alone
            torch.set_rng_state(ctx.cpu_rng)  # replay the forward's draws: the same dropout masks
            for device, state in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(state, device)
            stack.enter_context(torch.enable_grad())
            for kind, (on, dtype) in ctx.autocast.items():
                if on:
                    stack.enter_context(torch.autocast(kind, dtype=dtype))
            out = ctx.fn(*args)
        # Parameters of fn receive their gradients here (accumulated into .grad), as with the
        # reentrant torch.utils.checkpoint: use loss.backward(), not torch.autograd.grad(params).
        torch.autograd.backward(out, grad_out)
        grads = {i: t.grad for i, t in zip(ctx.tensor_at, inputs)}
        return (None, *(grads.get(i) for i in range(len(args))))


def checkpoint(fn: Callable[..., Tensor], *args: Any) -> Tensor:
    """``fn(*args)`` (one tensor out) with its activations recomputed in backward instead of saved.

    Example::

        y = checkpoint(block, x, mask)      # like torch.utils.checkpoint.checkpoint(block, x, mask)
        y.sum().backward()                  # block's forward runs again here, same dropout mask
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return _Recompute.apply(fn, *args)


# ------------------------------------------------------------------------------------------------
# policies over the encoder's blocks


class CheckpointedBlock(nn.Module):
    """A transformer block whose forward runs under ``method``'s checkpoint (only when grad is on)."""

    def __init__(self, block: nn.Module, method: str) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown checkpoint method {method!r}; choose one of {list(METHODS)}")
        self.block, self.method = block, method

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, mask)
        if self.method == "from scratch":
            return checkpoint(self.block, x, mask)
        return torch_checkpoint(self.block, x, mask, use_reentrant=False)


def checkpointed_layers(policy: str, n_layers: int) -> list[int]:
    """Which layers ``policy`` checkpoints."""
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpointing policy {policy!r}; choose one of {list(POLICIES)}")
    step = {"none": 0, "every other layer": 2, "every layer": 1}[policy]
    return list(range(0, n_layers, step)) if step else []


def apply_policy(encoder: nn.Module, policy: str, method: str) -> nn.Module:
    """Wrap the chosen blocks of a ``TransformerHistoryEncoder`` in place (its forward is unchanged)."""
    for i in checkpointed_layers(policy, len(encoder.blocks)):
        encoder.blocks[i] = CheckpointedBlock(encoder.blocks[i], method)
    return encoder


# ------------------------------------------------------------------------------------------------
# measurement


def build_encoder(ctx: LabContext, max_len: int, policy: str = "none", method: str = METHODS[0],
                  builtin: bool = False) -> tuple[nn.Module, nn.Embedding]:  # fmt: skip
    """The demo transformer two-tower's history encoder (same seed: same weights every call) and its
    item table; ``builtin``: the model's own ``grad_checkpointing`` instead of a policy."""
    model = ctx.two_tower(history_encoder="transformer", n_layers=N_LAYERS, max_history_len=max_len, dropout=DROPOUT,
                          grad_checkpointing=builtin)  # fmt: skip
    encoder = model.user_tower.history_encoder.train()
    return apply_policy(encoder, policy, method).to(ctx.device), model.item_tower.id_embedding.to(ctx.device)


def step_grads(encoder: nn.Module, emb: Tensor, mask: Tensor, seed: int) -> dict[str, Tensor]:
    """One forward+backward from a fixed RNG state; the gradient of every parameter, by block-relative name."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    encoder(emb, mask).square().sum().backward()
    return {name.replace(".block.", "."): p.grad.clone() for name, p in encoder.named_parameters()}


def max_grad_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different parameters: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@dataclass
class Run:
    length: int
    batch: int
    policy: str
    method: str
    saved_bytes: int
    step_ms: float
    grad_diff: float  # max |grad - grad without checkpointing|, every parameter


def measure(ctx: LabContext, length: int, batch: int, reps: int, budget_s: float | None = None) -> list[Run]:
    history, mask = ctx.long_histories(batch, length)
    history, mask = history.to(ctx.device), mask.to(ctx.device)
    runs, reference = [], None
    for policy in POLICIES:
        for method in METHODS[:1] if policy == "none" else METHODS:
            encoder, table = build_encoder(ctx, length, policy, method)
            with torch.no_grad():
                emb = table(history)
            grads = step_grads(encoder, emb, mask, ctx.seed)
            reference = grads if reference is None else reference
            with SavedTensors(exclude=[*encoder.parameters(), emb]) as saved:
                loss = encoder(emb, mask).square().sum()
            loss.backward()

            def step() -> None:
                encoder.zero_grad(set_to_none=True)
                encoder(emb, mask).square().sum().backward()

            ms = median_seconds(step, reps, device=ctx.device, budget_s=budget_s) * 1000.0
            runs.append(Run(length, batch, policy, "-" if policy == "none" else method, saved.bytes, ms,
                            max_grad_diff(grads, reference)))  # fmt: skip
    return runs


def builtin_diff(ctx: LabContext, length: int, batch: int) -> float:
    """Max |grad difference| between the model's own grad_checkpointing and the lab's 'every layer'."""
    history, mask = ctx.long_histories(batch, length)
    ours, table = build_encoder(ctx, length, "every layer", METHODS[0])
    theirs, _ = build_encoder(ctx, length, builtin=True)
    with torch.no_grad():
        emb = table(history.to(ctx.device))
    mask = mask.to(ctx.device)
    return max_grad_diff(step_grads(ours, emb, mask, ctx.seed), step_grads(theirs, emb, mask, ctx.seed))


# ------------------------------------------------------------------------------------------------
# report


def _plot(ctx: LabContext, runs: list[Run]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = {"-": "o", METHODS[0]: "s", METHODS[1]: "^"}
    for length in sorted({r.length for r in runs}):
        rows = [r for r in runs if r.length == length]
        line = ax.plot([r.saved_bytes / 2**20 for r in rows[:1] + rows[1::2]],
                       [r.step_ms for r in rows[:1] + rows[1::2]], "--", alpha=0.5)[0]  # fmt: skip
        for r in rows:
            ax.scatter(r.saved_bytes / 2**20, r.step_ms, marker=markers[r.method], color=line.get_color(),
                       label=f"n={length}, {r.policy}" + ("" if r.method == "-" else f", {r.method}"))  # fmt: skip
    ax.set(xlabel="MB saved for backward", ylabel="forward+backward ms", xscale="log",
           title=f"Checkpointing the {N_LAYERS}-layer history encoder: memory against time")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    file = "saved_bytes_vs_step_time.png"
    fig.savefig(ctx.out / file, dpi=100)
    plt.close(fig)
    return file


def _summary(runs: list[Run], builtin: float, agree: bool) -> str:
    lines = []
    for length in sorted({r.length for r in runs}):
        by = {(r.policy, r.method): r for r in runs if r.length == length}
        base = by[("none", "-")]
        parts = []
        for policy in POLICIES[1:]:
            r = by[(policy, METHODS[0])]
            s = by[(policy, METHODS[1])]
            parts.append(f"{policy} keeps {r.saved_bytes / base.saved_bytes:.0%} of the bytes for "
                         f"{r.step_ms / base.step_ms:.2f}x the step time (from scratch: "
                         f"{s.saved_bytes / base.saved_bytes:.0%}, {s.step_ms / base.step_ms:.2f}x)")  # fmt: skip
        lines.append(f"At n = {length} (batch {base.batch}) no checkpointing saves {base.saved_bytes / 2**20:.1f} MB and "
                     f"takes {base.step_ms:.1f} ms; " + "; ".join(parts) + ".")  # fmt: skip
    worst = max(r.grad_diff for r in runs)
    lines.append(
        f"Gradients: every policy and both implementations match no checkpointing to {worst:.1e} (tolerance "
        f"{GRAD_TOLERANCE:g}, dropout {DROPOUT} on, so the recomputation must replay the RNG), and the lab's "
        f"'every layer' matches the model's own grad_checkpointing to {builtin:.1e}"
        + ("." if agree else ". WARNING: beyond the tolerance.")
    )
    lines.append(
        "The trade: a checkpointed layer keeps only its input ([B, n, D]) instead of everything its attention "
        "and MLP saved, and pays one more forward of that layer in backward; every other layer is the middle "
        "of the curve. It pays when activation memory is what limits the batch or the history length (long "
        "histories, big batches, a GPU near its memory); at the demo's sizes on a CPU it only costs time."
    )
    return "\n\n".join(lines)


def run(ctx: LabContext) -> LabResult:
    lengths = ctx.scaled(full=[50, 200], quick=[50, 200], tiny=[8, 16])
    batch = ctx.scaled(full=64, quick=16, tiny=2)
    reps = ctx.scaled(full=5, quick=2, tiny=1)
    runs = [r for length in lengths for r in measure(ctx, length, batch, reps, budget_s=ctx.scaled(3.0, 1.0))]
    builtin = builtin_diff(ctx, lengths[0], batch)
    agree = max(builtin, *(r.grad_diff for r in runs)) <= GRAD_TOLERANCE
    table = Table(
        f"Transformer history encoder ({N_LAYERS} layers), forward+backward; saved bytes exclude weights and input",
        ["n", "batch", "policy", "method", "saved MB", "step ms", "max |grad diff|"],
        [[r.length, r.batch, r.policy, r.method, round(r.saved_bytes / 2**20, 3), round(r.step_ms, 2),
          f"{r.grad_diff:.1e}"] for r in runs],
    )  # fmt: skip
    return LabResult(
        name=NAME, title=TITLE, summary=_summary(runs, builtin, agree), tables=[table], plots=[_plot(ctx, runs)],
        figures={"n_layers": N_LAYERS, "dropout": DROPOUT, "grad_tolerance": GRAD_TOLERANCE, "agree": agree,
                 "builtin_grad_diff": builtin, "runs": [dataclasses.asdict(r) for r in runs]},
        device=ctx.device, quick=ctx.quick,
    )  # fmt: skip
