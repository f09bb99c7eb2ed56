"""Vocabularies: string ids -> int64 indices, with the index conventions of ``feedrank.data.batch``.

Index layout of one ``Vocab`` of ``n`` known ids and ``K`` hash buckets::

    0            padding (never produced by a lookup; collate uses it for empty history slots)
    1            out-of-vocabulary (OOV): unknown ids when K == 0, and nulls always
    2 .. n+1     known ids, most frequent first (ties broken by id, so building is deterministic)
    n+2 .. n+K+1 hash buckets: an unknown id goes to bucket ``stable_hash(id) % K``

Hash buckets are for open catalogues (news articles appear every minute): an unseen id still gets
its own, stable, if shared, embedding instead of collapsing into the single OOV row. The hash is
FNV-1a (64 bit) over the UTF-8 bytes, computed in numpy, so it is the same on every machine,
process and Python version (Python's ``hash`` is salted per process and would not be).

Every lookup counts its unknown ids in ``Vocab.oov_hits`` (hashed ones included: they were not in
the vocabulary) so that callers can report how much of an evaluation set the model never saw.
Nulls (metadata a source does not have) map to OOV but are not counted: they are missing, not new.

Title tokens (``title_tokens``) are the words of an item's title, lower-cased, split on anything
that is not a letter or a digit (Unicode-aware), at most ``max_tokens`` per title. Their vocabulary
(``Vocabularies.tokens``) counts each word once per *item* (document frequency), not per impression:
a popular item would otherwise decide which words are kept. It is what lets the item tower embed
an item it has never seen from its content (``feedrank.models.towers.ItemTower``). With
``features.content_fields: [title, abstract]`` the same vocabulary holds the abstracts' words too
(``VocabCounter.text_fields``; ``feedrank.features.text`` says why one table).

Example::

    v = Vocab.build(pa.array(["b", "a", "b", "c"]), name="items")
    v.lookup(["b", "a", "zzz", None])    # array([2, 3, 1, 1]); v.oov_hits == 1
    title_tokens(["Storm hits coast", None])   # [["storm", "hits", "coast"], []]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PAD = 0
OOV = 1
FIRST_ID = 2

#: Categorical columns of the canonical log that become embedding features, in ``Batch`` order.
USER_CAT_COLUMNS = ("age_bucket", "country")
ITEM_CAT_COLUMNS = ("publisher", "item_type", "category")

#: Name of the title-token vocabulary (file ``title_tokens.json`` in a vocabulary folder).
TOKENS_NAME = "title_tokens"
_TOKEN_SPLIT = r"[^\p{L}\p{N}]+"

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_VOCAB_FORMAT = 1

ArrayLike = pa.Array | pa.ChunkedArray | np.ndarray | Sequence[str | None]


def _as_string_array(values: ArrayLike) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        values = pa.array(np.asarray(values, dtype=object) if isinstance(values, np.ndarray) else values, type=pa.string())
    if values.type != pa.string():
        values = values.cast(pa.string())
    return values


def stable_hash(values: ArrayLike) -> np.ndarray:
    """64-bit FNV-1a of each string's UTF-8 bytes (nulls hash like the empty string).

    Vectorised over strings: the only Python loop runs over byte positions (the longest string's
    length), each step updating every string that is at least that long.
    """
    arr = _as_string_array(values).cast(pa.large_string())
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n == 0:
        return h
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    if arr.null_count:  # a null slot may still own bytes in the buffer; hash it as ""
        lengths = np.where(np.asarray(arr.is_null()), 0, lengths)
    # Visit strings longest first so that "strings longer than j bytes" is always a prefix.
    order = np.argsort(-lengths, kind="stable")
    neg_len = -lengths[order]
    sorted_starts = starts[order]
    hs = h[order]
    for j in range(int(-neg_len[0])):
        k = int(np.searchsorted(neg_len, -j, side="left"))
        hs[:k] = (hs[:k] ^ data[sorted_starts[:k] + j].astype(np.uint64)) * _FNV_PRIME
    h[order] = hs
    return h


def title_tokens(titles: ArrayLike, max_tokens: int | None = None) -> pa.ListArray:
    """The words of each title (module docstring): a list per title, ``[]`` for a null or empty one,
    keeping the first ``max_tokens`` words. Vectorised in Arrow; no per-title Python."""
    arr = pc.utf8_lower(_as_string_array(titles).fill_null(""))
    split = pc.split_pattern_regex(arr, _TOKEN_SPLIT)
    words = pc.list_flatten(split)
    parent = pc.list_parent_indices(split).to_numpy()
    keep = pc.not_equal(words, "").to_numpy(zero_copy_only=False)
    parent = parent[keep]
    counts = np.bincount(parent, minlength=len(arr))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(parent)) - starts[parent]  # position of each kept word in its title
    if max_tokens is not None:
        keep_rank = rank < max_tokens
        keep[np.flatnonzero(keep)[~keep_rank]] = False
        counts = np.minimum(counts, max_tokens)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), words.filter(pa.array(keep)))


def token_indices(vocab: Vocab, tokens: pa.ListArray) -> pa.ListArray:
    """``tokens`` (lists of words) as lists of ``vocab`` indices: the same offsets, each word looked
    up (an unknown word is OOV or its hash bucket, counted in ``vocab.oov_hits``)."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    values = vocab.lookup(pc.list_flatten(tokens))
    offsets = pc.subtract(tokens.offsets, tokens.offsets[0]) if len(tokens) else tokens.offsets
    return pa.ListArray.from_arrays(offsets, pa.array(values, pa.int64()))


