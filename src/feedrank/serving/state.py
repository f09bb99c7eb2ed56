"""What the feed service knows about users, and where ``POST /events`` rows go.

Three parts, each with one job:

- ``VocabIndex``: id -> vocabulary index in O(1) per id. ``Vocab.lookup`` builds a hash set of the
  whole vocabulary on every call (about 0.2 s for a million ids), right for a batch job and far too
  slow per request; this keeps one dict per vocabulary for the life of the process.
- ``UserStore``: each user's recent engagements (the user tower's history), the items they were
  already shown ("seen"), their impression/click counts and categorical attributes. It is a
  columnar *snapshot* seeded from the canonical log (immutable, vectorised to build), a *journal*
  of every live event applied (columnar, 29 bytes an event) and an *overlay* of records of users
  touched by live events (an LRU of at most ``max_live_users``; a record is built from the
  snapshot plus the user's journal rows, by the same rule live events use, so eviction loses
  nothing). Each live event carries an id: the store applies each ``(user, event_id)`` once, so
  retries, replays and a second delivery are harmless. Item ids are held as two-tower vocabulary
  indices. With ``cross`` (a ranker reading ``features.cross_counters``) the store also counts each
  user's impressions and clicks per value of those item columns (category, publisher), keyed by the
  ranker's vocabulary index as the feature build keys them (``CrossCounters``), from the seeding
  log and every live event, so a feed request sees what the feature build computes for the user's
  next impression.
- ``EventSink``: the append-only serving log, in the canonical layout
  (``DIR/events/date=YYYY-MM-DD/part-<uuid>.parquet``, ``SERVING_LOG_SCHEMA``: the canonical
  columns plus ``event_id``) so ``feedrank.data.log.read_events`` reads it like any other log and
  the next training run can use it. Each file is written under a hidden name, locked, and renamed
  into place, so a reader never sees half a file (pyarrow datasets skip names starting with ".");
  a temporary file a killed writer left is removed at the next start. Durability: see
  ``EventLogConfig``.

**The serving log is the source of truth.** At startup the service replays it into the store, and
every worker keeps reading the files other workers write (``feedrank.serving.follow``), so a
restart forgets nothing accepted and workers converge whatever Redis did; the Redis event bus
(``feedrank.serving.bus``) is only the millisecond fast path between workers.

Example::

    store = UserStore.from_log("runs/demo/log", vocabs.items, history_len=50, max_seen=2000, end=now)
    view = store.view("u17", now)          # UserView(history=array([...]), seen=..., clicks=3, ...)
    store.apply(events_table, item_idx)    # after POST /events: which rows were new (by event_id)
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from bisect import insort
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from feedrank.features.counters import scale_counts
from feedrank.data.log import EVENTS_DIR, day_of, list_days, read_events
from feedrank.data.schema import EVENT_SCHEMA, to_epoch_us
from feedrank.features.user_state import user_state
from feedrank.features.vocab import FIRST_ID, OOV, USER_CAT_COLUMNS, Vocab, lookup_quiet
from feedrank.fsutil import staged_file
from feedrank.serving.config import EventLogConfig
from feedrank.serving.validation import check_dwell, check_id, check_ts, check_ts_text

log = logging.getLogger(__name__)

EVENT_ID = "event_id"
#: The serving log's rows: the canonical ``EVENT_SCHEMA`` plus each event's id, the key that makes
#: replays and retries idempotent. ``read_events`` opens a log with ``EVENT_SCHEMA`` and so reads the
#: serving log like any other canonical log (the extra column is not read).
SERVING_LOG_SCHEMA = EVENT_SCHEMA.append(pa.field(EVENT_ID, pa.string(), nullable=False))

# ------------------------------------------------------------------------------------------------
# ids -> indices


class VocabIndex:
    """``Vocab``'s index layout (``feedrank.features.vocab``) with O(1) lookups of single ids."""

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._index = dict(zip(vocab.ids, range(FIRST_ID, FIRST_ID + len(vocab.ids))))

    def known(self, value: str | None) -> bool:
        return value in self._index

    def index_of(self, value: str | None) -> int:
        """The index of a known ``value``; -1 for any other (no hash bucket: the caller refuses it)."""
        return self._index.get(value, -1)

    def __call__(self, value: str | None) -> int:
        """The index of ``value``: its own row, else ``Vocab.unknown_indices`` (hash bucket or OOV),
        as ``Vocab.lookup`` gives; a null is OOV without a hash."""
        idx = self._index.get(value)
        if idx is not None:
            return idx
        return OOV if value is None else int(self.vocab.unknown_indices([value])[0])

    def many(self, values: list[str | None]) -> np.ndarray:
        return np.fromiter((self(v) for v in values), dtype=np.int64, count=len(values))


