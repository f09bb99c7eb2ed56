"""Item-to-item (co-engagement) retrieval: a dense EASE closed form and sparse top-k co-visitation.

Both models map a user's engagement history (a set of item indices) to a score per item,
``scores = history_matrix @ B``, where ``B`` is an item x item weight matrix:

- ``fit_ease`` (Steck 2019, "Embarrassingly Shallow Autoencoders"): with ``G = X^T X + reg*I`` and
  ``P = G^-1``, ``B = I - P / diag(P)`` (column-wise) with its diagonal zeroed. One dense
  ``n_items x n_items`` inverse, so it is for catalogues where that fits (MovieLens: 1,682 items,
  about a second); memory and time are O(items^2) and O(items^3). With ``session_weight > 0`` the
  gram also counts *when* two items were engaged (``session_gram``): a pair of one user's
  engagements adds ``session_weight * exp(-|t_a - t_b| / session_tau_s)`` on top of its 1, so items
  engaged in the same session (MovieLens users rate dozens of movies minutes apart, from listing
  pages) weigh more than items the user engaged months apart. Only the training rows' times are used.
- ``fit_covisit``: ``C = X^T X`` (how many users engaged with both items), diagonal dropped, and only
  the ``k`` largest entries kept per item (row). It is computed a chunk of items at a time with
  scipy.sparse, so peak memory is O(nnz(X) + chunk x items) and the result O(items x k): this is
  the variant that scales to large catalogues.

Neighbours are stored as ``Item2Item`` (CSR arrays: ``indptr``, ``indices``, ``weights``), the same
structure for both models (EASE keeps its ``top_k`` per row when asked, or all of them), so one
scoring function and one bundle format serve both. ``Item2ItemModel`` holds those arrays as buffers
of an ``nn.Module``, so the bundle machinery (state_dict, content version) saves it like any model;
``Item2ItemConfig`` is the run config's ``item2item`` section.

Two ways to score, one weight matrix:

- ``Item2Item.scores`` / ``Item2ItemModel.score_batch``: many users against the whole catalogue
  (offline evaluation), a sparse-dense product;
- ``Item2Item.recommend``: one user's history, touching only its items' neighbour lists (serving:
  O(history x neighbours), whatever the catalogue size).

Example::

    x = interactions(user_rows, item_idx, n_users, n_items)
    model = fit_covisit(x, k=100)
    top = model.top_k(histories, k=10)        # [n_users, 10] item indices, history excluded
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from feedrank.data.batch import Batch


@dataclass
class Item2ItemConfig:
    """The run config's ``item2item`` section: how the item-to-item retrieval kinds are fitted and used.

    ``retrieval.kind`` (``feedrank.train.retrieval.RetrievalConfig``) picks the method; these are its
    settings. ``reg`` and ``top_k`` are EASE's, ``neighbours`` and ``chunk_items`` co-visitation's.
    """

    reg: float = 250.0  # EASE: L2 weight on the item-item matrix (RecBole's default for ml-100k)
    top_k: int | None = None  # EASE: neighbours kept per item (None: all, a dense matrix)
    neighbours: int = 100  # co-visitation: the k most co-engaged items kept per item
    chunk_items: int = 4096  # co-visitation: items whose co-counts are computed at once (memory)
    history_len: int = 1000  # a user is scored from their last this many engagements
    session_weight: float = 0.0  # EASE: extra weight of a pair engaged close in time (0: plain EASE)
    session_tau_s: float = 600.0  # EASE: time scale (seconds) of that extra weight's exp(-dt / tau) decay

    def validate(self) -> None:
        if self.reg <= 0:
            raise ValueError(f"reg must be > 0, got {self.reg}")
        if self.session_weight < 0:
            raise ValueError(f"session_weight must be >= 0, got {self.session_weight}")
        if self.session_tau_s <= 0:
            raise ValueError(f"session_tau_s must be > 0, got {self.session_tau_s}")
        for name in ("neighbours", "chunk_items", "history_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")


@dataclass
class Item2Item:
    """Sparse item x item weights in CSR form: row ``i`` lists the items that item ``i`` recommends."""

    indptr: np.ndarray  # int64 [n_items + 1]
    indices: np.ndarray  # int64 [nnz]
    weights: np.ndarray  # float32 [nnz]
    n_items: int

    def matrix(self) -> sp.csr_matrix:
        return sp.csr_matrix((self.weights, self.indices, self.indptr), shape=(self.n_items, self.n_items))

    def neighbours(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, weights) of ``item``'s neighbours, best first."""
        lo, hi = self.indptr[item], self.indptr[item + 1]
        order = np.argsort(-self.weights[lo:hi], kind="stable")
        return self.indices[lo:hi][order], self.weights[lo:hi][order]

    def scores(self, histories: sp.csr_matrix) -> np.ndarray:
        """Dense ``[n_users, n_items]`` scores of users given as a CSR history matrix (users x items)."""
        if histories.shape[1] != self.n_items:
            raise ValueError(f"histories have {histories.shape[1]} item columns, the model {self.n_items}")
        return np.asarray((histories @ self.matrix()).todense(), dtype=np.float32)

    def recommend(self, history: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best items (and their scores, best first) for one user's ``history`` (item
        indices; duplicates count once), history items excluded. Reads only the history's neighbour
        lists, so its cost does not grow with the catalogue."""
        history = np.unique(np.asarray(history, dtype=np.int64))
        history = history[(history >= 0) & (history < self.n_items)]
        lo, hi = self.indptr[history], self.indptr[history + 1]
        if n < 1 or not (hi > lo).any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        take = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
        items, inverse = np.unique(self.indices[take], return_inverse=True)
        scores = np.bincount(inverse, weights=self.weights[take], minlength=len(items)).astype(np.float32)
        keep = ~np.isin(items, history)
        items, scores = items[keep], scores[keep]
        order = np.lexsort((items, -scores))[:n]  # ties: lower item index first
        return items[order], scores[order]

    def top_k(self, histories: sp.csr_matrix, k: int, exclude_history: bool = True) -> np.ndarray:
        """``[n_users, k]`` item indices by descending score; items in the history excluded."""
        s = self.scores(histories)
        if exclude_history:
            h = histories.tocoo()
            s[h.row, h.col] = -np.inf
        k = min(k, self.n_items)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        return np.take_along_axis(part, order, axis=1)


def interactions(user_rows: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary users x items CSR matrix of (user row, item index) engagement pairs (duplicates count once)."""
    user_rows, item_idx = np.asarray(user_rows, np.int64), np.asarray(item_idx, np.int64)
    if user_rows.shape != item_idx.shape:
        raise ValueError(f"{user_rows.size} user rows but {item_idx.size} item indices")
    if user_rows.size and (user_rows.min() < 0 or user_rows.max() >= n_users):
        raise ValueError(f"user rows must lie in [0, {n_users})")
    if item_idx.size and (item_idx.min() < 0 or item_idx.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    x = sp.csr_matrix((np.ones(user_rows.size, np.float32), (user_rows, item_idx)), shape=(n_users, n_items))
    x.data[:] = 1.0  # duplicates summed by the constructor: back to binary
    return x


def _from_dense_rows(rows: list[sp.csr_matrix], n_items: int) -> Item2Item:
    m = sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, n_items), dtype=np.float32)
    m.sort_indices()
    return Item2Item(m.indptr.astype(np.int64), m.indices.astype(np.int64), m.data.astype(np.float32), n_items)