@dataclass(frozen=True)
class VocabSpec:
    """How to build one vocabulary. ``max_size`` counts known ids only (not pad, OOV or buckets)."""

    min_count: int = 1
    max_size: int | None = None
    hash_buckets: int = 0

    def validate(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.max_size is not None and self.max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {self.max_size}")
        if self.hash_buckets < 0:
            raise ValueError(f"hash_buckets must be >= 0, got {self.hash_buckets}")


@dataclass
class Vocab:
    """A frozen id -> index mapping; see the module docstring for the index layout."""

    name: str
    ids: list[str]
    hash_buckets: int = 0
    oov_hits: int = field(default=0, compare=False)
    _value_set: pa.Array = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"vocab {self.name!r}: duplicate ids")
        self._value_set = pa.array(self.ids, type=pa.string())

    @classmethod
    def build(cls, values: ArrayLike, name: str, spec: VocabSpec = VocabSpec()) -> Vocab:
        """Count ``values`` (nulls ignored) and keep ids by descending count, then ascending id."""
        coder = IdCoder()
        codes = coder.encode(values)
        return cls.from_counts(coder.ids, np.bincount(codes[codes >= 0], minlength=len(coder)), name, spec)

    @classmethod
    def from_counts(cls, ids: pa.Array, counts: np.ndarray, name: str, spec: VocabSpec = VocabSpec()) -> Vocab:
        """The vocabulary of distinct ``ids`` seen ``counts`` times (0: not in the window, never kept):
        ids by descending count, then ascending id, ``spec`` applied. ``build`` counts, then calls this;
        a streaming build (``VocabCounter``) accumulates the counts chunk by chunk first."""
        spec.validate()
        counts = pa.table({"id": ids, "count": pa.array(np.asarray(counts, dtype=np.int64))})
        counts = counts.filter(pc.greater_equal(counts["count"], max(spec.min_count, 1)))
        if counts.num_rows == 0:
            return cls(name=name, ids=[], hash_buckets=spec.hash_buckets)
        counts = counts.sort_by([("count", "descending"), ("id", "ascending")])
        if spec.max_size is not None:
            counts = counts.slice(0, spec.max_size)
        return cls(name=name, ids=counts["id"].to_pylist(), hash_buckets=spec.hash_buckets)

    def __len__(self) -> int:
        """Embedding-table size: pad + OOV + known ids + hash buckets."""
        return FIRST_ID + len(self.ids) + self.hash_buckets

    def lookup(self, values: ArrayLike) -> np.ndarray:
        """Indices of ``values`` (int64). Unknown ids go to OOV or a hash bucket and are counted in
        ``oov_hits``; nulls (missing metadata) go to OOV uncounted, since they are not unknown ids."""
        arr = _as_string_array(values)
        found = pc.index_in(arr, value_set=self._value_set)
        idx = np.array(pc.fill_null(pc.add(found.cast(pa.int64()), FIRST_ID), OOV), dtype=np.int64)
        unseen = np.asarray(found.is_null()) & np.asarray(arr.is_valid())
        self.oov_hits += int(unseen.sum())
        if self.hash_buckets and unseen.any():
            rows = np.flatnonzero(unseen)
            idx[rows] = self.unknown_indices(arr.take(pa.array(rows)))
        return idx

    def unknown_indices(self, values: ArrayLike) -> np.ndarray:
        """Indices of ids known to be *outside* ``ids``: each one's hash bucket
        (``FIRST_ID + len(ids) + stable_hash(id) % hash_buckets``), or OOV without buckets; nulls
        are OOV. The one home of the bucket rule: ``lookup`` applies it to its misses, and
        ``feedrank.serving.state.VocabIndex`` (O(1) per id) to the single id it did not find.
        Not counted in ``oov_hits``: the caller knows whether this is an evaluation."""
        if not self.hash_buckets:
            return np.full(len(values), OOV, dtype=np.int64)
        arr = _as_string_array(values)
        idx = FIRST_ID + len(self.ids) + (stable_hash(arr) % np.uint64(self.hash_buckets)).astype(np.int64)
        if arr.null_count:
            idx[np.asarray(arr.is_null())] = OOV
        return idx

    def to_json(self) -> dict:
        return {"format": _VOCAB_FORMAT, "name": self.name, "hash_buckets": self.hash_buckets, "ids": self.ids}

    @classmethod
    def from_json(cls, data: dict, where: str = "") -> Vocab:
        try:
            if data["format"] != _VOCAB_FORMAT:
                raise ValueError(f"unsupported vocab format {data['format']!r} (expected {_VOCAB_FORMAT})")
            return cls(name=data["name"], ids=list(data["ids"]), hash_buckets=int(data["hash_buckets"]))
        except KeyError as exc:
            raise ValueError(f"{where or 'vocab'}: missing key {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no vocabulary at {path}")
        return cls.from_json(json.loads(path.read_text()), where=str(path))


