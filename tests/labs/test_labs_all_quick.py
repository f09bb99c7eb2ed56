"""`feedrank lab all --quick`, as a user runs it: every lab writes its result.json and plots, and
the one page shows every lab's section, table and plot in headless Chromium with no console
errors. Slow (the seven quick labs take a few minutes on two cores); no timing is asserted."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feedrank import labs
from feedrank.cli import app
from feedrank.labs.base import RESULT_FILE, read_result
from feedrank.labs.page import PAGE_FILE


def _browser():
    path = Path(__file__).parents[1] / "evaluate" / "test_report_browser.py"
    spec = importlib.util.spec_from_file_location("report_browser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BROWSER = _browser()


@pytest.mark.slow
def test_lab_all_quick_writes_every_result_and_one_page(tmp_path):
    out = tmp_path / "labs"
    result = CliRunner().invoke(app, ["lab", "all", "--quick", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    results = {name: read_result(out / name / RESULT_FILE) for name in labs.LABS}
    for name, r in results.items():
        assert r.name == name and r.quick and r.summary and r.tables, name
        assert all((out / name / plot).is_file() for plot in r.plots), name
    assert (out / PAGE_FILE).is_file()
    if BROWSER.CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); the results were checked")
    page = BROWSER.chromium(out / PAGE_FILE, tmp_path / "profile", "--dump-dom")
    assert BROWSER.console_lines(page.stderr) == []
    for name, r in results.items():
        section = re.search(rf'<section id="lab-{name}">.*?</section>', page.stdout, flags=re.S)
        assert section is not None and "<table>" in section.group(0), name
        assert all(f'data-plot="{plot}"' in section.group(0) for plot in r.plots), name
