"""Catch-up from the shared serving log: every worker applies every accepted event, whatever Redis did.

Why: each serving worker keeps its own ``UserStore``. The event bus (``feedrank.serving.bus``)
brings another worker's events in milliseconds, but pub/sub is at most once: an event accepted while
Redis was down, paused or still connecting reached no other worker. The serving log, which every
worker of one server shares and fsyncs each accepted event to before answering, is the source of
truth, so convergence comes from it: ``LogFollower`` finds the log files this process has not
applied yet (by file name), and the service applies them; ``UserStore.apply`` dedupes by event id,
so an event that also came over the bus, or that this worker wrote itself, is applied once.

The same reader replays the whole log at startup (a restart, ``kill -9`` included, forgets nothing
that was accepted) and then runs every ``store.catch_up_interval_s``: an event reaches every worker
within that interval even with Redis gone, and within milliseconds over the bus when Redis is up.

Cost: a poll lists only the day folders whose mtime moved (a folder's mtime changes when a file is
renamed into it; one whose mtime is under a second older than the last listing is listed again, as
coarse timestamps can hide a second file landing in the same tick), then reads the new files in
one pyarrow scan. A durable log has one file per POST: a busy day folder is listed on every poll,
and the startup replay opens every file (about 1-5 ms each), so compact the serving log offline,
or use ``event_log.durable: false`` (fewer, larger files).

Example::

    follower = LogFollower("serving_log")
    table = follower.poll()                      # SERVING_LOG_SCHEMA rows of files not seen yet
    follower.start(apply_rows, interval_s=1.0)   # the same on a daemon thread
    follower.close()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from feedrank.data.log import EVENTS_DIR
from feedrank.serving.state import read_log_file, read_log_files

log = logging.getLogger(__name__)

_SETTLE_NS = 1_000_000_000  # a folder listed less than this after its mtime is listed again


class LogFollower:
    """Yields the serving-log rows of files not applied yet; thread-safe."""

    def __init__(self, root: str | Path) -> None:
        self.events_dir = Path(root) / EVENTS_DIR
        self._known: set[str] = set()
        self._listed: dict[str, tuple[int, int]] = {}  # day folder -> (its mtime, when listed), ns
        self._lock = threading.Lock()  # one poll at a time: startup replay, the thread, tests
        self._known_lock = threading.Lock()  # held only briefly: ``mark`` runs inside a POST
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.files_read = self.rows_read = self.unreadable = 0
        self.last_poll: float | None = None  # time.time() of the last completed poll

    def mark(self, path: Path) -> None:
        """``path`` is applied already (this worker wrote it): never read it."""
        with self._known_lock:
            self._known.add(path.name)

    def poll(self) -> pa.Table | None:
        """The rows of every file that appeared since the last poll (None when there is none)."""
        with self._lock:
            paths = self._new_files()
            try:
                table = read_log_files(paths) if paths else None
            except (OSError, pa.ArrowException, ValueError):  # one bad or vanished file: find it, keep the rest
                table = self._read_one_by_one(paths)
            with self._known_lock:
                self._known.update(p.name for p in paths)
            self.files_read += len(paths)
            self.last_poll = time.time()
            if table is None or table.num_rows == 0:
                return None
            self.rows_read += table.num_rows
            return table

    def _read_one_by_one(self, paths: list[Path]) -> pa.Table | None:
        tables = []
        for path in paths:
            try:
                tables.append(read_log_file(path))
            except FileNotFoundError:  # compacted away meanwhile: its rows are elsewhere
                pass
            except (OSError, pa.ArrowException, ValueError) as exc:
                self.unreadable += 1
                log.error("serving log: cannot read %s (%s); skipped", path, exc)
        return pa.concat_tables(tables) if tables else None

    def _new_files(self) -> list[Path]:
        try:
            days = sorted((e for e in os.scandir(self.events_dir) if e.is_dir() and e.name.startswith("date=")), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        found = []
        for day in days:
            mtime = day.stat().st_mtime_ns
            listed = self._listed.get(day.name)
            if listed is not None and listed[0] == mtime and listed[1] - mtime > _SETTLE_NS:
                continue
            self._listed[day.name] = (mtime, time.time_ns())  # before listing: a later file moves mtime again
            names = sorted(e.name for e in os.scandir(day.path) if e.name.startswith("part-") and e.name.endswith(".parquet"))
            with self._known_lock:
                found += [Path(day.path) / name for name in names if name not in self._known]
        return found

    def start(self, on_rows: Callable[[pa.Table], None], interval_s: float) -> None:
        """``on_rows(poll())`` every ``interval_s`` on a daemon thread; a failure is logged, never fatal."""
        if self._thread is not None:
            raise RuntimeError("the log follower is already started")
        self._thread = threading.Thread(target=self._run, args=(on_rows, interval_s), name="feedrank-log-follower", daemon=True)
        self._thread.start()

    def _run(self, on_rows: Callable[[pa.Table], None], interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                table = self.poll()
                if table is not None:
                    on_rows(table)
            except Exception:  # keep following: the next poll retries what this one could not list
                log.exception("serving log: catching up failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
