"""``feedrank`` starts without its heavy libraries: importing the CLI, and ``--help`` of every group,
load none of torch, pyarrow, pandas, FAISS, FastAPI, uvicorn, matplotlib, scipy or DuckDB. Each
check runs in a fresh interpreter (this one has them loaded already). No timing is asserted;
``benchmarks/cli_startup.py`` prints the times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from feedrank.cli import COMMAND_GROUPS, app

HEAVY = ("torch", "pyarrow", "pandas", "faiss", "fastapi", "uvicorn", "matplotlib", "scipy", "duckdb")

PROBE = """
import json, sys
from feedrank.cli import app
args = json.loads(sys.argv[1])
if args:
    try:
        app(args, standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def _heavy_loaded(args: list[str]) -> list[str]:
    probe = PROBE.format(heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_heavy_library():
    assert _heavy_loaded([]) == []


@pytest.mark.parametrize("group", ["serve", "ingest mind", "train", "experiment plan", "index build", "evaluate"])
def test_help_loads_no_heavy_library(group):
    assert _heavy_loaded([*group.split(), "--help"]) == []


def test_every_group_is_registered():
    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert {"ingest", "validate", "datasets", "serve", "train", "experiment", "index", "demo"} <= names
    assert len(COMMAND_GROUPS) == len(set(COMMAND_GROUPS))


def test_experiment_help_lists_the_real_metrics():
    # The CLI spells the metric names out so that --help need not load pyarrow; they must agree.
    from feedrank.commands.experiment import METRIC_NAMES
    from feedrank.experiment.metrics import METRICS

    assert list(METRIC_NAMES) == list(METRICS)
