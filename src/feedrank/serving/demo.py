"""The serving part of ``feedrank demo``: start the real server, make a few calls, return what to print.

``ServerProcess`` runs ``feedrank serve`` itself (the same command line a user types, with its
worker supervisor and health-check timeout) in a subprocess on a free loopback port, and stops it
with SIGTERM, so the service shuts down cleanly (serving log flushed). The port stays the same
across a restart of one ``ServerProcess``, as a restarted production server's would.
``benchmarks/serving_latency.py`` and ``benchmarks/faults.py`` drive it too.

``demo_requests`` asks for the feed of a warm user (the most active one in the log) and of a user
the service has never seen (cold start), posts a click of the warm user on their top item, asks for
their feed again (the cached vector was invalidated: recomputed from the new history, and the
clicked item is gone as seen), and returns the feeds and stage timings as text.

Example::

    print(demo_requests("runs/demo/retrieval/bundle", "runs/demo/ranking/bundle", "runs/demo/log"))
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
import pyarrow.compute as pc
import yaml

from feedrank.config import to_dict
from feedrank.data.log import read_events
from feedrank.serving.app import ServeSettings
from feedrank.serving.config import EventLogConfig, ServingConfig


HEALTHCHECK_TIMEOUT_S = 120  # generous: a worker loads its models while the supervisor pings it


def serve_argv(settings: ServeSettings, port: int, workers: int, healthcheck_timeout_s: float) -> list[str]:
    """The ``feedrank serve`` command line of ``settings`` on 127.0.0.1:``port``."""
    argv = [sys.executable, "-m", "feedrank.cli", "serve", settings.bundle, "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--healthcheck-timeout", str(max(1, round(healthcheck_timeout_s)))]  # fmt: skip
    for flag, value in (("--ranker", settings.ranker), ("--log", settings.log), ("--config", settings.config),
                        ("--redis-url", settings.redis_url), ("--serving-log", settings.serving_log),
                        ("--quantize", settings.quantize)):  # fmt: skip
        if value is not None:
            argv += [flag, value]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``feedrank serve`` in a subprocess on 127.0.0.1; a context manager that waits for /healthz."""

    def __init__(self, settings: ServeSettings, workdir: str | Path, startup_timeout_s: float = 300.0, workers: int = 1) -> None:
        self.settings, self.workdir, self.timeout, self.workers = settings, Path(workdir), startup_timeout_s, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / f"server-{self.port}.log"

    def __enter__(self) -> ServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(serve_argv(self.settings, self.port, self.workers, HEALTHCHECK_TIMEOUT_S),
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /healthz within {self.timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (clean shutdown: the serving log is flushed), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed, no shutdown hook runs); with several
        workers only the master dies here: kill each worker by the ``pid`` its /healthz reports."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def log_end(log_dir: str | Path) -> dt.datetime:
    """The first instant after the log's last event: "now" for serving a replayed log."""
    last = pc.max(read_events(log_dir, columns=["ts"])["ts"]).as_py()
    return last + dt.timedelta(seconds=1)


def most_active_user(log_dir: str | Path) -> str:
    """The user with the most clicks in the log (ties: the smallest id): a warm user."""
    clicks = read_events(log_dir, columns=["user_id", "clicked"]).filter(pc.field("clicked"))
    counts = clicks.group_by("user_id").aggregate([("clicked", "count")]).sort_by([("clicked_count", "descending"), ("user_id", "ascending")])
    if counts.num_rows == 0:
        raise ValueError(f"{log_dir}: no clicks in the log, so no warm user to show")
    return counts["user_id"][0].as_py()


def format_feed(title: str, body: dict, timing_header: str) -> str:
    lines = [f"{title}: path={body['path']} cache={body['cache']}", f"  Server-Timing: {timing_header}"]
    for rank, item in enumerate(body["items"], 1):
        lines.append(f"  {rank:2d}. {item['item_id']:<10} {item['score']:8.3f}  {item['publisher'] or '-':<8} {item['reason']}")
    return "\n".join(lines)


def demo_requests(bundle: str | Path, ranker: str | Path | None, log_dir: str | Path, k: int = 10,
                  cfg: ServingConfig | None = None, workdir: str | Path | None = None) -> str:  # fmt: skip
    """Start the server, request a warm and a cold feed, post a click, re-request; return the summary.

    ``cfg`` defaults to ``ServingConfig`` with the clock started at the end of the log (a synthetic
    log lies in the past) and the serving log under ``workdir`` (default: a temporary folder).
    """
    with tempfile.TemporaryDirectory(prefix="feedrank-serve-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        cfg = cfg or ServingConfig(start_time=log_end(log_dir).isoformat(), event_log=EventLogConfig(dir=str(work / "serving_log")))
        config_path = work / "serving.yaml"
        work.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump({"serving": to_dict(cfg)}, sort_keys=False))
        settings = ServeSettings(bundle=str(bundle), ranker=None if ranker is None else str(ranker), log=str(log_dir),
                                 config=str(config_path))  # fmt: skip
        warm, cold = most_active_user(log_dir), "demo-new-user"
        out = []
        with ServerProcess(settings, work) as server, httpx.Client(base_url=server.url, timeout=30.0) as client:
            health = client.get("/healthz").json()
            out.append(f"server {server.url}: models {', '.join(f'{k}={v[:12]}' for k, v in health['models'].items())}; "
                       f"index {health['index']['kind']} of {health['index']['size']} items ({health['index']['origin']}); "
                       f"cache {health['cache']['backend']}")  # fmt: skip

            def get_feed(user: str, title: str) -> dict:
                response = client.get("/feed", params={"user_id": user, "k": k})
                response.raise_for_status()
                out.append(format_feed(title, response.json(), response.headers.get("server-timing", "")))
                return response.json()

            first = get_feed(warm, f"warm user {warm}")
            get_feed(warm, f"warm user {warm}, again (cached vector)")
            get_feed(cold, f"cold user {cold}")
            clicked = first["items"][0]["item_id"]
            posted = client.post("/events", json={"user_id": warm, "item_id": clicked, "clicked": True, "dwell_s": 42.0})
            posted.raise_for_status()
            out.append(f"POST /events: {warm} clicked {clicked} -> {posted.json()}")
            after = get_feed(warm, f"warm user {warm}, after the click (vector recomputed)")
            gone = clicked not in {item["item_id"] for item in after["items"]}
            out.append(f"{clicked} {'is gone from the feed (seen)' if gone else 'is still in the feed'}")
        return "\n\n".join(out)
