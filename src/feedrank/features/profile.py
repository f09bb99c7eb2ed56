"""Profile histories for protocols without time: a row's history is a seeded sample of the same
user's OTHER engagements, not the ones before it.

On a random split (RecBole's per-user 80/10/10, leave-one-out protocols) the held-out items are
spread over the user's whole timeline, so a point-in-time history teaches the wrong task ("which
item is rated next") and, with counters and item age, acts as a clock. The standard remedy
(YouTube-DNN style) trains each example against the user's *profile*: a sample of their other
engagements, never the example's own item. At evaluation the history is the user's train items.

The sample is vectorised: the user's engagements are put in a seeded random order once, and each
row reads a window of that order starting at its own seeded offset (cyclically), dropping the row's
own item; different rows of one user therefore see different subsets (a dropout over the profile;
windows of one order, so a user has at most as many distinct subsets as engagements, which keeps
the cost at ``n`` reads per row instead of a draw over the whole profile).
Everything is derived from the input order and the seed, so the output is byte-identical across runs.

Built for a streaming pass: the profiles (every engaged row of the log, a small share of its rows)
are collected first; the rows then ask for their histories chunk by chunk, in log order, each
drawing its window start from the same seeded stream.

Example::

    sampler = ProfileSampler(pool_user, pool_item, pool_values, n=50, seed=0, n_item_codes=n_items)
    offsets, items = sampler.sample(user_code, item_code)  # the next rows' histories: items[offsets[i]:offsets[i + 1]]
"""

from __future__ import annotations

import numpy as np


class ProfileSampler:
    """Up to ``n`` of each row's user's engaged values whose item differs from the row's own item.

    The pool is the log's engaged rows in log order: ``pool_user`` and ``pool_item`` are dense codes
    of the raw ids (grouping keys, so two distinct ids hashed to one vocabulary bucket are still
    told apart; item codes below ``n_item_codes``), ``pool_values`` (e.g. item vocabulary indices) is
    what the histories hold. ``sample`` is called on the log's rows in order, each row once.
    """

    def __init__(self, pool_user: np.ndarray, pool_item: np.ndarray, pool_values: np.ndarray, n: int, seed: int,
                 n_item_codes: int):  # fmt: skip
        pool_user, pool_item, pool_values = (np.asarray(a) for a in (pool_user, pool_item, pool_values))
        if not pool_user.shape == pool_item.shape == pool_values.shape or pool_user.ndim != 1:
            raise ValueError(f"ProfileSampler: pool_user, pool_item and pool_values must be 1-d of one length, got "
                             f"shapes {pool_user.shape}, {pool_item.shape}, {pool_values.shape}")  # fmt: skip
        if n < 0:
            raise ValueError(f"history length must be >= 0, got {n}")
        self._rng = np.random.default_rng(seed)
        order = np.lexsort((self._rng.random(len(pool_user)), pool_user))  # by user, then a seeded shuffle
        self._pool_user, self._pool_item, self._pool_values = pool_user[order], pool_item[order], pool_values[order]
        self.n = n
        # (user, item) pair keys of the profile, to count how often a row's own item is in it
        self._n_item_codes = max(int(n_item_codes), 1)
        self._pool_pairs = np.sort(self._pair(self._pool_user, self._pool_item))

    def _pair(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        return user.astype(np.int64) * self._n_item_codes + item.astype(np.int64)

    def sample(self, user: np.ndarray, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Histories of the log's next ``len(user)`` rows (their user and item codes) as a ragged
        array: ``values[offsets[i]:offsets[i + 1]]`` is row ``i``'s. Each row draws its window start
        (a fraction of its profile) from the seeded stream, so rows must come in log order, once."""
        user, item = np.asarray(user), np.asarray(item)
        rotation = self._rng.random(len(user))
        start = np.searchsorted(self._pool_user, user, side="left")
        size = np.searchsorted(self._pool_user, user, side="right") - start
        first = (rotation * size).astype(np.int64)  # in [0, size) where size > 0
        # Read n + (copies of the row's own item in the profile) candidates: dropping those still leaves n.
        pair = self._pair(user, item)
        own = np.searchsorted(self._pool_pairs, pair, side="right") - np.searchsorted(self._pool_pairs, pair, side="left")
        width = np.minimum(size, self.n + own)
        row_of = np.repeat(np.arange(len(user)), width)
        step = np.arange(len(row_of)) - np.repeat(np.cumsum(width) - width, width)
        pos = start[row_of] + (first[row_of] + step) % np.maximum(size[row_of], 1)
        keep = self._pool_item[pos] != item[row_of]
        # The window may hold fewer copies of the own item than the profile does: keep the first n.
        kept_before = np.cumsum(keep) - keep  # kept candidates before this one, over all rows
        row_first = np.repeat(np.cumsum(width) - width, width)  # flat index of the row's first candidate
        keep &= (kept_before - kept_before[row_first]) < self.n
        offsets = np.zeros(len(user) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of[keep], minlength=len(user)), out=offsets[1:])
        return offsets, self._pool_values[pos[keep]]
