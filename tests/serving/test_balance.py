"""Keep-alive connections spread over the workers (``feedrank.serving.balance``).

The shares file's arithmetic, a real uvicorn server with the balanced protocol in-process against
a peer slot whose count the test sets, and a real ``feedrank serve --workers 2`` whose 8
connections, opened at once, end up 4/4.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import uvicorn

from feedrank.serving import balance
from feedrank.serving.app import ServeSettings
from feedrank.serving.balance import SHARES_ENV, BalancedHttpToolsProtocol, ConnectionShares, WorkerConnections
from feedrank.serving.demo import ServerProcess

DEADLINE_S = 30.0  # a guard against a hang; the conditions below are met in milliseconds
STARTUP_S = 300.0  # for the second worker to come up on a loaded machine (ServerProcess waits as long for the first)


@pytest.fixture
def peer() -> Iterator[int]:
    """The pid of a live process that stands in for another worker."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def shares(tmp_path) -> ConnectionShares:
    return ConnectionShares.create(tmp_path / "connections", slots=4)


def test_over_share_is_more_than_the_ceiling_of_the_mean(shares, peer):
    mine, other = shares.claim(os.getpid()), shares.claim(peer)
    assert mine != other
    shares.publish(other, 3)
    for own, over in [(5, True), (4, False), (3, False), (6, True)]:
        shares.publish(mine, own)
        assert shares.over_share(own) is over, (own, shares.counts())
    shares.publish(other, 4)
    shares.publish(mine, 4)
    assert not shares.over_share(4)  # 4/4: balanced, nothing to release
    shares.publish(mine, 5)
    assert not shares.over_share(5)  # 5/4: ceil(9 / 2) = 5, so still within the share
    shares.publish(mine, 6)
    assert shares.over_share(6)


def test_one_release_at_a_time(shares, peer):
    shares.publish(shares.claim(peer), 0)
    worker = WorkerConnections(shares, os.getpid())
    assert worker.should_release(4)  # 4 of 4 against a peer with none
    assert shares.counts()[os.getpid()] == 3  # the released one no longer counts
    assert not worker.should_release(4)  # still over, but one is on its way out
    worker.releasing -= 1  # its connection closed (BalancedHttpToolsProtocol.connection_lost)
    assert worker.should_release(3)


def test_hand_over_waits_until_another_worker_accepts(shares, peer):
    other = shares.claim(peer)
    shares.publish(other, 3)
    worker = WorkerConnections(shares, os.getpid())
    waiting = threading.Thread(target=worker.hand_over, args=(DEADLINE_S,))
    waiting.start()
    waiting.join(0.05)
    assert waiting.is_alive()  # nobody accepted yet: still waiting
    shares.publish(other, 4)  # the peer accepted the reconnect
    waiting.join(DEADLINE_S)
    assert not waiting.is_alive()
    worker.hand_over(0.0)  # and the wait is bounded: a peer that accepts nothing does not hang it


def test_a_worker_alone_never_releases(shares):
    slot = shares.claim(os.getpid())
    shares.publish(slot, 100)
    assert not shares.over_share(100)


def test_claim_keeps_a_pid_its_slot_reuses_dead_ones_and_refuses_when_full(tmp_path, peer):
    shares = ConnectionShares.create(tmp_path / "connections", slots=2)
    mine = shares.claim(os.getpid())
    assert shares.claim(os.getpid()) == mine
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = shares.claim(int(dead.stdout))
    shares.publish(gone, 7)
    assert shares.claim(peer) == gone  # its process exited: the slot is free
    assert shares.counts() == {os.getpid(): 0, peer: 0}
    with pytest.raises(RuntimeError, match="all 2 connection slots belong to live workers"):
        shares.claim(1)  # init: alive
    shares.release(peer)
    assert shares.counts() == {os.getpid(): 0}


def test_a_file_that_is_not_a_shares_file_is_refused(tmp_path):
    path = tmp_path / "connections"
    path.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a connection shares file"):
        ConnectionShares(path)