@dataclass
class Vocabularies:
    """Every vocabulary a model needs, with the sizes that fix its embedding tables."""

    users: Vocab
    items: Vocab
    user_cats: dict[str, Vocab]  # keys in USER_CAT_COLUMNS order
    item_cats: dict[str, Vocab]  # keys in ITEM_CAT_COLUMNS order
    # Title words (module docstring); None for vocabularies saved before titles were features.
    tokens: Vocab | None = None

    @classmethod
    def build(
        cls,
        events: pa.Table,
        users: VocabSpec = VocabSpec(),
        items: VocabSpec = VocabSpec(),
        categorical: VocabSpec = VocabSpec(),
        tokens: VocabSpec = VocabSpec(),
    ) -> Vocabularies:
        """Build from the (training-window) rows of a canonical-schema table; counts are impressions,
        except title words, counted once per item (its latest row's title) when ``events`` has titles."""
        counter = VocabCounter()
        counter.add(events)
        return counter.vocabularies(users, items, categorical, tokens)

    @property
    def n_tokens(self) -> int:
        """Size of the title-token table (0 when there is no token vocabulary)."""
        return len(self.tokens) if self.tokens is not None else 0

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def user_cat_sizes(self) -> list[int]:
        return [len(v) for v in self.user_cats.values()]

    @property
    def item_cat_sizes(self) -> list[int]:
        return [len(v) for v in self.item_cats.values()]

    def all(self) -> dict[str, Vocab]:
        """Every vocabulary by its column name (``user_id``, ``item_id``, then the categoricals)."""
        return {"user_id": self.users, "item_id": self.items, **self.user_cats, **self.item_cats}

    def oov_hits(self) -> dict[str, int]:
        return {name: v.oov_hits for name, v in self.all().items()}

    def reset_oov_hits(self) -> None:
        for v in self.all().values():
            v.oov_hits = 0

    def save(self, directory: str | Path) -> None:
        """One JSON file per vocabulary plus ``vocabularies.json`` naming them and the layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, vocab in self.all().items():
            vocab.save(directory / f"{name}.json")
        index = {
            "format": _VOCAB_FORMAT,
            "user_cats": list(self.user_cats),
            "item_cats": list(self.item_cats),
            "sizes": {name: len(v) for name, v in self.all().items()},
        }
        if self.tokens is not None:
            self.tokens.save(directory / f"{TOKENS_NAME}.json")
            index["tokens"] = TOKENS_NAME
        (directory / "vocabularies.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Vocabularies:
        directory = Path(directory)
        index_path = directory / "vocabularies.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"no vocabularies at {directory}: expected {index_path}")
        index = json.loads(index_path.read_text())
        for key in ("user_cats", "item_cats"):
            if key not in index:
                raise ValueError(f"{index_path}: missing key {key!r}")
        load = lambda name: Vocab.load(directory / f"{name}.json")  # noqa: E731
        return cls(
            users=load("user_id"),
            items=load("item_id"),
            user_cats={c: load(c) for c in index["user_cats"]},
            item_cats={c: load(c) for c in index["item_cats"]},
            tokens=load(index["tokens"]) if "tokens" in index else None,
        )


class IdCoder:
    """Dense int64 codes of string ids, in order of first appearance, grown chunk by chunk.

    Codes are grouping keys independent of any vocabulary (two users both OOV keep their own
    histories); a streaming pass encodes every chunk against the ids seen so far, so the codes of a
    log read in chunks are the codes of the whole log. Nulls get -1.
    """

    def __init__(self) -> None:
        self.ids: pa.Array = pa.array([], pa.string())

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, values: ArrayLike) -> np.ndarray:
        arr = _as_string_array(values)
        found = pc.index_in(arr, value_set=self.ids)
        if found.null_count > arr.null_count:  # ids not seen before: append them, first seen first
            new = pc.unique(arr.filter(pc.and_(pc.is_null(found), pc.is_valid(arr))))
            self.ids = pa.concat_arrays([self.ids, new])
            found = pc.index_in(arr, value_set=self.ids)
        return found.cast(pa.int64()).fill_null(-1).to_numpy()


def add_counts(counts: np.ndarray, codes: np.ndarray, size: int) -> np.ndarray:
    """``counts`` (grown with zeros to ``size``) plus how often each code in ``codes`` occurs."""
    grown = np.zeros(size, dtype=np.int64)
    grown[: len(counts)] = counts
    return grown + np.bincount(codes, minlength=size)


def latest_per_group(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct group codes and, for each, the index of its last row (rows in log order)."""
    distinct, first_from_end = np.unique(groups[::-1], return_index=True)
    return distinct, len(groups) - 1 - first_from_end