# ------------------------------------------------------------------------------------------------
# the user store


@dataclass
class UserView:
    """One user's state as a feed request sees it (item ids as two-tower vocabulary indices)."""

    user_id: str
    cats: dict[str, str | None]  # USER_CAT_COLUMNS -> raw value (None = unknown)
    history: np.ndarray  # [L] engaged items strictly before now, oldest first, at most history_len
    seen: np.ndarray  # [S] items already shown to the user
    impressions: int
    clicks: int
    stored: bool  # False: the store has nothing on this user (no log rows, no live events)
    # per cross column (UserStore's ``cross`` order): [values, 2] int32 impressions and clicks by value index
    cross: tuple[np.ndarray, ...] = ()

    def cross_counters(self, values: np.ndarray) -> np.ndarray:
        """``[N, 2 * n_cross]`` float32 counters of N candidates whose value indices of the cross
        columns are ``values`` ``[N, n_cross]``: per column the user's impressions and clicks on that
        value, log1p-scaled as ``feedrank.features.counters.cross_counter_columns`` are."""
        counts = [seen[values[:, j]] for j, seen in enumerate(self.cross)]
        return scale_counts(np.concatenate(counts, axis=1) if counts else np.zeros((len(values), 0), np.int64))


@dataclass(slots=True)
class _Record:
    """A user touched by live events: mutable, bounded; an LRU entry of ``UserStore``'s overlay."""

    cats: tuple[str | None, ...]  # in USER_CAT_COLUMNS order
    engaged: list[tuple[int, int]]  # (ts_us, item index), sorted by time, at most history_len
    seen: dict[int, None]  # item index, most recently shown last (dicts keep insertion order), at most max_seen
    impressions: int
    clicks: int
    ids: set[int] = field(default_factory=set)  # id_hash of every live event applied: the dedupe key
    cross: list[np.ndarray] = field(default_factory=list)  # per cross column: [values, 2] int32 impressions, clicks


def id_hash(event_id: str) -> int:
    """64-bit hash of an event id: what the store keeps to refuse a second copy of an event.

    Ids are compared per user, so a false "duplicate" needs two of one user's ids to collide in 64
    bits (about 1e-8 for a user with a million events).
    """
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little", signed=True)


