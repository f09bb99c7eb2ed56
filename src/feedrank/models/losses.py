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
  few thousand items such as MovieLens).
- ``bce``: pointwise binary cross-entropy on impressions, shown-but-not-clicked rows as negatives.

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
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feedrank.data.batch import Batch
from feedrank.models.samplers import cumulative_table, draw_from_cdf

if TYPE_CHECKING:
    from feedrank.models.two_tower import TwoTower

SamplerKind = Literal["uniform", "popularity", "all"]
#: Index conventions from feedrank.data.batch: 0 = padding, 1 = out-of-vocabulary.
FIRST_REAL_ID = 2


def weighted_mean(values: Tensor, weight: Tensor | None = None) -> Tensor:
    """``sum(w * v) / sum(w)``; 0 (not NaN) for an empty batch or all-zero weights."""
    if weight is None:
        weight = torch.ones_like(values)
    if weight.shape != values.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must match per-example losses {tuple(values.shape)}")
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def in_batch_softmax_loss(
    logits: Tensor,
    item_ids: Tensor,
    user_ids: Tensor | None = None,
    logq: Tensor | None = None,
    weight: Tensor | None = None,
    known_hits: Tensor | None = None,
    positives: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy where row i's positive is column i and the other columns are negatives.

    ``logits`` [B, B] = u_i . v_j / T; ``item_ids`` [B] the item of each column; ``logq`` [B] the
    log sampling probability of each column's item (subtracted from every logit of that column,
    positive included); ``user_ids`` [B] optional; ``weight`` [B] per-row example weights.
    ``positives`` [B] bool (optional) names the rows that are (user, positive item) pairs; the
    others take no part, neither as a row nor as a negative column: the loss equals the loss of
    the sub-batch of positive rows, without selecting it (fixed shapes, no device sync).

    Accidental hits are removed from the negatives: a column j != i whose item is row i's positive
    item, or (when ``user_ids`` is given) whose row belongs to the same user (so item j is another
    known positive of that user). ``known_hits`` [B, B] optionally names more: column j's item is
    a known positive of row i's user from outside the batch (``TwoTower.known_positive_mask``). The
    diagonal is never masked, so no row is all ``-inf``.
    """
    b = logits.shape[0]
    if logits.shape != (b, b) or item_ids.shape != (b,):
        raise ValueError(f"in-batch logits must be [B, B] with item_ids [B]; got {tuple(logits.shape)} and {tuple(item_ids.shape)}")
    if logq is not None:
        if logq.shape != (b,):
            raise ValueError(f"logq must be [B] = [{b}], got {tuple(logq.shape)}")
        logits = logits - logq.to(logits.dtype)[None, :]
    hits = item_ids[:, None] == item_ids[None, :]
    if user_ids is not None:
        hits |= user_ids[:, None] == user_ids[None, :]
    if known_hits is not None:
        if known_hits.shape != (b, b):
            raise ValueError(f"known_hits must be [B, B] = [{b}, {b}], got {tuple(known_hits.shape)}")
        hits |= known_hits
    if positives is not None:
        if positives.shape != (b,) or positives.dtype != torch.bool:
            raise ValueError(f"positives must be a bool [B] = [{b}] mask, got {positives.dtype} {tuple(positives.shape)}")
        hits |= ~positives[None, :]
        weight = positives.to(logits.dtype) if weight is None else weight * positives
    hits &= ~torch.eye(b, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(hits, float("-inf"))
    target = torch.arange(b, device=logits.device)
    return weighted_mean(F.cross_entropy(logits.float(), target, reduction="none"), weight)


def sampled_softmax_loss(
    pos_logits: Tensor,
    neg_logits: Tensor,
    pos_ids: Tensor,
    neg_ids: Tensor,
    pos_logq: Tensor | None = None,
    neg_logq: Tensor | None = None,
    weight: Tensor | None = None,
    known_hits: Tensor | None = None,
) -> Tensor:
    """Softmax of each row's positive against K shared sampled negatives.

    ``pos_logits`` [B], ``neg_logits`` [B, K], ``pos_ids`` [B], ``neg_ids`` [K]; ``pos_logq`` [B] and
    ``neg_logq`` [K] are the *sampler's* log-probabilities of those items (pass both or neither).
    A sampled negative equal to the row's positive is masked out (an accidental hit), and so is
    every one ``known_hits`` [B, K] marks (a known positive of the row's user elsewhere in the data).
    """
    b, k = neg_logits.shape
    if pos_logits.shape != (b,) or pos_ids.shape != (b,) or neg_ids.shape != (k,):
        raise ValueError(
            f"sampled softmax expects pos_logits/pos_ids [B], neg_logits [B, K], neg_ids [K]; got "
            f"{tuple(pos_logits.shape)}, {tuple(pos_ids.shape)}, {tuple(neg_logits.shape)}, {tuple(neg_ids.shape)}"
        )
    if (pos_logq is None) != (neg_logq is None):
        raise ValueError("pass both pos_logq and neg_logq for the logQ correction, or neither")
    if pos_logq is not None:
        pos_logits = pos_logits - pos_logq.to(pos_logits.dtype)
        neg_logits = neg_logits - neg_logq.to(neg_logits.dtype)[None, :]
    hits = pos_ids[:, None] == neg_ids[None, :]
    if known_hits is not None:
        if known_hits.shape != (b, k):
            raise ValueError(f"known_hits must be [B, K] = [{b}, {k}], got {tuple(known_hits.shape)}")
        hits |= known_hits
    neg_logits = neg_logits.masked_fill(hits, float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1).float()
    target = torch.zeros(b, dtype=torch.long, device=logits.device)
    return weighted_mean(F.cross_entropy(logits, target, reduction="none"), weight)


def bce_loss(logits: Tensor, clicked: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted binary cross-entropy of click logits [B] against ``clicked`` [B] in {0, 1}."""
    if logits.shape != clicked.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and clicked {tuple(clicked.shape)} must match")
    per_row = F.binary_cross_entropy_with_logits(logits.float(), clicked.float(), reduction="none")
    return weighted_mean(per_row, weight)


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
    return Batch(**{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def two_tower_loss(model: TwoTower | nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
    """Trainer adapter: ``(loss, logs)`` for ``batch``, the loss chosen by ``model.cfg.loss``.

    ``logs`` holds detached 0-d tensors (loss, temperature, number of training pairs), so the
    trainer decides when to pay for a device sync. The softmax losses train on the clicked rows
    only, masked (module docstring); nothing here reads a value back to the host.
    """
    cfg = unwrap(model).cfg
    out = model(batch)
    if cfg.loss == "bce":
        logits = (out.user * out.item).sum(dim=-1) / out.temperature
        loss = bce_loss(logits, batch.clicked, batch.weight)
    elif cfg.loss == "in_batch":
        logits = out.user @ out.item.T / out.temperature
        logq = batch.item_logq if cfg.logq_correction else None
        known = unwrap(model).known_positive_mask(batch.user, batch.item)
        loss = in_batch_softmax_loss(logits, batch.item, batch.user, logq, batch.weight, known, batch.clicked > 0)
    else:
        neg = out.negatives
        user = out.user / out.temperature  # [B, dim]: cheaper than dividing the [B, K] logits
        pos_logits = (user * out.item).sum(dim=-1)
        neg_logits = user @ neg.vectors.T
        # the 'all' sampler's log q is uniform: it cancels in the softmax, so skip the [B, K] subtraction
        correct = cfg.logq_correction and cfg.negative_sampler != "all"
        pos_logq, neg_logq = (neg.pos_logq, neg.logq) if correct else (None, None)
        known = unwrap(model).known_positive_mask(batch.user, neg.ids)
        weight = batch.weight * (batch.clicked > 0)
        loss = sampled_softmax_loss(pos_logits, neg_logits, batch.item, neg.ids, pos_logq, neg_logq, weight, known)
    pairs = batch.weight.new_tensor(float(len(batch))) if cfg.loss == "bce" else (batch.clicked > 0).sum().float()
    logs = {
        "loss": loss.detach(),
        "temperature": out.temperature.detach(),
        "pairs": pairs,
    }
    return loss, logs