@pytest.fixture
def server(shares, monkeypatch) -> Iterator[int]:
    """A uvicorn server with the balanced protocol in this process, attached to ``shares``; its port."""

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})

    monkeypatch.setenv(SHARES_ENV, str(shares.path))
    monkeypatch.setattr(balance, "_worker", None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=BalancedHttpToolsProtocol, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "the in-process server never started")
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(DEADLINE_S)
    sock.close()


def _get(conn: http.client.HTTPConnection) -> str:
    """GET / on ``conn``; its ``Connection`` response header ('' when kept alive)."""
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    return response.getheader("connection", "")


def _wait_for(condition, what: str, seconds: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_worker_over_its_share_closes_one_connection_and_no_more(server, shares, peer):
    other = shares.claim(peer)
    shares.publish(other, 4)  # the peer holds 4 connections
    conns = [http.client.HTTPConnection("127.0.0.1", server) for _ in range(6)]
    try:
        for conn in conns[:5]:
            assert _get(conn) == ""  # up to 5 of 9: within ceil(9 / 2)
        assert shares.counts()[os.getpid()] == 5
        assert _get(conns[5]) == "close"  # the 6th of 10 is over ceil(10 / 2) = 5: released
        _wait_for(lambda: balance._worker.releasing == 0, "the released connection was never closed")
        assert shares.counts()[os.getpid()] == 5
        assert [_get(conn) for conn in conns[:5]] == [""] * 5  # 5 of 9 again: nobody else is released
        shares.publish(other, 0)  # the peer lost its connections: 5 of 5 is over ceil(5 / 2) = 3
        assert _get(conns[0]) == "close"
    finally:
        for conn in conns:
            conn.close()


def test_without_a_shares_file_nothing_is_released(monkeypatch):
    monkeypatch.delenv(SHARES_ENV, raising=False)
    monkeypatch.setattr(balance, "_worker", None)
    assert balance.worker_connections() is None


@pytest.mark.slow
def test_two_workers_end_up_with_four_of_eight_connections_each(serving_world, tmp_path):
    """Eight connections opened at once may land on one worker (the shared socket's accept
    race); after a round or two of requests they sit four and four, and stay there."""
    config = tmp_path / "serving.yaml"
    config.write_text("serving:\n  index: {kind: flat}\n  event_log: {durable: false}\n")
    settings = ServeSettings(bundle=str(serving_world.two_tower.path), config=str(config), serving_log=str(tmp_path / "log"))
    with ServerProcess(settings, tmp_path, workers=2) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        _wait_for(lambda: _workers_answering(host, int(port)) == 2, "the second worker never answered", STARTUP_S)
        conns = [http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S) for _ in range(8)]
        try:
            start = threading.Barrier(len(conns))

            def first(conn: http.client.HTTPConnection) -> None:
                start.wait()
                conn.connect()

            threads = [threading.Thread(target=first, args=(c,)) for c in conns]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rounds = []
            while len(rounds) < 20 and rounds[-1:] != [([4, 4], 0)]:  # until a round finds 4/4, none closed
                answers = [_healthz(conn) for conn in conns]
                rounds.append((sorted(Counter(pid for pid, _ in answers).values()), sum(c == "close" for _, c in answers)))
            assert rounds[-1] == ([4, 4], 0), rounds
            for _ in range(3):  # and it stays so: nothing closed, nothing moved
                answers = [_healthz(conn) for conn in conns]
                assert sorted(Counter(pid for pid, _ in answers).values()) == [4, 4]
                assert [c for _, c in answers] == [""] * len(conns)
        finally:
            for conn in conns:
                conn.close()


def _healthz(conn: http.client.HTTPConnection) -> tuple[int, str]:
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    return json.loads(response.read())["pid"], response.getheader("connection", "")


def _pid(conn: http.client.HTTPConnection) -> int:
    return _healthz(conn)[0]


def _workers_answering(host: str, port: int) -> int:
    """How many distinct workers answer 40 fresh connections."""
    pids = set()
    for _ in range(40):
        conn = http.client.HTTPConnection(host, port, timeout=DEADLINE_S)
        pids.add(_pid(conn))
        conn.close()
    return len(pids)

