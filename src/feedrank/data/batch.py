"""``Batch``: the one typed object that crosses from data loading into every model.

Index conventions (shared by features, collate and models):
- Every categorical column is an int64 index into its vocabulary (``feedrank.features``), where
  0 is padding and 1 is the out-of-vocabulary bucket; real ids start at 2.
- Histories are right-padded to the longest history in the batch with index 0 and carry a boolean
  ``history_mask`` (True = real element). A user with no history has an all-False row, which every
  history encoder must handle (it pools to zeros, never NaN).

Values are checked once, where a ``Batch`` is made (``feedrank.data.collate`` against
``BatchLimits``), not in the models' ``forward``: a range check there reads a tensor value back to
the host (a device sync every step) and stops ``torch.compile`` / ``torch.export`` from capturing
the model as one graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchLimits:
    """The vocabulary sizes (padding and OOV included) a Batch's indices must stay below.

    Example: ``BatchLimits(n_users=7630, n_items=3680, user_cat_sizes=(7, 10), item_cat_sizes=(42, 5, 14))``.
    """

    n_users: int
    n_items: int  # also bounds the history
    user_cat_sizes: Sequence[int]  # one per column of Batch.user_cats
    item_cat_sizes: Sequence[int]  # one per column of Batch.item_cats
    n_tokens: int | None = None  # title-token vocabulary size (Batch.item_tokens); None = not checked


@dataclass
class Batch:
    """One mini-batch of impressions. Shapes: B = batch size, L = padded history length."""

    user: Tensor  # [B] int64 user index
    user_cats: Tensor  # [B, n_user_cats] int64 categorical user features (age bucket, country)
    history: Tensor  # [B, L] int64 item indices of the user's last engagements, oldest first
    history_mask: Tensor  # [B, L] bool
    item: Tensor  # [B] int64 item index
    item_cats: Tensor  # [B, n_item_cats] int64 categorical item features (publisher, type, category)
    item_age_h: Tensor  # [B] float32 item age in hours at impression time (freshness)
    counters: Tensor  # [B, n_counters] float32 point-in-time user/item counters (log1p-scaled)
    position: Tensor  # [B] int64 position in the feed (used as a bias in training only)
    clicked: Tensor  # [B] float32 in {0, 1}
    dwell_s: Tensor  # [B] float32
    shared: Tensor  # [B] float32 in {0, 1}
    hidden: Tensor  # [B] float32 in {0, 1}
    weight: Tensor  # [B] float32 example weight from the label config
    item_logq: Tensor  # [B] float32 log of the item's sampling probability (logQ correction)
    request: Tensor  # [B] int64 request group id (for per-request metrics)
    # [B, T] int64 title-token indices of each row's item, right-padded with 0 (T >= 1; an item
    # without a title is an all-padding row). None: this batch carries no titles (a user-only batch,
    # a hand-built one); a model that reads titles then refuses it.
    item_tokens: Tensor | None = None
    # [B, 2 * len(features.cross_counters)] float32 user x item-categorical counters of each row
    # (``feedrank.features.counters.cross_counter_columns``, log1p-scaled); None: none were built.
    cross_counters: Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A Batch of ``fn`` applied to every tensor field (absent ones stay None)."""
        return Batch(**{f.name: None if (t := getattr(self, f.name)) is None else fn(t) for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return self.user.shape[0]
