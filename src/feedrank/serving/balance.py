"""Keep-alive connections spread evenly over ``feedrank serve``'s workers.

**Why.** The workers share one listening socket, and a worker whose event loop is idle accepts
every connection waiting (uvloop accepts until the queue is empty). Eight clients that connect at
once landed 8/0 on two workers in 2 of 4 bursts (the other two 4/4 and 5/3). A keep-alive
connection stays with the worker that accepted it, so one worker queued every request while the
other idled. Node's ``cluster`` module documents the same skew of a shared socket
("over 70% of all connections ended up in just two processes, out of a total of eight") and
accepts in the primary instead. On this project's benchmark, 8 clients and 2 workers answered at
p99 55-83 ms with the connections forced to 4/4, and at 78-94 ms with the 5/3 and 6/2 splits that
they landed in (``docs/benchmarks.md``).

**How.** Each worker publishes its open connections to a small shared file, one slot per worker.
A worker that holds more than its share, ``ceil(total / workers)``, answers the next request of
one of its connections with ``Connection: close``. The client reconnects (HTTP/1.1 clients do this
by themselves), and the new connection goes to whichever worker accepts it. If the busy worker
takes it back, it is still over its share and releases one again, so the split converges to
``ceil`` / ``floor``, and at that split nothing is closed. The releasing worker is still
running when the client reconnects, and often wins that accept itself (20 times in a row on a
loaded 2-core machine), so it waits (``hand_over``, at most ``HAND_OVER_S``) until another
worker's count rises. gRPC's ``MAX_CONNECTION_AGE``
rebalances by closing connections in the same way. This costs one reconnect, about 0.1 ms on
loopback, per connection that moves. One worker alone (no shares file) never closes anything.

The counting sits in a subclass of uvicorn's httptools protocol
(``BalancedHttpToolsProtocol``), because ASGI has no connection events. A request is released by
clearing the request cycle's ``keep_alive``: uvicorn then sends ``connection: close`` itself and
closes the connection after the response.

Example (what ``feedrank.serving.supervisor.serve`` does for ``--workers 2``)::

    shares = ConnectionShares.create(Path(tmp) / "connections", slots=4)
    os.environ[SHARES_ENV] = str(shares.path)        # each worker attaches when ready (app_from_env) or at its first connection
    config.http = BalancedHttpToolsProtocol
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import mmap
import os
import struct
import time
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: The environment variable naming the shares file; set by the supervisor, read by each worker.
SHARES_ENV = "FEEDRANK_CONNECTION_SHARES"

#: The longest a worker waits, after releasing a connection, for another worker to accept the
#: client's reconnect (``WorkerConnections.hand_over``).
HAND_OVER_S = 0.01

_SLOT = struct.Struct("qq")  # pid (0: free), open connections
_COUNT = struct.Struct("q")  # the open connections alone, at offset 8 of a slot


class ConnectionShares:
    """The open connections of each worker of one server, in a shared file of fixed slots.

    Only the owner of a slot writes its count, and readers sum the claimed slots, so no lock is
    needed except when a slot is claimed (``flock``). A worker that died keeps its slot until the
    supervisor releases it (``release``) or a new worker claims a slot whose process is gone.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        if len(self._map) == 0 or len(self._map) % _SLOT.size:
            raise ValueError(f"{self.path}: not a connection shares file ({len(self._map)} bytes)")
        self.slots = len(self._map) // _SLOT.size

    @classmethod
    def create(cls, path: Path, slots: int) -> ConnectionShares:
        """A new file of ``slots`` free slots (twice the workers: a replacement may start before
        the supervisor releases the slot of the worker it replaces)."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        Path(path).write_bytes(bytes(_SLOT.size * slots))
        return cls(path)

    def _read(self, slot: int) -> tuple[int, int]:
        return _SLOT.unpack_from(self._map, slot * _SLOT.size)

    def claim(self, pid: int) -> int:
        """The slot of process ``pid``: its own if it has one, else a free one, else one whose
        process is gone (the supervisor frees those; this covers a replacement that starts first).
        Raises ``RuntimeError`` when every slot belongs to a live process."""
        with open(self.path, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            owners = [self._read(s)[0] for s in range(self.slots)]
            if pid in owners:
                return owners.index(pid)
            free = [s for s, owner in enumerate(owners) if owner == 0] or [s for s, owner in enumerate(owners) if not _alive(owner)]
            if free:
                _SLOT.pack_into(self._map, free[0] * _SLOT.size, pid, 0)
                return free[0]
        raise RuntimeError(f"{self.path}: all {self.slots} connection slots belong to live workers")

    def publish(self, slot: int, open_connections: int) -> None:
        """Set the open connections of ``slot`` (its owner's call; the pid is left as claimed)."""
        _COUNT.pack_into(self._map, slot * _SLOT.size + _COUNT.size, open_connections)

    def release(self, pid: int) -> None:
        """Free the slot of ``pid`` (the supervisor's call for a worker it replaced); no-op if none."""
        for slot in range(self.slots):
            if self._read(slot)[0] == pid:
                _SLOT.pack_into(self._map, slot * _SLOT.size, 0, 0)

    def counts(self) -> dict[int, int]:
        """Open connections per claimed slot's pid."""
        return {pid: n for pid, n in (self._read(s) for s in range(self.slots)) if pid}

    def others(self, pid: int) -> int:
        """Open connections of every claimed slot but ``pid``'s."""
        return sum(n for owner, n in self.counts().items() if owner != pid)

    def over_share(self, mine: int) -> bool:
        """Whether a worker with ``mine`` open connections holds more than ``ceil(total / workers)``,
        ``total`` and ``workers`` read from the claimed slots (the caller's own count included)."""
        counts = self.counts()
        return len(counts) > 1 and mine > math.ceil(sum(counts.values()) / len(counts))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process holds the pid: alive, not ours to reuse
        return True
    return True


class WorkerConnections:
    """This worker's side of the shares: its slot, and how many of its open connections have
    been told to close (counted out of its share until they are gone)."""

    def __init__(self, shares: ConnectionShares, pid: int):
        self.shares, self.pid, self.slot = shares, pid, shares.claim(pid)
        self.releasing = 0

    def changed(self, open_connections: int) -> None:
        self.shares.publish(self.slot, open_connections - self.releasing)

    def should_release(self, open_connections: int) -> bool:
        """Whether to close one more connection, counting it released if so. One at a time: a
        peer that claimed its slot but accepts nothing (hung, or stopping) then costs one
        reconnect in flight, not all of this worker's connections."""
        if self.releasing or not self.shares.over_share(open_connections):
            return False
        self.releasing += 1
        self.changed(open_connections)
        return True

    def hand_over(self, seconds: float = HAND_OVER_S) -> None:
        """Block, after a released connection's response, until another worker's count rises
        (it accepted the client's reconnect), at most ``seconds``. Without the wait this worker,
        still running while the client reconnects, accepts the reconnect itself: on a loaded
        2-core machine it did so 20 times in a row (3/5 with one close every round). Only a
        rebalancing worker waits, once per connection it moves."""
        before, deadline = self.shares.others(self.pid), time.monotonic() + seconds
        while self.shares.others(self.pid) <= before and time.monotonic() < deadline:
            time.sleep(0.0002)


_worker: WorkerConnections | None = None


def worker_connections() -> WorkerConnections | None:
    """This process's ``WorkerConnections``, attached on first use to the file ``SHARES_ENV``
    names; None when it is unset (one worker: nothing to balance)."""
    global _worker
    if _worker is None and os.environ.get(SHARES_ENV):
        _worker = WorkerConnections(ConnectionShares(Path(os.environ[SHARES_ENV])), os.getpid())
    return _worker


class BalancedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that publishes this worker's open connections and answers
    ``Connection: close`` while the worker holds more than its share (module docstring)."""

    _released = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if (worker := worker_connections()) is not None:
            worker.changed(len(self.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if (worker := worker_connections()) is not None:
            if self._released:
                worker.releasing -= 1
            worker.changed(len(self.connections))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._released and (worker := worker_connections()) is not None:
            worker.hand_over()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        worker = worker_connections()
        if worker is not None and not self._released and self.cycle.keep_alive and worker.should_release(len(self.connections)):
            self._released = True
            self.cycle.keep_alive = False  # uvicorn sends "connection: close" and closes after the response
