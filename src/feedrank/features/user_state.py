"""Each user's state at a cut, from canonical-schema rows: the one rule training, evaluation and serving share.

"State" is what the system knew about a user strictly before a cut: the last ``history_len``
engaged (``clicked and not hidden``) items, impression and click counts, and the categorical
attributes of their latest row. Evaluation (``feedrank.evaluate.retrieval``) scores users from it
and serving (``feedrank.serving.state.UserStore``) seeds its snapshot from it, so the two can never
disagree on what a history is. It lives here, below both, because serving must not import
evaluation.

Example::

    state = user_state(events, pa.array(["u1", "u2"]), history_len=50)
    state.history_items[state.history_offsets[0]:state.history_offsets[1]]   # u1's items, oldest first
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.features.history import EventIndex, dense_rank
from feedrank.features.vocab import USER_CAT_COLUMNS


@dataclass
class UserState:
    """What the system knew about each user at the cut; raw ids, one row per user."""

    user_id: pa.Array  # [U] string
    user_cats: dict[str, pa.Array]  # USER_CAT_COLUMNS -> [U] raw values (null = unknown)
    history_offsets: np.ndarray  # [U + 1] int64: user u's history is history_items[off[u]:off[u+1]]
    history_items: pa.Array  # [M] string item ids, oldest first
    impressions: np.ndarray  # [U] int64 impressions before the cut
    clicks: np.ndarray  # [U] int64 clicks before the cut

    def __len__(self) -> int:
        return len(self.user_id)


def user_state(events: pa.Table, users: pa.Array, history_len: int, fallback: pa.Table | None = None) -> UserState:
    """Each of ``users``' state from ``events`` (canonical-schema rows, all before the cut).

    ``events`` needs ``user_id, item_id, ts, clicked, hidden`` and the user categorical columns.
    History = the last ``history_len`` engaged (``clicked and not hidden``) items, oldest first;
    categorical features come from the user's latest row, or, for a user with no row before the
    cut, from their earliest row in ``fallback`` (e.g. the test period: request-time attributes
    such as country are known when the request arrives).
    """
    users = _strings(users)
    n = len(users)
    rows = events.filter(pc.is_in(events["user_id"], value_set=users))
    code = pc.index_in(rows["user_id"], value_set=users).to_numpy().astype(np.int64)
    ts = rows["ts"].cast(pa.int64()).to_numpy()
    clicked = rows["clicked"].to_numpy(zero_copy_only=False)
    engaged = clicked & ~rows["hidden"].to_numpy(zero_copy_only=False)

    rank, n_ranks = dense_rank(ts)
    history = EventIndex(code[engaged], rank[engaged], max(n_ranks, 1), values=np.flatnonzero(engaged))
    offsets, history_rows = history.last_before(np.arange(n), np.full(n, max(n_ranks, 1)), history_len)

    latest, has_row = latest_rows(code, ts, n)
    cats = {c: _take_where(rows[c], latest, has_row) for c in USER_CAT_COLUMNS}
    if fallback is not None and not has_row.all():
        fb = fallback.filter(pc.is_in(fallback["user_id"], value_set=users))
        fb_code = pc.index_in(fb["user_id"], value_set=users).to_numpy().astype(np.int64)
        first, fb_has = latest_rows(fb_code, -fb["ts"].cast(pa.int64()).to_numpy(), n)
        use = ~has_row & fb_has
        cats = {c: pc.if_else(pa.array(use), _take_where(fb[c], first, use), v) for c, v in cats.items()}
    return UserState(
        user_id=users,
        user_cats={c: _strings(v) for c, v in cats.items()},
        history_offsets=offsets,
        history_items=_strings(rows["item_id"].take(pa.array(history_rows, pa.int64()))),
        impressions=np.bincount(code, minlength=n).astype(np.int64),
        clicks=np.bincount(code[clicked], minlength=n).astype(np.int64),
    )


def _take_where(column: pa.ChunkedArray, rows: np.ndarray, valid: np.ndarray) -> pa.Array:
    """``column[rows]`` where ``valid``, null elsewhere (``rows`` is only read where valid)."""
    picked = column.take(pa.array(np.where(valid, rows, 0))) if len(column) else pa.nulls(len(rows), pa.string())
    return _strings(pc.if_else(pa.array(valid), picked, pa.nulls(len(rows), pa.string())))


def latest_rows(group: np.ndarray, ts: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For each group code in ``[0, n_groups)``: the row holding its latest ``ts`` (0 where the
    group has no row) and whether it has one. Equal timestamps: the later row wins."""
    order = np.lexsort((np.arange(len(ts)), ts, group))
    last = order[np.r_[group[order][1:] != group[order][:-1], True]] if len(order) else order
    has_row = np.zeros(n_groups, dtype=bool)
    has_row[group[last]] = True
    row_of = np.zeros(n_groups, dtype=np.int64)
    row_of[group[last]] = last
    return row_of, has_row


def _strings(values: pa.Array | pa.ChunkedArray | Sequence[str]) -> pa.Array:
    """``values`` as one string Array (a chunked column combined, a Python list converted)."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    arr = arr if isinstance(arr, pa.Array) else pa.array(list(arr), pa.string())
    return arr.cast(pa.string())
