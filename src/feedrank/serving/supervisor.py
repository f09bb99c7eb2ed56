"""Run the uvicorn server for ``feedrank serve``: one process, or a supervisor over N workers that
says why a worker died.

uvicorn's own supervisor (``uvicorn.supervisors.Multiprocess``) pings every worker each half
second; a worker that does not answer within ``timeout_worker_healthcheck`` seconds is killed and
replaced, and a worker that exited is replaced, both with the same line ``Child process [pid]
died``. A worker that is slow to start (importing torch on a loaded machine) and a worker that
crashed therefore looked alike, and a health-check timeout shorter than the start-up time killed
and respawned workers forever without saying so. ``WorkerSupervisor`` keeps uvicorn's policy and
logs, for each replaced worker, whether it stopped answering (and was killed after how long) or
exited on its own (with which status or signal). With several workers, ``serve`` also keeps their
keep-alive connections spread evenly (``feedrank.serving.balance``).

Example::

    config = uvicorn.Config("feedrank.serving.app:app_from_env", factory=True, workers=2,
                            timeout_worker_healthcheck=30)
    serve(config, lambda url: print(f"serving on {url}"))
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess

from feedrank.serving.balance import SHARES_ENV, BalancedHttpToolsProtocol, ConnectionShares

logger = logging.getLogger("uvicorn.error")


def describe_exit(exitcode: int | None) -> str:
    """A worker's exit status in words: ``exited with status 1``, ``was killed by signal SIGSEGV``."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = " (the out-of-memory killer sends SIGKILL: check the kernel log)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by signal {name}{hint}"
    if exitcode == STARTUP_FAILURE:
        return f"exited with status {exitcode} (start-up failure: the app could not be loaded; see its traceback above)"
    return f"exited with status {exitcode}"


class WorkerSupervisor(Multiprocess):
    """uvicorn's multi-process supervisor, plus one log line per replaced worker saying why; a
    replaced worker's connection slot (``shares``) is freed for its replacement."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], shares: ConnectionShares | None = None):
        super().__init__(config, sockets=sockets)
        self.shares = shares

    def keep_subprocess_alive(self) -> None:
        before = [(p, p.process.is_alive()) for p in self.processes]
        super().keep_subprocess_alive()
        replaced = {id(p) for p in self.processes}
        for process, was_running in before:
            if id(process) in replaced:
                continue
            if was_running:
                # Still running but silent: the supervisor killed it after one health-check timeout.
                why = (f"did not answer the health check within {self.config.timeout_worker_healthcheck} s and "
                       "was killed (slow start-up or a hung worker; raise --healthcheck-timeout if it was "
                       "still starting)")  # fmt: skip
            else:
                why = describe_exit(process.exitcode)
            logger.warning("Worker [%s] %s", process.pid, why)
            if self.shares is not None and process.pid is not None:
                self.shares.release(process.pid)


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    """The URL a bound socket serves on (its real port, also when the port asked for was 0)."""
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{scheme}://{host}:{port}"


def bind_socket(config: uvicorn.Config) -> socket.socket:
    """``config.bind_socket()``, with the protocol of a TCP socket set, so asyncio disables Nagle.

    uvicorn's ``bind_socket`` (0.54 and earlier; 0.55 sets the protocol itself, and this is then a
    no-op) creates ``socket.socket(family)``, whose ``proto`` reads 0; asyncio
    sets ``TCP_NODELAY`` on an accepted connection only when its ``proto`` is ``IPPROTO_TCP``, and
    accepted sockets copy the listener's. Without it every response, which uvicorn writes as two
    segments (headers, then body), held the body back until the client acknowledged the headers,
    and a client's delayed ACK waits 40 ms: a feed took 45 ms longer than its server time. Rebuilt
    from the same descriptor, the socket reads its real protocol back from the kernel.
    """
    sock = config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto != socket.IPPROTO_TCP:
        sock = socket.socket(fileno=sock.detach())  # family, type and proto read from the descriptor
    return sock


def serve(config: uvicorn.Config, on_bound: Callable[[str], None]) -> bool:
    """Bind ``config``'s socket, call ``on_bound(url)``, then serve until shut down.

    One worker runs in this process; more run under ``WorkerSupervisor``, with their keep-alive
    connections balanced (``feedrank.serving.balance``: a shares file in a temporary folder, named
    to the workers by ``SHARES_ENV``, removed at exit). Returns whether the server started (False:
    the app failed to load in the single-process case).
    """
    sock = bind_socket(config)
    on_bound(url_of(sock, "https" if config.is_ssl else "http"))
    if config.workers > 1:
        with tempfile.TemporaryDirectory(prefix="feedrank-serve-") as tmp:
            shares = ConnectionShares.create(Path(tmp) / "connections", slots=2 * config.workers)
            os.environ[SHARES_ENV] = str(shares.path)  # spawned workers inherit the environment
            config.http = BalancedHttpToolsProtocol
            try:
                WorkerSupervisor(config, sockets=[sock], shares=shares).run()
            finally:
                del os.environ[SHARES_ENV]  # the file goes with the folder
        return True
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return server.started