def _keep_top_k(block: np.ndarray, k: int | None) -> sp.csr_matrix:
    """A dense block of rows as CSR, keeping the ``k`` largest entries per row (all when None)."""
    if k is not None and k < block.shape[1]:
        cut = np.argpartition(-block, k - 1, axis=1)[:, :k]
        kept = np.zeros_like(block)
        np.put_along_axis(kept, cut, np.take_along_axis(block, cut, axis=1), axis=1)
        block = kept
    return sp.csr_matrix(block)


#: Pairs further apart than this many ``tau`` add nothing to the session gram (exp(-10) < 5e-5).
SESSION_CUTOFF_TAUS = 10.0


def session_gram(user_rows: np.ndarray, item_idx: np.ndarray, ts_s: np.ndarray, n_items: int, tau_s: float) -> sp.csr_matrix:
    """``sum_u K_u``: the items x items sum over users of ``exp(-|t_a - t_b| / tau_s)`` for every pair
    of the user's engagements (a, b), the diagonal included (a == b: 1 per engagement, so its
    diagonal is the item's engagement count). A (user, item) engaged more than once counts once, at
    its first time. Pairs more than ``SESSION_CUTOFF_TAUS * tau_s`` apart are dropped.

    Why a sweep: with each user's engagements sorted by time, pairs within the cutoff are offsets
    1, 2, ... of one sorted array, so each offset is one vectorised pass, and the passes stop at the
    first offset with no pair left (the longest burst of one user), never O(history^2) per user.
    """
    user_rows, item_idx = np.asarray(user_rows, np.int64), np.asarray(item_idx, np.int64)
    ts_s = np.asarray(ts_s, np.float64)
    if not (user_rows.shape == item_idx.shape == ts_s.shape):
        raise ValueError(f"{user_rows.size} user rows, {item_idx.size} item indices and {ts_s.size} times differ in length")
    if tau_s <= 0:
        raise ValueError(f"tau_s must be > 0, got {tau_s}")
    if item_idx.size and (item_idx.min() < 0 or item_idx.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    order = np.lexsort((ts_s, item_idx, user_rows))  # first engagement of each (user, item) first
    u, i, t = user_rows[order], item_idx[order], ts_s[order]
    first = np.ones(u.size, bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i, t = u[first], i[first], t[first]
    order = np.lexsort((t, u))
    u, i, t = u[order], i[order], t[order]
    rows, cols, vals = [i], [i], [np.ones(i.size)]
    cutoff = SESSION_CUTOFF_TAUS * tau_s
    for k in range(1, u.size):
        near = np.flatnonzero((u[k:] == u[:-k]) & (t[k:] - t[:-k] <= cutoff))
        if near.size == 0:
            break
        w = np.exp(-(t[near + k] - t[near]) / tau_s)
        rows += [i[near], i[near + k]]
        cols += [i[near + k], i[near]]
        vals += [w, w]
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items))