class VocabCounter:
    """The counts every vocabulary is built from, accumulated over chunks of rows in log order.

    ``add`` encodes every row it is given (``coders``: the dense codes of each id column, which a
    streaming feature build reuses as grouping keys) and counts those marked ``counted`` (the
    training window): impressions per id, and for content words each item's latest counted row's
    ``text_fields`` (title, and abstract when ``features.content_fields`` has it).
    ``Vocabularies.build`` is one ``add`` of a whole table; the feature build adds chunk by chunk.
    """

    def __init__(self, text_fields: Sequence[str] = ("title",)) -> None:
        self.coders = {name: IdCoder() for name in ("user_id", "item_id", *USER_CAT_COLUMNS, *ITEM_CAT_COLUMNS)}
        self.counts = {name: np.zeros(0, np.int64) for name in self.coders}
        # The item text columns whose words make the token vocabulary (features.content_fields).
        self.text_fields = tuple(text_fields)
        self._texts: dict[str, IdCoder] | None = None  # None until a chunk with any text field
        self._latest_text: dict[str, np.ndarray] = {}  # per field, per item code: text code, -1 null, -2 no counted row

    def add(self, rows: pa.Table, counted: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Encode and count one chunk (``counted``: the rows inside the window; all by default).
        Returns each id column's codes for the chunk's rows."""
        codes = {}
        for name, coder in self.coders.items():
            codes[name] = coder.encode(rows[name])
            kept = codes[name] if counted is None else codes[name][counted]
            self.counts[name] = add_counts(self.counts[name], kept[kept >= 0], len(coder))
        if any(f in rows.column_names for f in self.text_fields):
            self._add_texts(codes["item_id"], rows, counted)
        return codes

    def _add_texts(self, item_code: np.ndarray, rows: pa.Table, counted: np.ndarray | None) -> None:
        """Each counted item's latest row's text fields (a field the chunk lacks reads as null)."""
        if self._texts is None:
            self._texts = {f: IdCoder() for f in self.text_fields}
        at = np.arange(len(item_code)) if counted is None else np.flatnonzero(counted)
        items, last = latest_per_group(item_code[at])
        n_items = len(self.coders["item_id"])
        take = pa.array(at[last], pa.int64())
        for name, coder in self._texts.items():
            latest = np.full(n_items, -2, dtype=np.int64)
            previous = self._latest_text.get(name, np.zeros(0, np.int64))
            latest[: len(previous)] = previous
            texts = rows[name] if name in rows.column_names else pa.nulls(rows.num_rows, pa.string())
            latest[items] = coder.encode(_as_string_array(texts).take(take))
            self._latest_text[name] = latest

    def vocabularies(
        self,
        users: VocabSpec = VocabSpec(),
        items: VocabSpec = VocabSpec(),
        categorical: VocabSpec = VocabSpec(),
        tokens: VocabSpec = VocabSpec(),
    ) -> Vocabularies:
        specs = {"user_id": users, "item_id": items} | {c: categorical for c in (*USER_CAT_COLUMNS, *ITEM_CAT_COLUMNS)}
        vocabs = {name: Vocab.from_counts(self.coders[name].ids, self.counts[name], name, specs[name]) for name in specs}
        words = None
        if self._texts is not None:
            per_field = []
            for name, coder in self._texts.items():
                latest = self._latest_text[name]
                latest = latest[latest >= -1]  # one text per counted item; -1: null
                nulls = pa.nulls(len(latest), pa.string())
                texts = coder.ids.take(pa.array(np.where(latest >= 0, latest, 0))) if len(coder) else nulls
                texts = pc.if_else(pa.array(latest >= 0, pa.bool_()), texts, nulls)
                per_field.append(pc.list_flatten(title_tokens(texts)))
            words = Vocab.build(pa.concat_arrays(per_field), TOKENS_NAME, tokens)
        return Vocabularies(
            users=vocabs["user_id"],
            items=vocabs["item_id"],
            user_cats={c: vocabs[c] for c in USER_CAT_COLUMNS},
            item_cats={c: vocabs[c] for c in ITEM_CAT_COLUMNS},
            tokens=words,
        )


def lookup_quiet(vocab: Vocab, values: ArrayLike) -> np.ndarray:
    """``vocab.lookup`` that leaves ``oov_hits`` alone: building features or a catalogue, or serving,
    is not an evaluation, so its unknown ids are not counted as one's."""
    hits = vocab.oov_hits
    try:
        return vocab.lookup(values)
    finally:
        vocab.oov_hits = hits
