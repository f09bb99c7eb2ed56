"""Retrieval losses for the two-tower model, the negative sampler they use, and ``two_tower_loss``.

All three losses are pure functions of logits and ids, so each is tested against numbers computed
by hand. ``two_tower_loss(model, batch)`` is the trainer-facing adapter: it runs the model once
(through ``model(batch)``, so DDP/FSDP/compile wrappers see the whole computation) and dispatches
on ``cfg.loss``:

- ``in_batch``: softmax over the other positives of the batch (Yi et al., 2019). Popular items
  appear as in-batch negatives more often than they should, so their logits are corrected by
  ``- log q(item)`` (logQ correction): without it the model learns to push popular items down.
- ``sampled``: softmax over ``num_negatives`` items drawn from the catalogue (uniform or by
  popularity) and shared by the batch, with the sampler's own ``- log q``; or, with the ``all``
  sampler, over every item of the catalogue (the exact softmax, affordable for catalogues of a
  few thousand items such as MovieLens). Training computes it with ``fused_sampled_softmax_loss``
  (one [B, K] buffer, reused as its own gradient), equal to ``sampled_softmax_loss``.
- ``bce``: pointwise binary cross-entropy on impressions, shown-but-not-clicked rows as negatives.

With ``impression_weight > 0`` the softmax losses also get that pointwise term, on the click
logits of ``TwoTower.impression_head`` (a positive scale of ``u . v``, a bias and a training-only
position bias): the softmax teaches which item a user clicks among the catalogue, the impression
term which of the items shown at one moment (fresh against stale) gets the click.

Under data parallelism ``two_tower_loss(model, batch, pool=GlobalPool(...))`` makes each rank's
loss its share of the union batch's (in-batch negatives from every rank, the global weight sum),
so averaging the ranks' gradients, as DDP does, gives the union batch's gradient.

The softmax losses only use clicked rows as (user, positive item) pairs. They mask the other rows
out rather than selecting the clicked ones (``batch[clicked > 0]``): a boolean selection has a
data-dependent size, so it synchronises the device (``nonzero``) and changes the batch shape every
step (a recompile under ``torch.compile``). The masks keep every shape fixed; the collator may still
drop the non-clicked rows beforehand, on the host (``feedrank.data.collate``, ``keep``), to save
their compute.

Example::

    >>> logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    >>> in_batch_softmax_loss(logits, item_ids=torch.tensor([5, 7]))   # mean of -log softmax diag
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedrank.data.batch import Batch
from feedrank.models.samplers import cumulative_table, draw_from_cdf

if TYPE_CHECKING:
    from feedrank.models.two_tower import TwoTower, TwoTowerOutput

SamplerKind = Literal["uniform", "popularity", "all"]
#: Index conventions from feedrank.data.batch: 0 = padding, 1 = out-of-vocabulary.
FIRST_REAL_ID = 2
#: The sampled softmax of training goes through ``fused_sampled_softmax_loss`` (False: the plain
#: ``sampled_softmax_loss`` and per-cell mask, which benchmarks/movielens_two_tower_step.py times against it).
FUSED_SOFTMAX = True


def weighted_mean(values: Tensor, weight: Tensor | None = None, total: Tensor | None = None) -> Tensor:
    """``sum(w * v) / sum(w)``; 0 (not NaN) for an empty batch or all-zero weights.

    ``total`` replaces ``sum(w)`` as the denominator: under data parallelism it is the weight of the
    *global* batch, so each rank's share sums to the global batch's mean (``GlobalPool``).
    """
    weight, denom = _weight_and_denominator(values, weight, total)
    return (values * weight).sum() / denom


def _weight_and_denominator(values: Tensor, weight: Tensor | None, total: Tensor | None) -> tuple[Tensor, Tensor]:
    """``weighted_mean``'s weights (ones when None, checked against ``values``' shape, in its dtype)
    and its denominator (``total`` or their sum, at least the dtype's smallest normal)."""
    if weight is None:
        weight = torch.ones_like(values)
    if weight.shape != values.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must match per-example losses {tuple(values.shape)}")
    weight = weight.to(values.dtype)
    denom = weight.sum() if total is None else total.to(values.dtype)
    return weight, denom.clamp_min(torch.finfo(values.dtype).tiny)


def in_batch_softmax_loss(
    logits: Tensor,
    item_ids: Tensor,
    user_ids: Tensor | None = None,
    logq: Tensor | None = None,
    weight: Tensor | None = None,
    known_hits: Tensor | None = None,
    positives: Tensor | None = None,
    row_offset: int = 0,
    total_weight: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy where row i's positive is column ``row_offset + i``, the other columns negatives.

    ``logits`` [B, N] = u_i . v_j / T (N = B in one process; under data parallelism the columns
    are the global batch, every rank's rows padded to the largest rank's, and this rank's rows
    start at column ``row_offset``: ``GlobalBatch``);
    ``item_ids`` [N] the item of each column; ``logq`` [N] the log sampling probability of each
    column's item (subtracted from every logit of that column, positive included); ``user_ids`` [N]
    optional; ``weight`` [B] per-row example weights. ``positives`` [N] bool (optional) names the
    columns that are (user, positive item) pairs; the others take no part, neither as a row nor as
    a negative column: the loss equals the loss of the sub-batch of positive rows, without
    selecting it (fixed shapes, no device sync). ``total_weight`` replaces the rows' own weight sum
    as the denominator (the global batch's, ``weighted_mean``).

    Accidental hits are removed from the negatives: a column j whose item is row i's positive
    item, or (when ``user_ids`` is given) whose row belongs to the same user (so item j is another
    known positive of that user). ``known_hits`` [B, N] optionally names more: column j's item is
    a known positive of row i's user from outside the batch (``TwoTower.known_positive_mask``). The
    positive column is never masked, so no row is all ``-inf``.
    """
    b, n = logits.shape if logits.dim() == 2 else (-1, -1)
    rows = slice(row_offset, row_offset + b)
    if logits.dim() != 2 or item_ids.shape != (n,) or not 0 <= row_offset <= n - b:
        raise ValueError(f"in-batch logits must be [B, N] with item_ids [N] and 0 <= row_offset <= N - B; got "
                         f"{tuple(logits.shape)}, {tuple(item_ids.shape)} and row_offset={row_offset}")
    if logq is not None:
        if logq.shape != (n,):
            raise ValueError(f"logq must be [N] = [{n}], got {tuple(logq.shape)}")
        logits = logits - logq.to(logits.dtype)[None, :]
    hits = item_ids[rows, None] == item_ids[None, :]
    if user_ids is not None:
        hits |= user_ids[rows, None] == user_ids[None, :]
    if known_hits is not None:
        if known_hits.shape != (b, n):
            raise ValueError(f"known_hits must be [B, N] = [{b}, {n}], got {tuple(known_hits.shape)}")
        hits |= known_hits
    if positives is not None:
        if positives.shape != (n,) or positives.dtype != torch.bool:
            raise ValueError(f"positives must be a bool [N] = [{n}] mask (one per column), got {positives.dtype} {tuple(positives.shape)}")
        hits |= ~positives[None, :]
        weight = positives[rows].to(logits.dtype) if weight is None else weight * positives[rows]
    target = torch.arange(row_offset, row_offset + b, device=logits.device)
    hits[torch.arange(b, device=logits.device), target] = False
    logits = logits.masked_fill(hits, float("-inf"))
    return weighted_mean(F.cross_entropy(logits.float(), target, reduction="none"), weight, total_weight)


def sampled_softmax_loss(
    pos_logits: Tensor,
    neg_logits: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
    pos_logq: Tensor | None = None,
    neg_logq: Tensor | None = None,
    weight: Tensor | None = None,
    known_hits: Tensor | None = None,
    total_weight: Tensor | None = None,
) -> Tensor:
    """Softmax of each row's positive against K shared sampled negatives.

    ``pos_logits`` [B], ``neg_logits`` [B, K], ``pos_ids`` [B], ``neg_ids`` [K]; ``pos_logq`` [B] and
    ``neg_logq`` [K] are the *sampler's* log-probabilities of those items (pass both or neither).
    A sampled negative equal to the row's positive is masked out (an accidental hit), and so is
    every one ``known_hits`` [B, K] marks (a known positive of the row's user elsewhere in the data).
    """
    b, k = neg_logits.shape
    _check_sampled(b, k, pos_logits, pos_ids, neg_ids, pos_logq, neg_logq, known_hits)
    if pos_logq is not None:
        pos_logits = pos_logits - pos_logq.to(pos_logits.dtype)
        neg_logits = neg_logits - neg_logq.to(neg_logits.dtype)[None, :]
    hits = pos_ids[:, None] == neg_ids[None, :]
    if known_hits is not None:
        hits |= known_hits
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1).float()
    target = torch.zeros(b, dtype=torch.long, device=logits.device)
    return weighted_mean(F.cross_entropy(logits, target, reduction="none"), weight, total_weight)


def _check_sampled(b: int, k: int, pos_logits: Tensor, pos_ids: Tensor, neg_ids: Tensor, pos_logq: Tensor | None,
                   neg_logq: Tensor | None, known_hits: Tensor | None) -> None:  # fmt: skip
    """The shapes both sampled softmax losses take, for B rows against K negatives."""
    if pos_logits.shape != (b,) or pos_ids.shape != (b,) or neg_ids.shape != (k,):
        raise ValueError(f"sampled softmax expects pos_logits/pos_ids [B] = [{b}] and neg_ids [K] = [{k}]; got "
                         f"{tuple(pos_logits.shape)}, {tuple(pos_ids.shape)}, {tuple(neg_ids.shape)}")  # fmt: skip
    if (pos_logq is None) != (neg_logq is None):
        raise ValueError("pass both pos_logq and neg_logq for the logQ correction, or neither")
    if neg_logq is not None and neg_logq.shape != (k,):
        raise ValueError(f"neg_logq must be [K] = [{k}], got {tuple(neg_logq.shape)}")
    if known_hits is not None and known_hits.shape != (b, k):
        raise ValueError(f"known_hits must be [B, K] = [{b}, {k}], got {tuple(known_hits.shape)}")


def fused_sampled_softmax_loss(
    user: Tensor,
    neg_vectors: Tensor,
    pos_logits: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor | int,
    pos_logq: Tensor | None = None,
    neg_logq: Tensor | None = None,
    weight: Tensor | None = None,
    known_hits: Tensor | None = None,
    total_weight: Tensor | None = None,
) -> Tensor:
    """``sampled_softmax_loss(pos_logits, user @ neg_vectors.T, ...)``, computed in one [B, K] buffer.

    The plain path keeps about six [B, K] tensors a step (the logits, their masked copy, the
    concatenation with the positives, the log-softmax, and their gradients); at MovieLens' exact
    softmax (K = 1,682) they are most of a training step (docs/benchmarks.md, "Two-tower training
    cost"). Here the logits are one buffer that is corrected, masked and turned into probabilities
    in place, and backward turns those saved probabilities into the gradient in place
    (``_FusedSoftmax``). ``user`` [B, D] (already divided by the temperature), ``neg_vectors`` [K, D];
    ``neg_ids`` [K], or an int ``first`` standing for ``arange(first, first + K)`` (the ``all``
    sampler: the accidental hit of row i is then column ``pos_ids[i] - first``, with no [B, K]
    comparison); ``known_hits`` [B, K] bool, which may be a strided view (a row slice of
    ``TwoTower.known_dense``). Other arguments as ``sampled_softmax_loss``.

    Under autocast, or for dtypes other than float32/float64, this is ``sampled_softmax_loss``
    itself: the fused buffer would hold half-precision probabilities.
    """
    b, k = user.shape[0], neg_vectors.shape[0]
    if user.dim() != 2 or neg_vectors.dim() != 2 or neg_vectors.shape[1] != user.shape[1]:
        raise ValueError(f"user [B, D] and neg_vectors [K, D] must share D; got {tuple(user.shape)} and "
                         f"{tuple(neg_vectors.shape)}")  # fmt: skip
    ids = torch.arange(neg_ids, neg_ids + k, device=user.device) if isinstance(neg_ids, int) else neg_ids
    plain = (torch.is_autocast_enabled(user.device.type) or user.dtype not in (torch.float32, torch.float64)
             or neg_vectors.dtype != user.dtype)
    if plain:
        return sampled_softmax_loss(pos_logits, user @ neg_vectors.T, pos_ids, ids, pos_logq, neg_logq, weight,
                                    known_hits, total_weight)  # fmt: skip
    _check_sampled(b, k, pos_logits, pos_ids, ids, pos_logq, neg_logq, known_hits)
    if pos_logq is not None:
        pos_logits = pos_logits - pos_logq.to(pos_logits.dtype)
    if isinstance(neg_ids, int):
        own, hits = pos_ids.long() - neg_ids, known_hits
    else:
        own, hits = None, pos_ids[:, None] == neg_ids[None, :]
        hits = hits if known_hits is None else hits | known_hits
    weight, denom = _weight_and_denominator(pos_logits, weight, total_weight)  # as weighted_mean's
    row_scale = weight / denom
    logq = None if neg_logq is None else neg_logq.to(user.dtype)
    return _FusedSoftmax.apply(user, neg_vectors, pos_logits, logq, hits, own, row_scale)


class _FusedSoftmax(torch.autograd.Function):
    """sum_i s_i (logsumexp(p_i, n_i1 .. n_iK) - p_i) with n = user @ vectors.T - logq, masked; one [B, K] buffer.

    Forward keeps the negatives' softmax probabilities P (masked cells 0) and the positives' p.
    The gradient is s_i P_ij for negative logit (i, j) and s_i (p_i - 1) for the positive: backward
    scales P in place, so the [B, K] buffer of the forward is the only one. Calling backward twice
    on the same graph is refused by autograd (the saved buffer's version changed).
    """

    @staticmethod
    def forward(ctx: Any, user: Tensor, vectors: Tensor, pos_logits: Tensor, logq: Tensor | None,
                hits: Tensor | None, own: Tensor | None, row_scale: Tensor) -> Tensor:  # fmt: skip
        probs = user @ vectors.T
        if logq is not None:
            probs.sub_(logq[None, :])
        if hits is not None:
            probs.masked_fill_(hits, float("-inf"))
        if own is not None:  # the row's positive among the catalogue's columns is an accidental hit
            rows, cols = torch.arange(len(own), device=own.device), own.clamp(0, probs.shape[1] - 1)
            inside = (own >= 0) & (own < probs.shape[1])
            probs[rows, cols] = torch.where(inside, float("-inf"), probs[rows, cols])
        top = torch.maximum(probs.amax(dim=1), pos_logits)
        probs.sub_(top[:, None]).exp_()
        pos_exp = (pos_logits - top).exp()
        total = probs.sum(dim=1) + pos_exp
        probs.div_(total[:, None])
        ctx.save_for_backward(user, vectors, probs, pos_exp / total, row_scale)
        ctx.has_logq = logq is not None
        return (row_scale * (total.log() + top - pos_logits)).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        user, vectors, probs, pos_prob, row_scale = ctx.saved_tensors
        scale = row_scale * grad
        g = probs.mul_(scale[:, None])  # d loss / d negative logits, in the saved probabilities' buffer
        need = ctx.needs_input_grad
        grad_user = g @ vectors if need[0] else None
        grad_vectors = g.T @ user if need[1] else None
        grad_pos = scale * (pos_prob - 1.0) if need[2] else None
        grad_logq = -g.sum(dim=0) if ctx.has_logq and need[3] else None
        return grad_user, grad_vectors, grad_pos, grad_logq, None, None, None


@dataclasses.dataclass(frozen=True)
class ImpressionRows:
    """Collator ``keep`` hook of the impression term: every clicked row and a share ``rate`` of the others.

    Click logs are mostly not-clicked rows, and every kept row costs both towers; a share of them
    is enough to tell the impression term what is shown and not clicked. The pick is a hash of
    (request, item), not a random draw: the same rows every epoch and after a resume, in every
    DataLoader worker. Down-sampling shifts the term's logits by ``log(rate)``, which the head's
    bias absorbs; the ranking by ``u . v`` is unchanged.
    """

    rate: float

    def __call__(self, rows: Any) -> np.ndarray:
        col = lambda name: rows.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
        clicked = col("clicked").astype(bool)
        if self.rate >= 1.0:
            return np.ones_like(clicked)
        key = col("request").astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + col("item_idx").astype(np.uint64)
        key ^= key >> np.uint64(31)
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(29)
        return clicked | ((key >> np.uint64(11)).astype(np.float64) / float(1 << 53) < self.rate)


def bce_loss(logits: Tensor, clicked: Tensor, weight: Tensor | None = None, total_weight: Tensor | None = None) -> Tensor:
    """Weighted binary cross-entropy of click logits [B] against ``clicked`` [B] in {0, 1}."""
    if logits.shape != clicked.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and clicked {tuple(clicked.shape)} must match")
    per_row = F.binary_cross_entropy_with_logits(logits.float(), clicked.float(), reduction="none")
    return weighted_mean(per_row, weight, total_weight)


class NegativeSampler(nn.Module):
    """Draws negatives for sampled softmax from the item catalogue, and knows their log q.

    Holds the catalogue's categorical features (``item_cats`` [n_items, n_cats], indexed by item
    index) because a sampled item must go through the item tower, which needs them. ``popularity``
    samples proportionally to ``(count + 1) ** power``: +1 so unseen items can still be drawn and
    have a finite log q; power < 1 flattens the head (0.75 as in word2vec). ``all`` draws nothing:
    every real item is a negative once, whatever ``k`` (the exact softmax; its log q is uniform and
    cancels). Padding and OOV (ids 0 and 1) are never drawn; an OOV *positive* is corrected as if
    it were the rarest item.

    The buffers are not saved in ``state_dict``: they come from the feature pipeline, not training.
    """

    def __init__(self, item_cats: Tensor, kind: SamplerKind = "uniform", item_counts: Tensor | None = None, power: float = 0.75):
        super().__init__()
        n_items = item_cats.shape[0]
        if item_cats.dim() != 2 or n_items <= FIRST_REAL_ID:
            raise ValueError(f"item_cats must be [n_items, n_cats] with at least one real item; got {tuple(item_cats.shape)}")
        if kind == "popularity":
            if item_counts is None:
                raise ValueError("the 'popularity' negative sampler needs item_counts")
            if item_counts.shape != (n_items,) or not bool((item_counts >= 0).all()):
                raise ValueError(f"item_counts must be [{n_items}] non-negative counts, got {tuple(item_counts.shape)}")
            weights = (item_counts.double() + 1.0) ** power
        elif kind in ("uniform", "all"):
            weights = torch.ones(n_items, dtype=torch.float64)
        else:
            raise ValueError(f"unknown negative sampler {kind!r}; choose 'uniform', 'popularity' or 'all'")
        weights[:FIRST_REAL_ID] = 0.0
        probs = weights / weights.sum()
        log_q = probs.log()
        log_q[:FIRST_REAL_ID] = log_q[FIRST_REAL_ID:].min()
        self.kind = kind
        self.register_buffer("item_cats", item_cats.long(), persistent=False)
        self.register_buffer("probs", probs.float(), persistent=False)
        self.register_buffer("log_q", log_q.float(), persistent=False)
        # draws by binary search over the CDF: O(k log n) a step, where torch.multinomial walks all n
        self.register_buffer("cdf", cumulative_table(probs), persistent=False)

    def sample(self, k: int) -> Tensor:
        """``k`` item indices drawn with replacement; every real item once for the ``all`` sampler."""
        if self.kind == "all":
            return torch.arange(FIRST_REAL_ID, self.probs.shape[0], device=self.probs.device)
        if self.kind == "uniform":
            return torch.randint(FIRST_REAL_ID, self.probs.shape[0], (k,), device=self.probs.device)
        return draw_from_cdf(self.cdf, k)


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of ``rows`` (a bool mask or an index tensor) of every field.

    For evaluation and tests: a bool mask syncs the device (its result size is data-dependent),
    so the training losses mask rows instead (module docstring).
    """
    return batch._map(lambda t: t[rows])


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class GlobalPool:
    """The ranks whose batches together form one global batch (data parallelism); one process by default.

    DDP alone gives each rank's in-batch softmax only its own rank's negatives and normalises by
    its own weight sum, so "effective batch = per-rank batch x ranks" is false for a contrastive
    loss (docs/scaling.md measures by how much). ``two_tower_loss(..., pool=GlobalPool(group))``
    computes instead this rank's share of the loss of the union of every rank's batch: item
    vectors are all-gathered *with* gradients (``torch.distributed.nn.functional.all_gather``: its
    backward sends each rank the gradients the other ranks' rows put on its items), ids, logQ and
    masks without (``GlobalBatch``), and the weight sum is all-reduced (``total``). Each rank's
    loss is ``world * sum_{own rows} w l / W_global`` (``scale``): the ranks' losses sum to
    ``world x`` the union batch's loss, so DDP's gradient *average* over ranks is the
    union batch's gradient (tests/models/test_losses_distributed.py, 1e-5).

    ``group`` carries the tensors (its backend must handle the model's device); ``size_group``
    (default: ``group``) the per-step exchange of batch sizes, best a CPU (gloo) group so that the
    sizes never go through the accelerator. A group of its own for ``group`` keeps these
    collectives out of the sequence DDP/FSDP issue on the default group.
    """

    def __init__(self, group: Any = None, size_group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.size_group = group if size_group is None else size_group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    @classmethod
    def new(cls, size_group: Any = None) -> GlobalPool:
        """A pool of every rank, on a process group of its own (collective: every rank calls it)."""
        import torch.distributed as dist

        return cls(dist.new_group(backend=dist.get_backend()), size_group)

    def batch(self, n: int, device: torch.device) -> GlobalBatch:
        """This step's layout: every rank's batch size (one small collective on ``size_group``)."""
        if self.world == 1:
            return GlobalBatch(self, (n,))
        import torch.distributed as dist

        on = torch.device("cpu") if dist.get_backend(self.size_group) == "gloo" else device
        sizes = [torch.zeros(1, dtype=torch.int64, device=on) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=on), group=self.size_group)
        return GlobalBatch(self, tuple(int(s) for s in torch.cat(sizes).tolist()))

    def total(self, weight: Tensor) -> Tensor | None:
        """The global batch's weight sum (None in one process: the loss's own sum)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        total = weight.detach().float().sum()
        dist.all_reduce(total, group=self.group)
        return total

    def scale(self, loss: Tensor) -> Tensor:
        """``world x`` this rank's share, which DDP's average over ranks turns into the global loss's gradient."""
        return loss * self.world if self.world > 1 else loss


def accumulation_note(loss: str, grad_accum_steps: int, world: int, pooled: bool) -> str | None:
    """What plain gradient accumulation changes in the objective, with the figure; None without it.

    For ``two_tower.accumulation: micro_batches`` (``CachedStep`` changes nothing). The trainer then
    averages ``grad_accum_steps`` micro-batch losses, which is the step's loss only when
    every micro-batch has the same weight sum (each normalises by its own), and for the in-batch
    softmax never: a micro-batch's rows only see that micro-batch (on every rank when ``pooled``,
    ``GlobalPool``) as negatives. docs/scaling.md measures the gradient error of both.
    """
    if grad_accum_steps <= 1:
        return None
    note = (f"grad_accum_steps={grad_accum_steps}: each micro-batch's {loss} loss is normalised by its own "
            f"weight sum, not the step's")
    if loss == "in_batch":
        seen = world if pooled else 1
        note += (f", and its in-batch negatives are {seen} of the step's {world * grad_accum_steps} micro-batches "
                 f"(1/{world * grad_accum_steps // seen} of the pool a {world * grad_accum_steps}x larger batch "
                 f"would give): prefer a larger loader.batch_size to accumulation for this loss")
    return note + " (docs/scaling.md, 'Data parallelism and the retrieval objective')"


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """One step's global batch as this rank sees it: every rank's rows, in rank order, each rank's
    padded to the largest rank's size ``width`` (the collectives need equal shapes).

    Padding rows are zeros: their id 0 (padding) and their ``clicked`` mask False keep them out of
    every softmax, as a row and as a negative. This rank's rows are columns ``offset .. offset + n``.
    The sizes are the only value read back to the host (from ``size_group``).
    """

    pool: GlobalPool
    sizes: tuple[int, ...]

    @property
    def width(self) -> int:
        return max(self.sizes)

    @property
    def offset(self) -> int:
        return self.pool.rank * self.width

    def _padded(self, t: Tensor) -> Tensor:
        pad = self.width - t.shape[0]
        return t.contiguous() if pad == 0 else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])

    def columns(self, t: Tensor) -> Tensor:
        """``t`` [n, ...] of every rank, padded and concatenated in rank order; differentiable."""
        if self.pool.world == 1:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(self._padded(t), group=self.pool.group), dim=0)

    def constant(self, t: Tensor) -> Tensor:
        """``t`` [n, ...] of every rank, padded with zeros (False), in rank order; no gradient."""
        if self.pool.world == 1:
            return t
        import torch.distributed as dist

        mine = self._padded(t.detach())
        parts = [torch.empty_like(mine) for _ in range(self.pool.world)]
        dist.all_gather(parts, mine, group=self.pool.group)
        return torch.cat(parts, dim=0)


def two_tower_loss(model: TwoTower | nn.Module, batch: Batch, pool: GlobalPool | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Trainer adapter: ``(loss, logs)`` for ``batch``, the loss chosen by ``model.cfg.loss``.

    ``logs`` holds detached 0-d tensors (loss, temperature, number of training pairs), so the
    trainer decides when to pay for a device sync. The softmax losses train on the clicked rows
    only, masked (module docstring); nothing here reads a value back to the host. With a ``pool``
    of several ranks the loss is this rank's share of the *global* batch's loss (``GlobalPool``;
    the trainer passes one under torchrun, ``feedrank.train.retrieval``): in-batch negatives come
    from every rank and every loss is normalised by the global weight; the sampled loss keeps its
    own rank's draw of catalogue negatives (a draw does not depend on the batch: each row still
    sees ``num_negatives`` of them), so only its normalisation changes. Without one (the default)
    the loss is this batch's alone, whether or not a process group exists.
    """
    return step_loss(unwrap(model), [model(batch)], [batch], pool or GlobalPool())


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def step_loss(model: TwoTower, outs: list[TwoTowerOutput], batches: list[Batch], pool: GlobalPool
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of the one batch that ``batches`` make together, from the model's output on each.

    One batch for ``two_tower_loss``; a step's micro-batches for ``CachedStep``, whose in-batch
    softmax then sees every micro-batch's items. The temperature is ``outs[0]``'s (one per step).
    Sampled negatives stay with the micro-batch that drew them (``num_negatives`` a row either way).
    """
    cfg = model.cfg
    field = lambda name: _cat([getattr(b, name) for b in batches])  # noqa: E731
    user, item, temperature = _cat([o.user for o in outs]), _cat([o.item for o in outs]), outs[0].temperature
    clicked, weight = field("clicked"), field("weight")
    if cfg.loss == "bce":
        logits = (user * item).sum(dim=-1) / temperature
        loss = bce_loss(logits, clicked, weight, pool.total(weight))
    elif cfg.loss == "in_batch":
        users, items = field("user"), field("item")
        glob = pool.batch(len(users), item.device)
        logits = user @ glob.columns(item).T / temperature
        ids = glob.constant(torch.stack([items.long(), users.long(), (clicked > 0).long()], dim=1))
        item_ids, user_ids, positives = ids[:, 0], ids[:, 1], ids[:, 2] > 0  # one collective, not three
        logq = glob.constant(field("item_logq")) if cfg.logq_correction else None
        known = model.known_positive_mask(users, item_ids)
        loss = in_batch_softmax_loss(logits, item_ids, user_ids, logq, weight, known, positives,
                                     row_offset=glob.offset, total_weight=pool.total(weight * (clicked > 0)))
    else:
        pos_weight = weight * (clicked > 0)
        total = pool.total(pos_weight) if pool.world > 1 else pos_weight.sum()
        loss = sum(_sampled(model, out, b, temperature, total) for out, b in zip(outs, batches))
    if outs[0].impression is not None:  # the impression term (TwoTowerConfig.impression_weight)
        impression = _cat([o.impression for o in outs])
        loss = loss + cfg.impression_weight * bce_loss(impression, clicked, weight, pool.total(weight))
    loss = pool.scale(loss)
    pairs = weight.new_tensor(float(len(weight))) if cfg.loss == "bce" else (clicked > 0).sum().float()
    return loss, {"loss": loss.detach(), "temperature": temperature.detach(), "pairs": pairs}


def _sampled(model: TwoTower, out: TwoTowerOutput, batch: Batch, temperature: Tensor, total: Tensor) -> Tensor:
    """One micro-batch's share (``total``: the step's weight) of the sampled softmax loss."""
    neg = out.negatives
    user = out.user / temperature  # [B, dim]: cheaper than dividing the [B, K] logits
    pos_logits = (user * out.item).sum(dim=-1)
    # the 'all' sampler's log q is uniform: it cancels in the softmax, so skip the [B, K] subtraction
    every = model.cfg.negative_sampler == "all"
    correct = model.cfg.logq_correction and not every
    pos_logq, neg_logq = (neg.pos_logq, neg.logq) if correct else (None, None)
    weight = batch.weight * (batch.clicked > 0)
    if not FUSED_SOFTMAX:
        known = model.known_positive_mask(batch.user, neg.ids)
        return sampled_softmax_loss(pos_logits, user @ neg.vectors.T, batch.item, neg.ids, pos_logq, neg_logq,
                                    weight, known, total)  # fmt: skip
    # the 'all' sampler's negatives are the catalogue in id order: its mask is a row slice of the known grid
    if every:
        rows = model.known_positive_rows(batch.user)
        known = None if rows is None else rows[:, FIRST_REAL_ID:]
    else:
        known = model.known_positive_mask(batch.user, neg.ids)
    return fused_sampled_softmax_loss(user, neg.vectors, pos_logits, batch.item, FIRST_REAL_ID if every else neg.ids,
                                      pos_logq, neg_logq, weight, known, total)  # fmt: skip


Backward = Callable[[Tensor, bool], None]


@dataclasses.dataclass
class CachedStep:
    """``two_tower_loss`` with gradient accumulation that equals one batch of the whole step.

    Accumulating micro-batch losses is not the big batch's loss for a contrastive loss: each
    micro-batch's softmax sees only its own negatives and normalises by its own weight
    (``accumulation_note``). ``backward_step`` instead runs the cached-embedding two-pass scheme
    (GradCache, Gao et al. 2021): pass 1 embeds every micro-batch without a graph and computes the
    loss of the whole step on those vectors, as leaves, which gives its gradient with respect to
    every user / item / negative vector and the temperature; pass 2 embeds each micro-batch
    again, with a graph, and backpropagates those cached gradients through it, one micro-batch
    at a time (memory of one micro-batch's activations plus the step's vectors). The RNG state
    before each pass-1 forward is replayed in pass 2, so dropout and the sampler draw the same.
    Costs one extra forward (without a graph) per micro-batch.

    The trainer calls ``backward_step`` (instead of ``__call__`` and its own ``backward``) when
    ``grad_accum_steps`` > 1, with ``backward(t, last)``: scale and backpropagate ``t``, reducing
    gradients across ranks only when ``last``.
    """

    pool: GlobalPool | None = None

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return two_tower_loss(model, batch, self.pool)

    def backward_step(self, model: nn.Module, batches: list[Batch], backward: Backward
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        """Backpropagate the loss of ``batches`` taken as one batch; returns its (detached) loss and logs."""
        pool, inner = self.pool or GlobalPool(), unwrap(model)
        device = batches[0].item.device
        states = []
        with torch.no_grad():
            cached = []
            for batch in batches:
                states.append(_rng_state(device))
                cached.append(model(batch))
        after = _rng_state(device)
        temperature = cached[0].temperature.detach().requires_grad_()
        leaves = [dataclasses.replace(
            out, user=out.user.detach().requires_grad_(), item=out.item.detach().requires_grad_(), temperature=temperature,
            negatives=None if out.negatives is None else dataclasses.replace(
                out.negatives, vectors=out.negatives.vectors.detach().requires_grad_()),
            impression=None if out.impression is None else out.impression.detach().requires_grad_(),
        ) for out in cached]  # fmt: skip
        loss, logs = step_loss(inner, leaves, batches, pool)
        vectors = [_vectors(leaf) for leaf in leaves]
        grad_t, *flat = torch.autograd.grad(loss, [temperature, *(v for vs in vectors for v in vs)], allow_unused=True)
        starts = [sum(len(vs) for vs in vectors[:m]) for m in range(len(vectors))]
        for m, batch in enumerate(batches):
            _set_rng_state(device, states[m])
            out = model(batch)
            grads = flat[starts[m]: starts[m] + len(vectors[m])]
            surrogate = sum(((v * g).sum() for v, g in zip(_vectors(out), grads) if g is not None), out.user.new_zeros(()))
            # the temperature's gradient split over the micro-batches (each computes the same T):
            # under DDP every micro-batch's backward must reach every parameter
            if grad_t is not None and out.temperature.requires_grad:
                surrogate = surrogate + out.temperature * (grad_t / len(batches))
            backward(surrogate, m == len(batches) - 1)
        _set_rng_state(device, after)
        return loss.detach(), logs


def _vectors(out: TwoTowerOutput) -> tuple[Tensor, ...]:
    """The outputs of ``out`` the loss reads: users, items, the sampled negatives' vectors and the
    impression term's logits (each if any)."""
    extra = (() if out.negatives is None else (out.negatives.vectors,)) + (() if out.impression is None else (out.impression,))
    return (out.user, out.item) + extra


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
