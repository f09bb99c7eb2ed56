"""Point-in-time lookups: "how many events of this group happened strictly before t, and which
were the last N?", answered for millions of queries at once with binary search, no per-row Python.

Time is represented by *dense ranks* (``dense_rank``): equal timestamps get equal ranks, so
"strictly before" on ranks is exactly "strictly before" on timestamps, and ties (every impression of
one feed request shares its timestamp) are excluded. That exclusion is deliberate: a click on item A
in a request must not leak into the features of item B shown in the same request, because at
serving time both were ranked before either was clicked.

Each (group, rank) pair is folded into one int64 key ``group * n_ranks + rank``. Events sorted by key
are sorted by group, then time; the events of a group strictly before rank r are the half-open key
range ``[group * n_ranks, group * n_ranks + r)``, found by two ``searchsorted`` calls.

Example::

    rank, n_ranks = dense_rank(ts)
    clicks = EventIndex(user_code[clicked], rank[clicked], n_ranks, values=item_idx[clicked])
    clicks.count_before(user_code, rank)          # clicks of each row's user before the row
    offsets, items = clicks.last_before(user_code, rank, n=50)   # their last 50 items, oldest first
"""

from __future__ import annotations

import numpy as np


def dense_rank(ts: np.ndarray) -> tuple[np.ndarray, int]:
    """Rank of each value among the distinct values (0-based), and the number of distinct values."""
    distinct, rank = np.unique(ts, return_inverse=True)
    return rank.astype(np.int64, copy=False), len(distinct)


class EventIndex:
    """A set of events (group code, time rank, optional value) indexed for point-in-time queries.

    ``n_ranks`` must bound every rank used for the events and for the queries; group codes are
    non-negative ints (dense codes of the raw ids, not vocabulary indices, so that two distinct
    users both mapped to OOV never share a history).
    """

    def __init__(self, group: np.ndarray, rank: np.ndarray, n_ranks: int, values: np.ndarray | None = None):
        group = np.asarray(group, dtype=np.int64)
        rank = np.asarray(rank, dtype=np.int64)
        if group.shape != rank.shape or (values is not None and len(values) != len(group)):
            raise ValueError(f"EventIndex: group, rank and values differ in length ({len(group)}, {len(rank)}, "
                             f"{None if values is None else len(values)})")
        if len(group) and (group.min() < 0 or rank.min() < 0 or rank.max() >= n_ranks):
            raise ValueError("EventIndex: group codes must be >= 0 and ranks in [0, n_ranks)")
        if len(group) and int(group.max()) >= np.iinfo(np.int64).max // max(n_ranks, 1):
            raise ValueError(f"EventIndex: group code {int(group.max())} x {n_ranks} ranks overflows int64 keys")
        self.n_ranks = n_ranks
        keys = group * n_ranks + rank
        order = np.argsort(keys, kind="stable")  # stable: equal keys keep input order
        self.keys = keys[order]
        self.values = None if values is None else np.asarray(values)[order]

    def _bounds(self, group: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        base = np.asarray(group, dtype=np.int64) * self.n_ranks
        key = base + np.asarray(rank, dtype=np.int64)
        # Searching sorted queries is several times faster (numpy narrows each search with the
        # previous result, and memory access becomes sequential); sorting by key sorts base too.
        order = np.argsort(key, kind="stable")
        lo, hi = np.empty_like(key), np.empty_like(key)
        lo[order] = np.searchsorted(self.keys, base[order], side="left")
        hi[order] = np.searchsorted(self.keys, key[order], side="left")
        return lo, hi

    def count_before(self, group: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Number of events of each query's group with rank strictly below the query's rank."""
        lo, hi = self._bounds(group, rank)
        return (hi - lo).astype(np.int64)

    def last_before(self, group: np.ndarray, rank: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Values of the last ``n`` events strictly before each query, oldest first, as a ragged
        array: ``values[offsets[i]:offsets[i + 1]]`` belongs to query ``i``."""
        if self.values is None:
            raise ValueError("EventIndex.last_before needs an index built with values")
        if n < 0:
            raise ValueError(f"history length must be >= 0, got {n}")
        lo, hi = self._bounds(group, rank)
        start = np.maximum(lo, hi - n)
        lengths = hi - start
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Position k of the flat output belongs to query q = row_of[k]; it reads event
        # start[q] + (k - offsets[q]).
        row_of = np.repeat(np.arange(len(lengths)), lengths)
        gather = start[row_of] + (np.arange(offsets[-1]) - offsets[row_of])
        return offsets, self.values[gather]


def ragged_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a ragged array of ``lengths``: each flat element's row, and its position within the row."""
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return row_of, np.arange(len(row_of)) - starts[row_of]


class HistoryState:
    """Each user's last ``n`` engagement values, carried across time-ordered chunks of the log.

    A row's history is the last ``n`` of: the user's values carried from earlier chunks, then the
    user's engagements in its own chunk strictly before its timestamp (``EventIndex.last_before``),
    which is exactly what one ``EventIndex`` over the whole log gives, because chunks come in time
    order and never split a timestamp (``feedrank.features.chunks``). The state is a dense
    ``[users, n]`` int64 array (oldest first) and a length per user: O(users x n), not O(rows).
    """

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"history length must be >= 0, got {n}")
        self.n = n
        self._values = np.zeros((0, n), np.int64)
        self._len = np.zeros(0, np.int64)

    def chunk(self, user: np.ndarray, rank: np.ndarray, n_ranks: int, engaged: np.ndarray,
              values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Histories of one chunk's rows as a ragged (offsets, values) pair, oldest first; then the
        chunk's engagements (``values[engaged]``, in row order) are added to the carried state."""
        user = np.asarray(user, dtype=np.int64)
        self._grow(int(user.max()) + 1 if len(user) else 0)
        index = EventIndex(user[engaged], rank[engaged], n_ranks + 1, values=np.asarray(values)[engaged])
        out = self._merge(index, user, rank)
        users = np.unique(user)
        offsets, kept = self._merge(index, users, np.full(len(users), n_ranks))  # after the whole chunk
        lengths = np.diff(offsets)
        row_of, col = ragged_positions(lengths)
        self._len[users] = lengths
        self._values[users[row_of], col] = kept
        return out

    def _merge(self, index: EventIndex, user: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The last ``n`` of (carried values, then the chunk's before ``rank``) of each query."""
        in_offsets, in_values = index.last_before(user, rank, self.n)
        k = np.diff(in_offsets)
        carried = np.minimum(self._len[user], self.n - k)  # the carried tail that still fits
        offsets = np.zeros(len(user) + 1, np.int64)
        np.cumsum(carried + k, out=offsets[1:])
        out = np.empty(offsets[-1], np.int64)
        row_of, j = ragged_positions(carried)
        out[offsets[row_of] + j] = self._values[user[row_of], self._len[user[row_of]] - carried[row_of] + j]
        row_of, j = ragged_positions(k)
        out[offsets[row_of] + carried[row_of] + j] = in_values
        return offsets, out

    def _grow(self, n_users: int) -> None:
        if n_users > len(self._len):
            values = np.zeros((n_users, self.n), np.int64)
            values[: len(self._len)] = self._values
            lengths = np.zeros(n_users, np.int64)
            lengths[: len(self._len)] = self._len
            self._values, self._len = values, lengths