def fit_ease(x: sp.csr_matrix, reg: float = 250.0, top_k: int | None = None, extra_gram: sp.spmatrix | None = None) -> Item2Item:
    """EASE weights ``B = I - P / diag(P)``, ``P = (X^T X + extra_gram + reg I)^-1``, diagonal zero
    (module docstring; ``extra_gram`` is the session term, ``session_weight * session_gram``)."""
    if reg <= 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    n = x.shape[1]
    g = (x.T @ x).toarray().astype(np.float64)
    if extra_gram is not None:
        if extra_gram.shape != (n, n):
            raise ValueError(f"extra_gram is {extra_gram.shape}, the model has {n} items")
        g += extra_gram.toarray()
    g[np.diag_indices(n)] += reg
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices(n)] = 0.0
    return _from_dense_rows([_keep_top_k(b.astype(np.float32), top_k)], n)


def fit_covisit(x: sp.csr_matrix, k: int = 100, chunk_items: int = 4096) -> Item2Item:
    """Top-``k`` co-visitation counts per item (``X^T X``, diagonal dropped), a chunk of items at a time."""
    if k < 1 or chunk_items < 1:
        raise ValueError(f"k and chunk_items must be >= 1, got {k}, {chunk_items}")
    n = x.shape[1]
    xt = x.T.tocsr()
    rows = []
    for lo in range(0, n, chunk_items):
        hi = min(n, lo + chunk_items)
        block = (xt[lo:hi] @ x).tocsr()  # [chunk, items] co-counts, sparse
        coo = block.tocoo()
        keep = (coo.row + lo) != coo.col
        block = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=block.shape)
        rows.append(_sparse_top_k(block, k))
    return _from_dense_rows(rows, n)


