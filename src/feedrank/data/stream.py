"""Stream Parquet example shards into training batches, split across ranks and DataLoader workers.

Work is divided into *units*, contiguous row ranges of one row group: every (rank, worker) pair is
one *slot* ``rank * num_workers + worker`` of ``world_size * num_workers``, and slot ``s`` reads units
``order[s::n_slots]``. Each unit is read by exactly one slot, so across all ranks and workers every
row is yielded exactly once per epoch (unless ``even_batches`` drops some, see below). A unit is a
whole row group when there are enough of them; a small log with fewer row groups than
``UNITS_PER_SLOT`` per slot has its groups cut into slices (of at least one batch), so that two ranks
can share a single-row-group file instead of one of them getting nothing.

Shuffling is deterministic in ``(seed, epoch)``: the row-group order is permuted per epoch, and each
slot shuffles rows within a buffer of ``shuffle_buffer_rows`` rows (row groups mix across the buffer).
Call ``set_epoch`` before iterating each epoch; with ``persistent_workers=True`` the workers keep
their own copy of the dataset and would not see it, so ``make_loader`` leaves workers non-persistent.

DDP caveat: ranks can receive different numbers of batches (row groups differ in size and do not
divide evenly), and a rank that runs out first leaves the others waiting forever in their next
all-reduce. ``even_batches=True`` prevents that: every slot computes, from the Parquet metadata
alone (no communication), how many full batches each slot at its worker index can fill on every
rank, and yields only the minimum, so every rank yields the same number of full batches. The rows
left over (at most a batch or so per slot, plus any imbalance) are dropped for that epoch; with
shuffling they are different rows each epoch. Every rank must use the same ``num_workers``.

The dataset yields ``pyarrow.Table`` chunks of ``batch_size`` rows; ``make_loader`` turns them into
``Batch`` inside the workers with ``feedrank.data.collate.Collator``.

Example::

    ds = ParquetStream(split_files("runs/features", "train"), batch_size=1024, columns=BATCH_COLUMNS,
                       shuffle=True, seed=0)
    loader = make_loader(ds, num_workers=2)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for batch in loader: ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from feedrank.data.collate import Collator


#: Enough units per slot that unequal row groups still spread evenly over ranks and workers.
UNITS_PER_SLOT = 4


@dataclass(frozen=True)
class RowGroup:
    file: Path
    index: int
    rows: int


@dataclass(frozen=True)
class Unit:
    """Rows ``[start, start + rows)`` of one row group: the piece of work one slot reads."""

    group: RowGroup
    start: int
    rows: int


def split_units(groups: Sequence[RowGroup], n_slots: int, min_rows: int) -> list[Unit]:
    """Cut row groups into units so there are about ``UNITS_PER_SLOT * n_slots`` of them.

    Groups are only cut when there are too few, and never below ``min_rows`` rows per slice: a
    slice costs a read of its whole row group, which is cheap exactly when the log is small.
    """
    wanted = UNITS_PER_SLOT * n_slots
    if n_slots == 1 or len(groups) >= wanted:
        return [Unit(g, 0, g.rows) for g in groups]
    pieces = -(-wanted // max(len(groups), 1))
    units = []
    for g in groups:
        n = max(1, min(pieces, g.rows // max(min_rows, 1)))
        bounds = np.linspace(0, g.rows, n + 1).astype(np.int64)
        units += [Unit(g, int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    return units


def list_row_groups(files: Sequence[str | Path]) -> list[RowGroup]:
    """Every row group of ``files``, in file order, from the Parquet footers only."""
    groups = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"no Parquet shard at {path}")
        meta = pq.ParquetFile(path).metadata
        groups += [RowGroup(path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    return groups


def read_unit_rows(file: Path, index: int, columns: list[str] | None) -> pa.Table:
    """Row group ``index`` of ``file``, the file closed after the read.

    Why not keep each file open for the epoch: after a ``read_row_group`` an open ``ParquetFile``
    keeps ~3 MiB of Arrow buffers (a 1M-row example file, 16 row groups) plus ~0.4 MiB of parsed
    footer until it is closed, so a pass that had read from every example file held all of them:
    the train pass's peak RSS grew with the number of files (+131 MiB from 20 to 50 files, 4.6 B an
    example). Opening a file again costs one footer parse (~45 kB) per row group read.
    """
    with pq.ParquetFile(file) as parquet:
        return parquet.read_row_group(index, columns=columns)


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win (tests, single-process simulation); else torch.distributed; else 0 of 1."""
    if rank is None and world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    return rank, world_size


