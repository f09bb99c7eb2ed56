"""`feedrank lab all --quick`, as a user runs it: every lab writes its result.json and plots, and
the one page shows every lab's section, table and plot in headless Chromium with no console
errors. Slow (the seven quick labs take a few minutes on two cores); no timing is asserted."""

from __future__ import annotations

import re
import pytest
from typer.testing import CliRunner

from feedrank import labs
from feedrank.cli import app
from feedrank.labs.base import RESULT_FILE, read_result
from feedrank.labs.page import PAGE_FILE


@pytest.mark.slow
def test_lab_all_quick_writes_every_result_and_one_page(tmp_path, request):
    out = tmp_path / "labs"
    result = CliRunner().invoke(app, ["lab", "all", "--quick", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    results = {name: read_result(out / name / RESULT_FILE) for name in labs.LABS}
    for name, r in results.items():
        assert r.name == name and r.quick and r.summary and r.tables, name
        assert all((out / name / plot).is_file() for plot in r.plots), name
    assert (out / PAGE_FILE).is_file()
    browser = request.getfixturevalue("browser")  # skips here, results checked, where chromium is missing
    page = browser.chromium(out / PAGE_FILE, tmp_path / "profile", "--dump-dom")
    assert browser.console_lines(page.stderr) == []
    for name, r in results.items():
        section = re.search(rf'<section id="lab-{name}">.*?</section>', page.stdout, flags=re.S)
        assert section is not None and "<table>" in section.group(0), name
        assert all(f'data-plot="{plot}"' in section.group(0) for plot in r.plots), name
