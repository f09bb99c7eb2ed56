"""Item-to-item (co-engagement) retrieval: a dense EASE closed form and sparse top-k co-visitation.

Both models map a user's engagement history (a set of item indices) to a score per item,
``scores = history_matrix @ B``, where ``B`` is an item x item weight matrix:

- ``fit_ease`` (Steck 2019, "Embarrassingly Shallow Autoencoders"): with ``G = X^T X + reg*I`` and
  ``P = G^-1``, ``B = I - P / diag(P)`` (column-wise) with its diagonal zeroed. One dense
  ``n_items x n_items`` inverse, so it is for catalogues where that fits (MovieLens: 1,682 items,
  about a second); memory and time are O(items^2) and O(items^3).
- ``fit_covisit``: ``C = X^T X`` (how many users engaged with both items), diagonal dropped, and only
  the ``k`` largest entries kept per item (row). It is computed a chunk of items at a time with
  scipy.sparse, so peak memory is O(nnz(X) + chunk x items) and the result O(items x k): this is
  the variant that scales to large catalogues.

Neighbours are stored as ``Item2Item`` (CSR arrays: ``indptr``, ``indices``, ``weights``), the same
structure for both models (EASE keeps its ``top_k`` per row when asked, or all of them), so one
scoring function and one bundle format serve both.

Example::

    x = interactions(user_rows, item_idx, n_users, n_items)
    model = fit_covisit(x, k=100)
    top = model.top_k(histories, k=10)        # [n_users, 10] item indices, history excluded
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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


def fit_ease(x: sp.csr_matrix, reg: float = 250.0, top_k: int | None = None) -> Item2Item:
    """EASE weights ``B = I - P / diag(P)``, ``P = (X^T X + reg I)^-1``, diagonal zero (module docstring)."""
    if reg <= 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    n = x.shape[1]
    g = (x.T @ x).toarray().astype(np.float64)
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
