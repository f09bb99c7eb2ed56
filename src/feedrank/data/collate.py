"""Pack rows of the example table (``feedrank.features.build.EXAMPLE_SCHEMA``) into a ``Batch``.

Histories are variable-length lists, oldest first. Two packings:

- padded (``pad_histories``, used by ``Batch``): ``[B, L]`` indices right-padded with 0 plus a bool
  mask, where ``L`` is the longest history in the batch after truncation to the last
  ``max_history`` items, but at least 1 so that every encoder sees a real tensor dimension even
  when no user in the batch has a history (the row is then all padding, mask all False);
- offsets (``history_offsets``): flat indices plus start offsets, the input of
  ``nn.EmbeddingBag(mode="mean")``, which avoids padding entirely.

Everything is vectorised over the Arrow list buffers; no per-row Python.

Item titles (``item_tokens``, lists of token indices) are padded the same way to ``[B, T]``.

``collate`` is where a ``Batch``'s values are checked (``check_values``), on the host, in NumPy,
before any tensor exists: indices against the vocabulary sizes (``BatchLimits``; without them only
``>= 0``; title tokens against ``n_tokens``), ages finite and ``>= 0``, counters finite, positions ``>= 0``. The models trust a Batch
and check only shapes, so their ``forward`` never reads a value back from the device (a sync per
check per step, and a graph break under ``torch.compile``).

Example::

    limits = BatchLimits(n_users=100, n_items=500, user_cat_sizes=[7, 10], item_cat_sizes=[42, 5, 14])
    batch = Collator(max_history=20, limits=limits)(table.slice(0, 1024))   # a Batch of 1024 rows
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from feedrank.data.batch import Batch, BatchLimits
from feedrank.features.build import ITEM_CAT_INDEX_COLUMNS, USER_CAT_INDEX_COLUMNS
from feedrank.features.counters import COUNTER_COLUMNS, cross_counter_columns

#: The example columns a ``Batch`` is made of (read only these from the shards).
BATCH_COLUMNS = (
    "user_idx", *USER_CAT_INDEX_COLUMNS, "history", "item_idx", *ITEM_CAT_INDEX_COLUMNS, "item_tokens", "item_age_h",
    *COUNTER_COLUMNS, "position", "clicked", "dwell_s", "shared", "hidden", "item_logq", "request",
)  # fmt: skip


def batch_columns(cross_counters: Sequence[str] = ()) -> tuple[str, ...]:
    """``BATCH_COLUMNS`` plus the cross-counter columns of ``cross_counters`` (item categorical
    columns, ``features.cross_counters``): what to read from the shards for such a ``Batch``."""
    return BATCH_COLUMNS + cross_counter_columns(cross_counters)


Rows = pa.Table | pa.RecordBatch
WeightFn = Callable[[Rows], np.ndarray]
KeepFn = Callable[[Rows], np.ndarray]


def _list_parts(histories: pa.Array | pa.ChunkedArray, max_len: int | None, name: str = "history") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values buffer, start of each kept slice, kept length) after keeping the last ``max_len``."""
    if isinstance(histories, pa.ChunkedArray):
        histories = histories.combine_chunks()
    if histories.null_count:
        raise ValueError(f"{name}: {histories.null_count} null list(s); the builder writes [] for none")
    offsets = histories.offsets.to_numpy()  # absolute into .values, respects slicing
    values = histories.values.to_numpy()
    starts, ends = offsets[:-1], offsets[1:]
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)  # truncate from the left: keep the most recent
    return values, starts, ends - starts


