"""`feedrank serve --workers 2` for real: it prints the URL it serves on (``--port 0``: a free port,
named in the URL) and both workers come up under the health-check timeout it was given."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest


@pytest.mark.slow
def test_serve_prints_its_url_and_serves_with_two_workers(serving_world, tmp_path):
    config = tmp_path / "serving.yaml"
    config.write_text(f"serving:\n  index: {{kind: flat}}\n  start_time: '{serving_world.start.isoformat()}'\n")
    out = tmp_path / "stdout.log"
    with out.open("w") as stdout, (tmp_path / "stderr.log").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "feedrank.cli", "serve", str(serving_world.two_tower.path), "--ranker",
             str(serving_world.ranker.path), "--log", str(serving_world.log), "--config", str(config),
             "--serving-log", str(tmp_path / "slog"), "--port", "0", "--workers", "2", "--healthcheck-timeout", "120"],
            stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"feedrank serve: (http://127\.0\.0\.1:\d+) \(2 workers, health-check timeout 120 s\)",
                              out.read_text())  # fmt: skip
            url = found.group(1) if found else None
            time.sleep(0.2)
        assert url is not None, (tmp_path / "stderr.log").read_text()[-3000:]
        status = None
        while status != 200 and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{url}/healthz", timeout=5.0).status_code
            except httpx.TransportError:
                time.sleep(0.5)
        assert status == 200, (tmp_path / "stderr.log").read_text()[-3000:]
        assert "did not answer the health check" not in (tmp_path / "stderr.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                          ("0.0.0.0", True), ("10.1.2.3", True)])  # fmt: skip
def test_serve_warns_when_it_listens_beyond_loopback_without_an_api_key(serving_world, host, warned):
    from typer.testing import CliRunner

    from feedrank.cli import app

    result = CliRunner().invoke(app, ["serve", str(serving_world.two_tower.path), "--host", host, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("with no API key" in result.output) == warned


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (16, 2)])
def test_default_workers_is_one_per_core_up_to_two(monkeypatch, cores, expected):
    from feedrank.commands import serve

    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert serve.default_workers() == expected