class ParquetStream(IterableDataset):
    """An iterable over ``batch_size``-row ``pyarrow.Table`` chunks of Parquet shards."""

    def __init__(
        self,
        files: Sequence[str | Path],
        batch_size: int,
        columns: Sequence[str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer_rows: int = 65_536,
        rank: int | None = None,
        world_size: int | None = None,
        even_batches: bool = False,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not files:
            raise ValueError("ParquetStream: no files given")
        self.row_groups = list_row_groups(files)
        self.batch_size = batch_size
        self.columns = list(columns) if columns is not None else None
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_rows = max(shuffle_buffer_rows, batch_size)
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.even_batches = even_batches
        self.drop_last = drop_last or even_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def total_rows(self) -> int:
        return sum(g.rows for g in self.row_groups)

    def _units(self, num_workers: int) -> list[Unit]:
        """This epoch's units in reading order (shuffled when ``shuffle``)."""
        units = split_units(self.row_groups, self.world_size * num_workers, self.batch_size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        return units

    def _slot_rows(self, num_workers: int) -> np.ndarray:
        """Rows each slot receives this epoch, shape [world_size, num_workers]."""
        n_slots = self.world_size * num_workers
        sizes = np.array([u.rows for u in self._units(num_workers)], dtype=np.int64)
        per_slot = np.bincount(np.arange(len(sizes)) % n_slots, weights=sizes, minlength=n_slots)
        return per_slot.astype(np.int64).reshape(self.world_size, num_workers)

    def _batch_caps(self, num_workers: int) -> np.ndarray | None:
        """Per worker index, the batches every rank can fill there (``even_batches``), else None."""
        if not self.even_batches:
            return None
        return (self._slot_rows(num_workers) // self.batch_size).min(axis=0)

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields this epoch with a DataLoader of ``num_workers`` workers."""
        rows = self._slot_rows(max(num_workers, 1))[self.rank]
        caps = self._batch_caps(max(num_workers, 1))
        if caps is not None:
            return int(caps.sum())
        per_worker = rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return int(per_worker.sum())

    def __iter__(self) -> Iterator[pa.Table]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * num_workers + worker, self.world_size * num_workers
        caps = self._batch_caps(num_workers)
        limit = None if caps is None else int(caps[worker])
        if caps is not None and caps.sum() == 0 and self.total_rows:
            raise ValueError(
                f"even_batches: {self.total_rows} row(s) in {len(self.row_groups)} row group(s) cannot give "
                f"every one of {n_slots} slots (ranks x workers) a full batch of {self.batch_size}; use "
                "fewer ranks or workers, or a smaller batch"
            )
        mine = self._units(num_workers)[slot::n_slots]
        batches = self._batches(mine, np.random.default_rng([self.seed, self.epoch, slot]))
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            yield batch

    def _batches(self, units: list[Unit], rng: np.random.Generator) -> Iterator[pa.Table]:
        buffer: list[pa.Table] = []
        buffered = 0
        for u in units:
            g = u.group
            table = read_unit_rows(g.file, g.index, self.columns).slice(u.start, u.rows)
            buffer.append(table)
            buffered += table.num_rows
            if buffered >= self.shuffle_buffer_rows:
                rest = yield from self._drain(buffer, rng, final=False)
                buffer, buffered = [rest], rest.num_rows
        if buffered:
            yield from self._drain(buffer, rng, final=True)

    def _drain(self, buffer: list[pa.Table], rng: np.random.Generator, final: bool) -> Iterator[pa.Table]:
        """Yield full batches from the (shuffled) buffer; return the remainder, or on the final
        drain yield it as a last partial batch unless ``drop_last``."""
        table = pa.concat_tables(buffer).combine_chunks()
        if self.shuffle:
            table = table.take(pa.array(rng.permutation(table.num_rows)))
        n_full = table.num_rows // self.batch_size
        for i in range(n_full):
            yield table.slice(i * self.batch_size, self.batch_size)
        rest = table.slice(n_full * self.batch_size)
        if final and rest.num_rows and not self.drop_last:
            yield rest
        return rest


def make_loader(
    dataset: ParquetStream,
    num_workers: int = 0,
    collator: Collator | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> DataLoader:
    """A DataLoader yielding ``Batch``: the dataset already batches, the collator runs in workers.

    Build the dataset with ``columns=BATCH_COLUMNS`` so that raw id strings are not read for nothing.
    """
    return DataLoader(
        dataset,
        batch_size=None,  # chunks arrive batched; no auto-collation
        collate_fn=collator or Collator(),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,  # so set_epoch reaches the workers (see module docstring)
    )
