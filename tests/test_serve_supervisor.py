"""``feedrank serve --workers N``'s supervisor says why it replaced a worker: a real supervisor over
two real worker processes, one killed with SIGKILL and one frozen with SIGSTOP (which stops it
answering the health check); and it frees a replaced worker's connection slot
(``feedrank.serving.balance``). Linux only (workers are found through /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from feedrank.serving.balance import SHARES_ENV, ConnectionShares
from feedrank.serving.supervisor import describe_exit

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

TINY_APP = '''
from feedrank.serving.balance import worker_connections

worker_connections()  # claim this worker's connection slot at start, as feedrank's app_from_env does


async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''

SUPERVISE = textwrap.dedent("""
    import uvicorn
    from feedrank.serving.supervisor import serve
    config = uvicorn.Config("tiny_app:app", host="127.0.0.1", port=0, workers=2, lifespan="off",
                            timeout_worker_healthcheck=3)
    serve(config, lambda url: print("serving", url, flush=True))
""")


def _workers(parent: int) -> list[int]:
    """Live worker processes of ``parent`` (multiprocessing spawn children, not its resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X") and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def _shares_path(worker: int) -> Path:
    """The connection shares file the supervisor named to ``worker`` (in its environment)."""
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0") if b"=" in kv)
    return Path(env[SHARES_ENV.encode()].decode())


def _wait_for(predicate, what: str, deadline_s: float = 90.0):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_supervisor_logs_why_each_worker_was_replaced(tmp_path):
    (tmp_path / "tiny_app.py").write_text(TINY_APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "stderr.log"
    with log.open("w") as err, (tmp_path / "stdout.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SUPERVISE], cwd=tmp_path, env=env, stdout=out, stderr=err)
    try:
        _wait_for(lambda: "serving http://127.0.0.1:" in (tmp_path / "stdout.log").read_text(), "the URL")
        first, second = _wait_for(lambda: (w := _workers(proc.pid)) and len(w) == 2 and w, "two workers")
        shares = ConnectionShares(_shares_path(first))
        _wait_for(lambda: {first, second} <= set(shares.counts()), "both workers' connection slots")

        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: f"Worker [{first}] was killed by signal SIGKILL" in log.read_text(), "the SIGKILL line")
        _wait_for(lambda: first not in shares.counts(), "the killed worker's slot to be freed")

        os.kill(second, signal.SIGSTOP)  # alive but silent: the supervisor must kill it after 3 s
        _wait_for(lambda: f"Worker [{second}] did not answer the health check within 3 s" in log.read_text(),
                  "the health-check line")  # fmt: skip
        # Both were replaced: two workers again, neither of them an old one.
        _wait_for(lambda: (w := _workers(proc.pid)) and len(w) == 2 and not {first, second} & set(w), "replacements")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "code, words",
    [(1, "exited with status 1"), (3, "start-up failure"), (-signal.SIGSEGV, "killed by signal SIGSEGV"),
     (-signal.SIGKILL, "out-of-memory"), (None, "still running")],
)  # fmt: skip
def test_describe_exit(code, words):
    assert words in describe_exit(code)
