"""Fixtures for the labs tests: the report's headless-Chromium driver, shared rather than copied."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def browser():
    """``chromium(page, profile, *args)`` and ``console_lines(stderr)`` of
    ``tests/evaluate/test_report_browser.py`` (one way to drive Chromium in this suite); the test
    is skipped, with the reason, where no ``chromium`` is installed."""
    path = Path(__file__).parents[1] / "evaluate" / "test_report_browser.py"
    spec = importlib.util.spec_from_file_location("report_browser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return module