def _ragged_gather(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat positions ``[starts[0] .. starts[0]+lengths[0]) ++ [starts[1] ..) ++ ...``."""
    out_offsets = np.concatenate([[0], np.cumsum(lengths)])
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    return starts[row_of] + (np.arange(out_offsets[-1]) - out_offsets[row_of])


def pad_ragged(flat: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``([B, L] int64, [B, L] bool mask)`` from rows laid end to end in ``flat``, row ``i`` being
    the next ``lengths[i]`` values: right-padded with 0, ``L`` = the longest row but at least 1.

    The one padding rule for histories, shared by ``collate`` (training, evaluation) and
    ``feedrank.data.user_batch`` (user vectors offline and in serving), so a user's history reaches
    the user tower in the same layout everywhere.
    """
    width = max(1, int(lengths.max()) if len(lengths) else 1)
    mask = np.arange(width)[None, :] < lengths[:, None]
    padded = np.zeros(mask.shape, dtype=np.int64)
    padded[mask] = flat  # row-major fill = each row in order
    return padded, mask


def _pad(histories: pa.Array | pa.ChunkedArray, max_len: int | None, name: str = "history") -> tuple[np.ndarray, np.ndarray]:
    values, starts, lengths = _list_parts(histories, max_len, name)
    return pad_ragged(values[_ragged_gather(starts, lengths)], lengths)


def pad_list(lists: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """``[B, L] int64`` of Arrow int lists, right-padded with 0, ``L >= 1``: titles as the models take them."""
    return _pad(lists, None, name)[0]


def pad_histories(histories: pa.Array | pa.ChunkedArray, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] int64 indices, [B, L] bool mask)``, right-padded with 0, oldest first, ``L >= 1``."""
    padded, mask = _pad(histories, max_len)
    return torch.from_numpy(padded), torch.from_numpy(mask)


def history_offsets(histories: pa.Array | pa.ChunkedArray, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat int64 indices, [B] int64 offsets)`` for ``nn.EmbeddingBag(input, offsets)``.

    An empty history is an empty bag, which EmbeddingBag pools to zeros in ``sum``/``mean`` mode.
    """
    values, starts, lengths = _list_parts(histories, max_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return torch.from_numpy(values[_ragged_gather(starts, lengths)].astype(np.int64)), torch.from_numpy(offsets)


def _numpy(rows: Rows, name: str) -> np.ndarray:
    col = rows.column(name)
    if col.null_count:
        raise ValueError(f"column {name!r}: {col.null_count} null value(s) in a batch")
    return col.to_numpy(zero_copy_only=False)


def _pack(arrays: dict[str, np.ndarray], dtype: type) -> dict[str, torch.Tensor]:
    """Copy same-dtype arrays into one buffer and return shaped tensor views of it, by name.

    Why: a DataLoader worker sends a batch to the main process one shared-memory segment per
    tensor storage; a ``Batch`` of 16 separate tensors crossed about 2x slower than one whose
    tensors share 3 storages (int64, float32, bool). The views are disjoint, so a model sees no
    difference.
    """
    buf = np.empty(sum(a.size for a in arrays.values()), dtype=dtype)
    spans, at = {}, 0
    for name, a in arrays.items():
        buf[at : at + a.size] = a.reshape(-1)
        spans[name] = (at, a.shape)
        at += a.size
    flat = torch.from_numpy(buf)
    return {name: flat[o : o + int(np.prod(shape))].view(shape) for name, (o, shape) in spans.items()}


def _check_index(name: str, values: np.ndarray, size: int | None) -> None:
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or (size is not None and hi >= size):
        bound = f"[0, {size})" if size is not None else "[0, ...)"
        raise ValueError(f"{name} has indices outside the vocabulary {bound}: min {lo}, max {hi}")


def check_values(ints: dict[str, np.ndarray], floats: dict[str, np.ndarray], limits: BatchLimits | None) -> None:
    """Raise ``ValueError`` naming the first field whose values a model cannot take (module docstring).

    ``ints`` / ``floats`` are the arrays ``collate`` packs (names as in ``Batch``). Cheap: a min/max
    or an ``isfinite`` per column, on the host.
    """
    sizes: dict[str, int | None] = {"user": None, "item": None, "history": None, "item_tokens": None}
    user_cats: list[int | None] = [None] * ints["user_cats"].shape[1]
    item_cats: list[int | None] = [None] * ints["item_cats"].shape[1]
    if limits is not None:
        sizes = {"user": limits.n_users, "item": limits.n_items, "history": limits.n_items, "item_tokens": limits.n_tokens}
        for name, got, want in (("user_cats", user_cats, limits.user_cat_sizes), ("item_cats", item_cats, limits.item_cat_sizes)):
            if len(got) != len(want):
                raise ValueError(f"{name} has {len(got)} column(s) but the vocabularies have {len(want)}")
        user_cats, item_cats = list(limits.user_cat_sizes), list(limits.item_cat_sizes)
    for name, size in sizes.items():
        if name in ints:
            _check_index(name, ints[name], size)
    for name, column_sizes in (("user_cats", user_cats), ("item_cats", item_cats)):
        for j, size in enumerate(column_sizes):
            _check_index(f"{name}[:, {j}]", ints[name][:, j], size)
    ages = floats["item_age_h"]
    if not (np.isfinite(ages) & (ages >= 0)).all():
        raise ValueError("item_age_h has negative, NaN or infinite values; ages must be finite hours >= 0")
    for name in ("counters", "cross_counters"):
        if name in floats and not np.isfinite(floats[name]).all():
            raise ValueError(f"{name} has NaN or infinite values")
    if ints["position"].size and int(ints["position"].min()) < 0:
        raise ValueError(f"position must be >= 0, got min {int(ints['position'].min())}")


def collate(
    rows: Rows,
    max_history: int | None = None,
    weight: np.ndarray | WeightFn | None = None,
    limits: BatchLimits | None = None,
    keep: KeepFn | None = None,
    cross_counters: Sequence[str] = (),
) -> Batch:
    """Build a ``Batch`` from example rows; ``weight`` is an array or a function of the rows
    (default 1.0 for every row); ``limits`` the vocabulary sizes the indices are checked against.

    ``keep(rows)`` (optional) gives a bool mask of the rows to pack; the others are dropped here,
    on the host, so the model never computes them. It is only an optimisation: the loss must
    ignore the rows it drops (``two_tower_loss`` masks non-clicked rows itself), which is why a
    batch where ``keep`` drops every row is packed whole rather than empty.

    ``cross_counters`` (item categorical columns) packs their user x value counters into
    ``Batch.cross_counters``; the rows must come from a build with those ``features.cross_counters``.

    Raises ``ValueError`` naming a missing column, a bad weight or a bad value (``check_values``).
    """
    missing = [c for c in BATCH_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"example rows lack column(s) {missing}; expected the EXAMPLE_SCHEMA of feedrank.features")
    cross = cross_counter_columns(cross_counters)
    missing = [c for c in cross if c not in rows.column_names]
    if missing:
        raise ValueError(f"example rows lack the cross counter column(s) {missing}: build the features with "
                         f"features.cross_counters: {list(cross_counters)}")  # fmt: skip
    if rows.num_rows == 0:
        raise ValueError("cannot collate an empty set of rows")
    if keep is not None:
        mask = np.asarray(keep(rows), dtype=bool)
        if mask.shape != (rows.num_rows,):
            raise ValueError(f"keep: expected {rows.num_rows} booleans, got shape {mask.shape}")
        if mask.any() and not mask.all():
            rows = rows.filter(pa.array(mask))
    n = rows.num_rows
    w = np.ones(n, dtype=np.float32) if weight is None else np.asarray(weight(rows) if callable(weight) else weight, dtype=np.float32)
    if w.shape != (n,) or not np.isfinite(w).all():
        raise ValueError(f"weight: expected {n} finite values, got shape {w.shape}")
    col = lambda name: _numpy(rows, name)  # noqa: E731
    stack = lambda names: np.stack([col(c) for c in names], axis=1)  # noqa: E731
    history, mask = _pad(rows.column("history"), max_history)
    tokens = pad_list(rows.column("item_tokens"), "item_tokens")
    ints = {
        "user": col("user_idx"),
        "user_cats": stack(USER_CAT_INDEX_COLUMNS),
        "history": history,
        "item": col("item_idx"),
        "item_cats": stack(ITEM_CAT_INDEX_COLUMNS),
        "item_tokens": tokens,
        "position": col("position"),
        "request": col("request"),
    }
    floats = {
        "item_age_h": col("item_age_h"),
        "counters": stack(COUNTER_COLUMNS),
        "clicked": col("clicked"),
        "dwell_s": col("dwell_s"),
        "shared": col("shared"),
        "hidden": col("hidden"),
        "weight": w,
        "item_logq": col("item_logq"),
    }
    if cross:
        floats["cross_counters"] = stack(cross)
    check_values(ints, floats, limits)
    return Batch(**_pack(ints, np.int64), **_pack(floats, np.float32), history_mask=torch.from_numpy(mask))


@dataclass
class Collator:
    """``collate`` with fixed settings, picklable, for ``DataLoader(collate_fn=...)``.

    ``weight`` and ``keep`` must be module-level functions or picklable objects (not lambdas) when
    DataLoader workers are used, because the collator is pickled into each worker.
    """

    max_history: int | None = None
    weight: WeightFn | None = None
    limits: BatchLimits | None = None
    keep: KeepFn | None = None
    cross_counters: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """The example columns this collator reads (``batch_columns``)."""
        return batch_columns(self.cross_counters)

    def __call__(self, rows: Rows) -> Batch:
        return collate(rows, self.max_history, self.weight, self.limits, self.keep, self.cross_counters)
