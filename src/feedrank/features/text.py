"""An item's content words: which text fields a title bag reads, and its words' starting vectors.

Content fields (``features.content_fields``, default ``[title]``): the item text columns whose words
one ``TitleBag`` reads, concatenated in ``CONTENT_FIELDS`` order, each cut to its own length
(``title_len``, ``abstract_len``). One bag over title and abstract words, not a second bag: a news
abstract says what its title says at greater length, in the same words, so its words belong in the
same table and the same mean; a second bag would double the item side's text parameters and every
caller's plumbing (history lookups by item index, the ranker's match field, published items) for
no different kind of signal. The default reads titles only, so a bundle, a feature build and a
figure made before abstracts existed are unchanged; a log without an ``abstract`` column reads as
null abstracts. ``content_tokens`` is the one tokeniser of every caller: the feature build's
``item_tokens``, the bundle catalogue's ``title_tokens`` (named so before abstracts; it holds the
content tokens) and ``POST /items``.

Starting vectors for content words: a truncated SVD of the words' positive PMI over item titles.

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

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from feedrank.features.vocab import FIRST_ID, Vocab, lookup_quiet, title_tokens

#: The item text columns content tokens may read, in the order their words are concatenated.
CONTENT_FIELDS = ("title", "abstract")


def check_content_fields(fields: Sequence[str]) -> None:
    """Raise unless ``fields`` is a non-empty, duplicate-free list of ``CONTENT_FIELDS`` names."""
    unknown = [f for f in fields if f not in CONTENT_FIELDS]
    if unknown or not fields or len(set(fields)) != len(fields):
        raise ValueError(f"content_fields must be distinct names of {list(CONTENT_FIELDS)} (at least one), got {list(fields)}")


def content_tokens(vocab: Vocab | None, rows: pa.Table, lens: Mapping[str, int]) -> pa.ListArray:
    """Each row's content as token indices of ``vocab``: for each field of ``lens`` (field -> words
    kept, the first ones) in ``CONTENT_FIELDS`` order, its words, concatenated. A field ``rows``
    lacks (a log or journal from before abstracts) or a null value adds no words; without a token
    vocabulary every list is empty. Each distinct text is tokenised once (titles repeat on every
    impression), and ``vocab.oov_hits`` is left alone: building features or a catalogue, or
    publishing, is not an evaluation."""
    n = rows.num_rows
    if vocab is None:
        return pa.array([[]] * n, pa.list_(pa.int64()))
    parts = []
    for name in [f for f in CONTENT_FIELDS if f in lens]:
        if name not in rows.column_names:
            continue
        encoded = rows[name].combine_chunks().cast(pa.string()).dictionary_encode()
        words = title_tokens(encoded.dictionary, lens[name])
        values = lookup_quiet(vocab, pc.list_flatten(words))
        per_text = pa.ListArray.from_arrays(words.offsets, pa.array(values, pa.int64()))
        per_text = pa.concat_arrays([per_text, pa.array([[]], per_text.type)])  # the null text
        parts.append(per_text.take(encoded.indices.fill_null(len(words))))
    if not parts:
        return pa.array([[]] * n, pa.list_(pa.int64()))
    return _concat_rows(parts, n)


def _concat_rows(parts: list[pa.ListArray], n: int) -> pa.ListArray:
    """Row ``r`` of the result = row ``r`` of each part, in order (a row-wise list concatenation)."""
    if len(parts) == 1:
        return parts[0]
    lengths = np.stack([pc.list_value_length(p).to_numpy(zero_copy_only=False) for p in parts]).astype(np.int64)
    keys = np.concatenate([np.repeat(np.arange(n, dtype=np.int64) * len(parts) + f, lengths[f]) for f in range(len(parts))])
    values = pa.concat_arrays([pc.list_flatten(p) for p in parts]).take(pa.array(np.argsort(keys, kind="stable")))
    offsets = np.concatenate([[0], np.cumsum(lengths.sum(axis=0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)

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