class _Journal:
    """Every live event the store applied, columnar and append-only: what an evicted user's record
    is rebuilt from, so evicting loses nothing.

    29 bytes an event (item, time, flags, id hash, the row of the user's previous event) plus a dict
    entry and an int64 per user. A user's rows are chained newest to oldest through ``prev``, so a
    rebuild reads only that user's rows. The journal holds what the serving log holds (since the
    start, and what was replayed from it), so it grows with the log, about 35x more compactly than
    records; compacting the serving log into the seeding log offline folds it into the snapshot.
    """

    _COLUMNS = {"item": np.int32, "ts": np.int64, "flags": np.uint8, "idh": np.int64, "prev": np.int64}
    CLICKED, ENGAGED = 1, 2

    def __init__(self, capacity: int = 1024, n_cross: int = 0) -> None:
        self.n = 0
        self.cols = {name: np.empty(capacity, dtype) for name, dtype in self._COLUMNS.items()}
        self.cols |= {f"cross{j}": np.empty(capacity, np.int32) for j in range(n_cross)}  # 4 bytes a cross column
        self.n_cross = n_cross
        self.code_of: dict[str, int] = {}
        self.last = np.empty(capacity, np.int64)  # per user code: their newest row

    def code(self, user_id: str) -> int:
        code = self.code_of.get(user_id)
        if code is None:
            code = self.code_of[user_id] = len(self.code_of)
            if code == len(self.last):
                self.last = np.concatenate([self.last, np.empty(len(self.last), np.int64)])
            self.last[code] = -1
        return code

    def append(self, code: int, item: int, ts: int, flags: int, idh: int, cross: Sequence[int] = ()) -> None:
        if self.n == len(self.cols["item"]):
            self.cols = {name: np.concatenate([col, np.empty_like(col)]) for name, col in self.cols.items()}
        row, c = self.n, self.cols
        c["item"][row], c["ts"][row], c["flags"][row], c["idh"][row] = item, ts, flags, idh
        for j, value in enumerate(cross):
            c[f"cross{j}"][row] = value
        c["prev"][row] = self.last[code]
        self.last[code] = row
        self.n += 1

    def cross_of(self, row: int) -> tuple[int, ...]:
        return tuple(int(self.cols[f"cross{j}"][row]) for j in range(self.n_cross))

    def rows_of(self, code: int) -> list[int]:
        """The user's rows, oldest first (the order they were applied in)."""
        rows, row, prev = [], int(self.last[code]), self.cols["prev"]
        while row >= 0:
            rows.append(row)
            row = int(prev[row])
        return rows[::-1]

    def nbytes(self) -> int:
        return sum(col[: self.n].nbytes for col in self.cols.values()) + self.last[: len(self.code_of)].nbytes


@dataclass
class _Snapshot:
    """The seeded state of every user in the log, columnar (CSR rows in ``user_ids`` order)."""

    row_of: dict[str, int]
    cats: dict[str, list[str | None]]
    history_offsets: np.ndarray
    history: np.ndarray  # item indices, oldest first per user
    seen_offsets: np.ndarray
    seen: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    seeded_until_us: int  # every seeded row is strictly before this
    latest_us: int  # the latest seeded row's time: when a seeded history item is taken to have happened
    # per cross column, CSR rows in user order: (offsets [U + 1], value indices [M], counts [M, 2])
    cross: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...] = ()

    @classmethod
    def empty(cls) -> _Snapshot:
        zero = np.zeros(1, np.int64)
        return cls({}, {c: [] for c in USER_CAT_COLUMNS}, zero, zero[:0], zero, zero[:0], zero[:0], zero[:0], 0, 0)

    def cross_of(self, row: int | None, sizes: Sequence[int]) -> list[np.ndarray]:
        """The seeded cross counts of user ``row`` (None: a user the snapshot does not hold): per
        column of ``sizes`` values, a fresh ``[values, 2]`` int32 array of impressions and clicks."""
        out = [np.zeros((size, 2), np.int32) for size in sizes]
        if row is not None:
            for dense, (offsets, values, counts) in zip(out, self.cross):
                lo, hi = offsets[row], offsets[row + 1]
                dense[values[lo:hi]] = counts[lo:hi]
        return out


_SEED_COLUMNS = ["user_id", "item_id", "ts", "clicked", "hidden", *USER_CAT_COLUMNS]