def _sparse_top_k(block: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of every row of a CSR block (ties: lower item index first)."""
    indptr, indices, data = [0], [], []
    for r in range(block.shape[0]):
        lo, hi = block.indptr[r], block.indptr[r + 1]
        cols, vals = block.indices[lo:hi], block.data[lo:hi]
        if vals.size > k:
            order = np.lexsort((cols, -vals))[:k]
            cols, vals = cols[order], vals[order]
        indices.append(cols)
        data.append(vals)
        indptr.append(indptr[-1] + cols.size)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    out = sp.csr_matrix((cat(data, np.float32), cat(indices, np.int64), np.array(indptr)), shape=block.shape)
    out.sort_indices()
    return out


class Item2ItemModel(nn.Module):
    """An ``Item2Item`` as an ``nn.Module``: its CSR arrays are buffers, so a bundle saves and versions it.

    The number of neighbours is known only after fitting, so an empty model (what a bundle's builder
    makes from the config) takes its buffers' sizes from the state_dict it loads.
    """

    def __init__(self, n_items: int, fitted: Item2Item | None = None) -> None:
        super().__init__()
        if fitted is not None and fitted.n_items != n_items:
            raise ValueError(f"a model of {fitted.n_items} items given for a catalogue of {n_items}")
        self.n_items = n_items
        f = fitted or Item2Item(np.zeros(n_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), n_items)
        self.register_buffer("indptr", torch.from_numpy(np.ascontiguousarray(f.indptr, np.int64)))
        self.register_buffer("indices", torch.from_numpy(np.ascontiguousarray(f.indices, np.int64)))
        self.register_buffer("weights", torch.from_numpy(np.ascontiguousarray(f.weights, np.float32)))
        self._cached: Item2Item | None = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("indices", "weights"):  # sized by the fit: take the saved shape
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved))
        self._cached = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def item2item(self) -> Item2Item:
        """The numpy view of the buffers (built once per load)."""
        if self._cached is None:
            self._cached = Item2Item(self.indptr.numpy(), self.indices.numpy(), self.weights.numpy(), self.n_items)
        return self._cached

    def score_batch(self, batch: Batch) -> Tensor:
        """``[B, n_items]`` scores of a batch's users from their (masked) histories; duplicates count once."""
        rows, cols = torch.nonzero(batch.history_mask, as_tuple=True)
        items = batch.history[rows, cols].numpy()
        histories = interactions(rows.numpy(), items, len(batch.history), self.n_items)
        return torch.from_numpy(self.item2item.scores(histories))


def fit(x: sp.csr_matrix, method: str, cfg: Item2ItemConfig, times: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        ) -> Item2Item:  # fmt: skip
    """Fit the item-to-item ``method`` ("ease" or "covisit") on a binary users x items matrix.
    EASE with ``cfg.session_weight > 0`` needs ``times``: the (user row, item index, seconds) of the
    engagements ``x`` was built from."""
    if method == "ease":
        extra = None
        if cfg.session_weight > 0:
            if times is None:
                raise ValueError("item2item.session_weight > 0 needs the engagements' times")
            extra = cfg.session_weight * session_gram(*times, x.shape[1], cfg.session_tau_s)
        return fit_ease(x, reg=cfg.reg, top_k=cfg.top_k, extra_gram=extra)
    if method == "covisit":
        return fit_covisit(x, k=cfg.neighbours, chunk_items=cfg.chunk_items)
    raise ValueError(f"unknown item-to-item method {method!r}; known: ease, covisit")
