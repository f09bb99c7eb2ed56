"""The report in a real browser: headless Chromium loads report.html without console messages,
shows the metric table, and renders a non-trivial screenshot.

Chromium logs every console message (errors, uncaught exceptions, logs) to stderr as a line
containing ``:CONSOLE`` when started with ``--enable-logging=stderr``. The page has no scripts,
so any such line is a failure; ``test_console_detection_works`` proves the check can fail.
Skipped only when no ``chromium`` binary is installed (Debian package ``chromium``)."""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from feedrank.evaluate.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # three browser launches: ~10 s on a busy 2-core machine
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run():
    spec = importlib.util.spec_from_file_location("report_fixtures", Path(__file__).with_name("test_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_run


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local file with nothing that phones home."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri(),
    ]  # fmt: skip
    # the timeout only bounds a hang: a launch takes seconds, but far longer on a loaded machine
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    run = _make_run()(tmp_path_factory.mktemp("run"))
    return write_report(run, n_resamples=20)


def test_console_detection_works(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><p>x</p><script>console.error("deliberate-failure")</script></body></html>')
    lines = console_lines(chromium(bad, tmp_path / "profile", "--dump-dom").stderr)
    assert any("deliberate-failure" in line for line in lines)


def test_report_loads_without_console_messages_and_shows_the_table(page, tmp_path):
    result = chromium(page, tmp_path / "profile", "--dump-dom")
    assert console_lines(result.stderr) == []
    dom = result.stdout
    table = re.search(r'<table id="metrics-table">.*?</table>', dom, flags=re.S)
    assert table is not None
    rows = re.findall(r"<tr><td>(\w+)</td>", table.group(0))
    assert rows == ["good", "weak", "random"]
    assert "<th>gauc</th>" in table.group(0) and 'class="best"' in table.group(0)
    for section in ("Comparisons", "Training curves", "Calibration", "Score distributions", "Cold vs warm users"):
        assert f"<h2>{section}</h2>" in dom
    assert dom.count("data:image/png;base64,") == 4


def test_screenshot_is_non_trivial(page, tmp_path):
    shot = tmp_path / "report.png"
    result = chromium(page, tmp_path / "profile", "--hide-scrollbars", "--window-size=1280,3600", f"--screenshot={shot}")
    assert console_lines(result.stderr) == []
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 100_000  # a blank page is a few kB