class UserStore:
    """Histories, seen items, counts and attributes per user; see the module docstring. Thread-safe.

    ``max_live_users`` bounds the overlay (records of users touched by live events, LRU); an
    evicted user's record is rebuilt from the snapshot and the journal on their next touch.
    ``cross``: item column -> the ranker's vocabulary of it, for the user x value counters
    (``UserView.cross``), in the order of the ranker's ``cross_counters``.
    """

    def __init__(self, items: Vocab, history_len: int, max_seen: int, snapshot: _Snapshot | None = None,
                 max_live_users: int = 100_000, cross: dict[str, Vocab] | None = None) -> None:  # fmt: skip
        if max_live_users < 1:
            raise ValueError(f"max_live_users must be >= 1, got {max_live_users}")
        self.items, self.history_len, self.max_seen = items, history_len, max_seen
        self.max_live_users = max_live_users
        self._cross = {col: VocabIndex(vocab) for col, vocab in (cross or {}).items()}
        self._cross_sizes = [len(vocab) for vocab in (cross or {}).values()]
        self._snapshot = snapshot or _Snapshot.empty()
        self._overlay: OrderedDict[str, _Record] = OrderedDict()
        self._journal = _Journal(n_cross=len(self._cross))
        self._new_users = 0  # users with live events and no snapshot row
        self.rebuilt = 0  # records rebuilt after an eviction
        self._lock = threading.Lock()

    @classmethod
    def from_log(cls, log_dir: str | Path, items: Vocab, history_len: int, max_seen: int,
                 end: dt.datetime | None = None, max_live_users: int = 100_000,
                 cross: dict[str, Vocab] | None = None) -> UserStore:  # fmt: skip
        """Seed from the canonical log at ``log_dir``, reading only rows before ``end``.

        History follows the training rule (``feedrank.features.user_state.user_state``: the last
        ``history_len`` items ``clicked and not hidden``); "seen" is every item shown, the most
        recent ``max_seen`` impressions per user. Items outside the vocabulary are kept in the
        history as OOV / hash-bucket indices (as in training) and left out of "seen" (they can
        never be a candidate).
        """
        if not list_days(log_dir):
            raise FileNotFoundError(f"no event log under {log_dir}: expected {Path(log_dir) / EVENTS_DIR}/date=YYYY-MM-DD/")
        cross = cross or {}
        events = read_events(log_dir, columns=_SEED_COLUMNS + [c for c in cross if c not in _SEED_COLUMNS], end=end)
        users = pc.unique(events["user_id"]).sort()
        state = user_state(events, users, history_len)
        n = len(users)
        seen_offsets, seen = _recent_items(events, users, items, max_seen)
        last_us = pc.max(events["ts"]).cast(pa.int64()).as_py() if events.num_rows else None
        snapshot = _Snapshot(
            row_of=dict(zip(users.to_pylist(), range(n))),
            cats={c: state.user_cats[c].to_pylist() for c in USER_CAT_COLUMNS},
            history_offsets=state.history_offsets,
            history=lookup_quiet(items, state.history_items) if len(state.history_items) else np.zeros(0, np.int64),
            seen_offsets=seen_offsets,
            seen=seen,
            impressions=state.impressions,
            clicks=state.clicks,
            seeded_until_us=to_epoch_us(end) if end is not None else (last_us or 0) + 1,
            latest_us=last_us or 0,
            cross=tuple(_cross_counts(events, users, col, vocab) for col, vocab in cross.items()),
        )
        return cls(items, history_len, max_seen, snapshot, max_live_users, cross)

    def __len__(self) -> int:
        with self._lock:
            return len(self._snapshot.row_of) + self._new_users

    def stats(self) -> dict[str, int]:
        """What ``/healthz`` shows of the store: users, the live overlay, the journal."""
        with self._lock:
            return {"users": len(self._snapshot.row_of) + self._new_users, "live_users": len(self._overlay),
                    "max_live_users": self.max_live_users, "journal_events": self._journal.n,
                    "journal_bytes": self._journal.nbytes(), "rebuilt": self.rebuilt}  # fmt: skip

    def view(self, user_id: str, now: dt.datetime) -> UserView:
        """``user_id``'s state at ``now``: history strictly before ``now``; unknown users get an empty view."""
        now_us = to_epoch_us(now)
        with self._lock:
            record = self._live(user_id)
            self._evict()  # the record stays valid here even if the rebuild pushed it past the bound
            if record is not None:
                history = [item for ts, item in record.engaged if ts < now_us][-self.history_len :]
                return UserView(user_id, dict(zip(USER_CAT_COLUMNS, record.cats)), np.asarray(history, np.int64),
                                np.fromiter(record.seen, np.int64, len(record.seen)), record.impressions,
                                record.clicks, True, tuple(counts.copy() for counts in record.cross))  # fmt: skip
        snap = self._snapshot
        row = snap.row_of.get(user_id)
        if row is None:
            return UserView(user_id, {c: None for c in USER_CAT_COLUMNS}, np.zeros(0, np.int64), np.zeros(0, np.int64), 0, 0, False,
                            tuple(snap.cross_of(None, self._cross_sizes)))  # fmt: skip
        history = snap.history[snap.history_offsets[row] : snap.history_offsets[row + 1]]
        if snap.seeded_until_us > now_us:  # a clock behind the seed: nothing of the log is "before now"
            history = history[:0]
        return UserView(user_id, {c: snap.cats[c][row] for c in USER_CAT_COLUMNS}, history,
                        snap.seen[snap.seen_offsets[row] : snap.seen_offsets[row + 1]],
                        int(snap.impressions[row]), int(snap.clicks[row]), True, tuple(snap.cross_of(row, self._cross_sizes)))  # fmt: skip

    def apply(self, events: pa.Table, item_idx: np.ndarray) -> np.ndarray:
        """Add validated serving-log rows (``SERVING_LOG_SCHEMA``; ``item_idx``: their two-tower item
        indices); returns which rows were new. A row whose ``event_id`` this user already has is a
        retry or a second delivery (bus, replay) and changes nothing: applying twice is applying once.
        """
        users = events["user_id"].to_pylist()
        hashes = [id_hash(i) for i in events[EVENT_ID].to_pylist()]
        ts = events["ts"].cast(pa.int64()).to_numpy()
        clicked = events["clicked"].to_numpy(zero_copy_only=False)
        engaged = clicked & ~events["hidden"].to_numpy(zero_copy_only=False)
        flags = clicked * _Journal.CLICKED + engaged * _Journal.ENGAGED
        cross = [[index(v) for v in events[col].to_pylist()] for col, index in self._cross.items()]
        order = np.argsort(ts, kind="stable")  # "seen" keeps the most recent last
        applied = np.zeros(len(users), dtype=bool)
        with self._lock:
            for i in order.tolist():  # one POST's events: at most max_events_per_post
                user = users[i]
                record = self._live(user) or self._adopt(user, self._seeded(user))
                if hashes[i] in record.ids:
                    continue
                applied[i] = True
                item, flag, values = int(item_idx[i]), int(flags[i]), tuple(col[i] for col in cross)
                self._journal.append(self._journal.code(user), item, int(ts[i]), flag, hashes[i], values)
                self._add(record, item, int(ts[i]), flag, hashes[i], values)
            self._evict()
        return applied

    def unapplied(self, events: pa.Table) -> np.ndarray:
        """Which rows' ``(user_id, event_id)`` the store has not applied yet (nor an earlier row of
        ``events``): a POST retried after a lost response is not logged twice."""
        users = events["user_id"].to_pylist()
        hashes = [id_hash(i) for i in events[EVENT_ID].to_pylist()]
        fresh = np.ones(len(users), dtype=bool)
        batch: set[tuple[str, int]] = set()
        with self._lock:
            for i, (user, idh) in enumerate(zip(users, hashes)):
                record = self._live(user)
                if (user, idh) in batch or (record is not None and idh in record.ids):
                    fresh[i] = False
                batch.add((user, idh))
            self._evict()
        return fresh

    def _add(self, record: _Record, item: int, ts_us: int, flags: int, idh: int, cross: Sequence[int] = ()) -> None:
        """One event into ``record``: the only rule, for live events and rebuilds alike (lock held)."""
        record.ids.add(idh)
        record.impressions += 1
        record.clicks += bool(flags & _Journal.CLICKED)
        for counts, value in zip(record.cross, cross):
            counts[value, 0] += 1
            counts[value, 1] += bool(flags & _Journal.CLICKED)
        record.seen.pop(item, None)
        record.seen[item] = None
        if len(record.seen) > self.max_seen:
            del record.seen[next(iter(record.seen))]
        if flags & _Journal.ENGAGED and self.history_len:
            insort(record.engaged, (ts_us, item))
            del record.engaged[: -self.history_len]

    def _live(self, user_id: str) -> _Record | None:
        """The overlay record of ``user_id`` (now the most recently used), rebuilt from the snapshot
        and the journal if it was evicted; None for a user without live events (lock held)."""
        record = self._overlay.get(user_id)
        if record is not None:
            self._overlay.move_to_end(user_id)
            return record
        code = self._journal.code_of.get(user_id)
        if code is None:
            return None
        record = self._seeded(user_id)
        cols = self._journal.cols
        for row in self._journal.rows_of(code):
            self._add(record, int(cols["item"][row]), int(cols["ts"][row]), int(cols["flags"][row]), int(cols["idh"][row]),
                      self._journal.cross_of(row))  # fmt: skip
        self.rebuilt += 1
        return self._adopt(user_id, record)

    def _adopt(self, user_id: str, record: _Record) -> _Record:
        """Put ``record`` in the overlay as the most recently used (eviction waits for ``_evict``)."""
        if user_id not in self._journal.code_of and user_id not in self._snapshot.row_of:
            self._new_users += 1
            self._journal.code(user_id)
        self._overlay[user_id] = record
        return record

    def _evict(self) -> None:
        while len(self._overlay) > self.max_live_users:
            self._overlay.popitem(last=False)

    def _seeded(self, user_id: str) -> _Record:
        """A fresh record of ``user_id`` holding only the snapshot's state (lock held)."""
        snap = self._snapshot
        row = snap.row_of.get(user_id)
        if row is None:
            return _Record((None,) * len(USER_CAT_COLUMNS), [], {}, 0, 0, cross=snap.cross_of(None, self._cross_sizes))
        # The snapshot keeps no per-item times: its items are stamped with the seeding log's last
        # time, so a live event after it sorts after them however late the service started.
        stamp = snap.latest_us
        hist = snap.history[snap.history_offsets[row] : snap.history_offsets[row + 1]].tolist()
        seen = snap.seen[snap.seen_offsets[row] : snap.seen_offsets[row + 1]].tolist()
        return _Record(tuple(snap.cats[c][row] for c in USER_CAT_COLUMNS), [(stamp, h) for h in hist],
                       dict.fromkeys(seen), int(snap.impressions[row]), int(snap.clicks[row]),
                       cross=snap.cross_of(row, self._cross_sizes))  # fmt: skip


