"""``user_batch``: a ``Batch`` that carries only the user side, for computing user vectors.

A user tower reads the user index, the user categoricals, the padded history and the user
counters; it never reads the item or label fields. Offline evaluation (many users at a cut, in
chunks: ``feedrank.evaluate.retrieval.user_batches``) and serving (one user per request:
``feedrank.serving.pipeline``) both need such a batch, built by this one function so that a user
is encoded the same way in both places. The item and label fields are zeros (weights ones) so
that the object is a complete ``Batch``.

Histories come as CSR (``history_offsets`` into a flat ``history``), the shape per-user state is
kept in; they are right-padded by ``collate``'s own ``pad_ragged``: width = the longest history, at
least 1, so a user without history is one all-False mask row, which every encoder pools to zeros.

Example::

    b = user_batch(np.array([5]), np.array([[2, 3]]), np.array([0, 2]), np.array([7, 9]),
                   np.zeros((1, 2), np.float32), n_item_cats=3)
    b.history.tolist(), b.history_mask.tolist()      # [[7, 9]], [[True, True]]
"""

from __future__ import annotations

import numpy as np
import torch

from feedrank.data.batch import Batch
from feedrank.data.collate import pad_ragged


def user_batch(
    user: np.ndarray,
    user_cats: np.ndarray,
    history_offsets: np.ndarray,
    history: np.ndarray,
    counters: np.ndarray,
    n_item_cats: int,
) -> Batch:
    """A ``Batch`` of ``B`` users with the user-side fields set and the item/label fields zero.

    ``user`` [B] int64 user indices; ``user_cats`` [B, n_user_cats] int64; ``history_offsets``
    [B + 1]: user ``i``'s history is ``history[history_offsets[i]:history_offsets[i + 1]]``
    (item indices, oldest first; the offsets need not start at 0, so a chunk of a larger CSR can
    be passed as is); ``counters`` [B, n_counters] float32, already scaled
    (``feedrank.features.counters.user_counters``).
    """
    b = len(user)
    if len(user_cats) != b or len(counters) != b or len(history_offsets) != b + 1:
        raise ValueError(f"user_batch: {b} users but user_cats has {len(user_cats)} rows, counters "
                         f"{len(counters)} rows and history_offsets {len(history_offsets)} entries (expected {b + 1})")  # fmt: skip
    padded, mask = pad_ragged(history[history_offsets[0] : history_offsets[-1]], np.diff(history_offsets))
    zeros_i, zeros_f = torch.zeros(b, dtype=torch.long), torch.zeros(b)
    return Batch(
        user=torch.from_numpy(np.asarray(user, dtype=np.int64)), user_cats=torch.from_numpy(user_cats),
        history=torch.from_numpy(padded), history_mask=torch.from_numpy(mask),
        item=zeros_i, item_cats=torch.zeros(b, n_item_cats, dtype=torch.long), item_age_h=zeros_f,
        counters=torch.from_numpy(counters), position=zeros_i, clicked=zeros_f, dwell_s=zeros_f,
        shared=zeros_f, hidden=zeros_f, weight=torch.ones(b), item_logq=zeros_f, request=zeros_i,
    )  # fmt: skip
