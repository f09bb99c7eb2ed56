"""Starting vectors for title words: a truncated SVD of the words' positive PMI over item titles.

Why: a title bag (``feedrank.models.towers.TitleBag``) helps a new item only once words of one
topic have similar vectors. Learned from clicks alone, from random starting vectors, that structure
comes slowly: on the synthetic world a run's few hundred optimiser steps left the words of one
topic barely closer to each other than to any other word, and content did not help new items.
The titles themselves say which words go together (they co-occur in the same items), and that is
known before any click: words that share titles get nearby vectors here, and training refines
them. This is classic latent semantic analysis, deterministic and cheap (a sparse word x word
matrix, a few dozen singular vectors).

Example::

    vectors = title_word_vectors(tokens, n_tokens=482, dim=16)   # [482, 16] float32, rows 0 and 1 zero
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from feedrank.features.vocab import FIRST_ID

#: Norm of a word's starting vector: small against the tower's other inputs at the start, so a
#: word that training finds useless costs little, large enough to carry the topic structure.
WORD_NORM = 0.1


def title_word_vectors(tokens: np.ndarray, n_tokens: int, dim: int) -> np.ndarray:
    """``[n_tokens, dim]`` float32 starting vectors from ``tokens`` ``[n_items, T]`` (token indices,
    0 = padding; one row per item). Padding and OOV rows are zero, a word that never co-occurs with
    another gets zeros too; every other row has norm ``WORD_NORM``."""
    out = np.zeros((n_tokens, dim), np.float32)
    rows, cols = np.nonzero(tokens >= FIRST_ID)
    words = tokens[rows, cols]
    if len(words) == 0 or n_tokens <= FIRST_ID + 1:
        return out
    items = sp.csr_matrix((np.ones(len(words)), (rows, words)), shape=(tokens.shape[0], n_tokens))
    items.data[:] = 1.0  # a word counts once per title
    co = (items.T @ items).tocoo()
    keep = co.row != co.col
    co_rows, co_cols, counts = co.row[keep], co.col[keep], co.data[keep]
    if len(counts) == 0:
        return out
    word_count = np.asarray(items.sum(axis=0)).ravel()
    total = counts.sum()
    pmi = np.log(counts * total / (word_count[co_rows] * word_count[co_cols]))
    positive = pmi > 0
    ppmi = sp.csr_matrix((pmi[positive], (co_rows[positive], co_cols[positive])), shape=(n_tokens, n_tokens))
    k = min(dim, n_tokens - FIRST_ID - 1)
    # a fixed start vector: the same titles give the same vectors on every run
    u, s, _ = svds(ppmi, k=k, v0=np.full(n_tokens, n_tokens**-0.5))
    vectors = u * np.sqrt(s)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.where(norms > 1e-12, vectors / np.maximum(norms, 1e-12) * WORD_NORM, 0.0)
    out[:, :k] = vectors.astype(np.float32)
    out[:FIRST_ID] = 0.0
    return out