def _cross_counts(events: pa.Table, users: pa.Array, column: str, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (offsets, value indices, [M, 2] impressions and clicks) of each user's rows per value of
    ``column`` (its index in ``vocab``, as the feature build's ``CrossCounters`` keys it)."""
    n, size = len(users), len(vocab)
    code = pc.index_in(events["user_id"], value_set=users).to_numpy().astype(np.int64)
    pairs, inverse = np.unique(code * size + lookup_quiet(vocab, events[column]), return_inverse=True)
    clicked = events["clicked"].to_numpy(zero_copy_only=False)
    counts = np.stack([np.bincount(inverse, minlength=len(pairs)),
                       np.bincount(inverse[clicked], minlength=len(pairs))], axis=1)  # fmt: skip
    offsets = np.concatenate([[0], np.cumsum(np.bincount(pairs // size, minlength=n))]).astype(np.int64)
    return offsets, pairs % size, counts


def _recent_items(events: pa.Table, users: pa.Array, items: Vocab, max_seen: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, item indices) of each user's distinct items among their last ``max_seen`` impressions."""
    n = len(users)
    code = pc.index_in(events["user_id"], value_set=users).to_numpy().astype(np.int64)
    item = lookup_quiet(items, events["item_id"])
    ts = events["ts"].cast(pa.int64()).to_numpy()
    order = np.lexsort((ts, code))
    code, item = code[order], item[order]
    counts = np.bincount(code, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rank_from_end = starts[code + 1] - np.arange(len(code))  # 1 = the user's latest impression
    keep = (rank_from_end <= max_seen) & (item >= FIRST_ID) & (item < FIRST_ID + len(items.ids))
    pairs = np.unique(code[keep] * len(items) + item[keep])
    users_of, items_of = pairs // len(items), pairs % len(items)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users_of, minlength=n))]).astype(np.int64)
    return offsets, items_of.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# events in, serving log out


class EventIn(BaseModel):
    """One ``POST /events`` item: the canonical event schema's feedback columns (``EVENT_SCHEMA``).

    ``ts`` defaults to the server's clock, ``request_id`` to one id per POST, ``position`` to 0,
    ``event_id`` to a fresh uuid: a client that may retry a POST sends its own ``event_id`` (unique
    per user), and a retry of an event already accepted is acknowledged without being applied twice.
    Item and user metadata are not sent: the service fills them from the catalogue and the store,
    so the serving log is as self-contained as any other canonical log.

    Strict at the boundary: booleans are JSON ``true``/``false`` only (not ``"yes"``, ``1``),
    ``position`` an integer, ``dwell_s`` a finite number >= 0, ``ts`` an ISO-8601 string (a
    number is refused: seconds or milliseconds would be a guess); ids follow
    ``feedrank.serving.validation.check_id``. Validated with an ``EventContext`` (what
    ``POST /events`` does), ``ts`` must also lie in the window of server time and ``dwell_s``
    under the maximum that ``serving.limits`` set.
    """

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(strict=True)
    item_id: str = Field(strict=True)
    ts: dt.datetime | None = None
    clicked: bool = Field(False, strict=True)
    dwell_s: float = Field(0.0, ge=0, allow_inf_nan=False, strict=True)
    shared: bool = Field(False, strict=True)
    hidden: bool = Field(False, strict=True)
    request_id: str | None = Field(None, strict=True)
    position: int = Field(0, ge=0, le=2**31 - 1, strict=True)
    event_id: str | None = Field(None, strict=True)

    @field_validator("user_id", "item_id", "request_id", "event_id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_id(value)

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_is_text(cls, value: object) -> object:
        return check_ts_text(value)

    @field_validator("ts")
    @classmethod
    def _ts_window(cls, value: dt.datetime | None, info: ValidationInfo) -> dt.datetime | None:
        return None if value is None else check_ts(value, info.context)

    @field_validator("dwell_s")
    @classmethod
    def _dwell_bound(cls, value: float, info: ValidationInfo) -> float:
        return check_dwell(value, info.context)


class EventSink:
    """The append-only serving log (module docstring); ``write`` is thread-safe.

    ``on_written(path)`` is called with each file once it is in place (the catch-up reader marks
    this worker's own files as applied). At construction, hidden temporary files that a killed
    writer left behind (``.part-*.tmp``) are removed: those not locked by a live writer and older
    than this sink (every writer holds an ``flock`` on its temporary file until it is renamed).
    """

    def __init__(self, cfg: EventLogConfig, on_written: Callable[[Path], None] | None = None) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.on_written = on_written
        (self.root / EVENTS_DIR).mkdir(parents=True, exist_ok=True)
        self.stale_removed = remove_stale_temp_files(self.root, older_than=time.time())
        if self.stale_removed:
            log.warning("serving log %s: removed %d temporary files left by an interrupted write", self.root, self.stale_removed)
        self._lock = threading.Lock()
        self._buffer: list[pa.Table] = []
        self._buffered_rows = 0
        self._oldest: float | None = None
        self.rows_written = 0
        self.files_written = 0
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        if not cfg.durable:
            self._timer = threading.Thread(target=self._flush_periodically, name="event-sink-flush", daemon=True)
            self._timer.start()

    def write(self, events: pa.Table) -> None:
        """Append ``SERVING_LOG_SCHEMA`` rows; returns once they are on disk when ``durable``."""
        with self._lock:
            self._buffer.append(events.cast(SERVING_LOG_SCHEMA))
            self._buffered_rows += events.num_rows
            self._oldest = self._oldest if self._oldest is not None else time.monotonic()
            if self.cfg.durable or self._buffered_rows >= self.cfg.flush_rows:
                self._flush_locked()

    def flush(self) -> int:
        """Write what is buffered; returns the number of rows written."""
        with self._lock:
            return self._flush_locked()

    def close(self) -> None:
        """Flush and stop the timer; the sink must not be used afterwards."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        self.flush()

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.cfg.flush_interval_s / 4):
            with self._lock:
                if self._oldest is not None and time.monotonic() - self._oldest >= self.cfg.flush_interval_s:
                    self._flush_locked()

    def _flush_locked(self) -> int:
        if not self._buffer:
            return 0
        table = pa.concat_tables(self._buffer)
        days = day_of(table["ts"])
        for day in np.unique(days).tolist():
            self._write_file(table.filter(pa.array(days == day)), day)
        self._buffer, self._buffered_rows, self._oldest = [], 0, None
        self.rows_written += table.num_rows
        return table.num_rows

    def _write_file(self, table: pa.Table, day: str) -> None:
        final = self.root / EVENTS_DIR / f"date={day}" / f"part-{uuid.uuid4().hex}.parquet"
        fd = None
        try:
            with staged_file(final, durable=self.cfg.durable) as tmp:
                # The lock tells remove_stale_temp_files of another process that this file is alive.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                pq.write_table(table, tmp)
        finally:
            if fd is not None:
                os.close(fd)
        self.files_written += 1
        if self.on_written is not None:
            self.on_written(final)


#: What ``feedrank.fsutil.staged_file`` names a serving-log file while it is written.
TEMP_PATTERN = ".part-*.parquet.*.tmp"


def remove_stale_temp_files(root: str | Path, older_than: float) -> int:
    """Delete the serving log's temporary files last modified before ``older_than`` (epoch
    seconds) that no process holds locked; returns how many. A ``kill -9`` between writing a file
    and renaming it leaves one behind; readers never see them (hidden names), but they pile up."""
    removed = 0
    for path in (Path(root) / EVENTS_DIR).glob(f"date=*/{TEMP_PATTERN}"):
        try:
            if path.stat().st_mtime >= older_than:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # renamed or removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def read_log_files(paths: Sequence[Path]) -> pa.Table:
    """Serving-log files as one ``SERVING_LOG_SCHEMA`` table, read by one pyarrow scan (threads,
    readahead: several times faster than a file at a time when a durable log has one file per
    POST). A file written before events had ids gets ``<file name>#<row>``: stable, so replaying it
    twice still applies it once."""
    loose = pa.schema([f.with_nullable(True) for f in SERVING_LOG_SCHEMA])
    batches, rows_of = [], dict.fromkeys(map(str, paths), 0)
    for tagged in ds.dataset(list(rows_of), format="parquet", schema=loose).scanner().scan_batches():
        batch, path = tagged.record_batch, tagged.fragment.path
        first, rows_of[path] = rows_of[path], rows_of[path] + batch.num_rows
        ids = batch.column(EVENT_ID)
        if ids.null_count:
            legacy = pa.array([f"{Path(path).name}#{i}" for i in range(first, first + batch.num_rows)], pa.string())
            batch = batch.set_column(batch.schema.get_field_index(EVENT_ID), EVENT_ID, pc.coalesce(ids, legacy))
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=loose).cast(SERVING_LOG_SCHEMA)


def read_log_file(path: Path) -> pa.Table:
    """One serving-log file (``read_log_files``)."""
    return read_log_files([path])
