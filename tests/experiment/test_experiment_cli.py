"""`feedrank experiment plan|analyze` through the root typer app."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from typer.testing import CliRunner

from feedrank.cli import app
from feedrank.data.log import write_log
from feedrank.experiment.assignment import assign

runner = CliRunner()

PLAN = [
    "experiment",
    "plan",
    "--metric",
    "time_spent",
    "--baseline",
    "120",
    "--sd",
    "300",
    "--mde",
    "2%",
    "--daily-users",
    "200000",
    "--traffic",
    "5%",
]


def test_plan_text():
    result = runner.invoke(app, PLAN)
    assert result.exit_code == 0, result.output
    assert "Sample: 245,278 control + 245,278 treatment = 490,556 users" in result.output
    assert "-> 50 days needed, 56 planned" in result.output
    assert "1. canary" in result.output and "[success] decide only at day 56" in result.output


def test_plan_json_and_out_file_agree(tmp_path):
    out = tmp_path / "plan.json"
    result = runner.invoke(app, [*PLAN, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == json.loads(out.read_text())
    assert printed["sample"] == {"n_control": 245278, "n_treatment": 245278, "total": 490556}
    assert printed["days"] == 56 and printed["traffic"] == 0.05
    # the same plan with fractions instead of percentages
    again = runner.invoke(app, [a.replace("2%", "0.02").replace("5%", "0.05") for a in PLAN] + ["--json"])
    assert json.loads(again.output) == printed


def test_plan_ctr_from_binomial_and_cuped():
    result = runner.invoke(
        app,
        [
            "experiment",
            "plan",
            "--metric",
            "ctr",
            "--baseline",
            "5%",
            "--impressions-per-user",
            "30",
            "--design-effect",
            "2",
            "--mde",
            "2%",
            "--daily-users",
            "1e6",
            "--traffic",
            "0.05",
            "--cuped-r2",
            "0.3",
            "--one-sided",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["metric"]["variance_factor"] == pytest.approx(0.7)
    assert plan["design"]["alternative"] == "one-sided"


@pytest.mark.parametrize(
    "change, message",
    [
        (("--traffic", "150%"), "traffic must be in (0, 100%]"),
        (("--traffic", "0"), "traffic must be in (0, 100%]"),
        (("--traffic", "5"), "ambiguous"),
        (("--mde", "0"), "minimum detectable effect must be a positive number"),
        (("--alpha", "1.2"), "alpha must be in (0, 1)"),
        (("--power", "0"), "power must be in (0, 1)"),
        (("--sd", "0"), "zero variance"),
    ],
)
def test_plan_bad_input_exits_2_with_message(change, message):
    args = list(PLAN)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.fixture
def ab_log(tmp_path, events_factory):
    events = events_factory(n_users=1500, days=2, seed=1, salt="exp-7", ctr_lift=0.4, hide_lift=1.0)
    assert write_log(tmp_path / "log", events).ok
    return tmp_path / "log", events


def test_analyze_text_and_json(ab_log, tmp_path):
    log, events = ab_log
    base = [
        "experiment",
        "analyze",
        str(log),
        "--arms",
        "control,treatment",
        "--salt",
        "exp-7",
        "--pre-end",
        "2024-03-02",
    ]
    text = runner.invoke(app, base)
    assert text.exit_code == 0, text.output
    assert "Treatment raised CTR by" in text.output
    assert "guardrail breached: hide rate" in text.output
    assert "CUPED" in text.output and "sample ratio OK" in text.output
    out = tmp_path / "result.json"
    js = runner.invoke(app, [*base, "--weights", "50,50", "--json", "--out", str(out)])
    result = json.loads(js.output)
    assert result == json.loads(out.read_text())
    users = set(events["user_id"].to_pylist())  # every synthetic user has impressions on both days
    arms = assign(sorted(users), "exp-7", ["control", "treatment"])
    assert sum(result["users"].values()) == len(users)
    assert result["users"]["treatment"] == int((arms == "treatment").sum())
    assert result["metrics"][0]["metric"] == "ctr" and result["metrics"][0]["cuped"]
    assert result["srm"]["ok"] and result["summary"][0].startswith("Treatment raised CTR")


def test_analyze_with_assignment_file(ab_log, tmp_path):
    log, events = ab_log
    ids = sorted(set(events["user_id"].to_pylist()))
    path = tmp_path / "assignment.csv"
    pacsv.write_csv(pa.table({"user_id": ids, "arm": assign(ids, "exp-7", ["control", "treatment"]).tolist()}), path)
    by_file = runner.invoke(
        app, ["experiment", "analyze", str(log), "--arms", "control,treatment", "--assignment", str(path), "--json"]
    )
    by_salt = runner.invoke(
        app, ["experiment", "analyze", str(log), "--arms", "control,treatment", "--salt", "exp-7", "--json"]
    )
    assert by_file.exit_code == 0, by_file.output
    assert json.loads(by_file.output) == json.loads(by_salt.output)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--arms", "control,treatment,extra", "--salt", "exp-7", "--weights", "50,50,0"],
            "arm(s) ['extra'] have no users",
        ),
        (
            ["--arms", "control,treatment", "--salt", "exp-7", "--weights", "0,0"],
            "weights must sum to a positive number",
        ),
        (["--arms", "control,treatment", "--salt", "exp-7", "--weights", "a,b"], "--weights: 'a,b'"),
        (["--arms", "control,treatment"], "give exactly one of --salt or --assignment"),
        (["--arms", "control,treatment", "--salt", "s", "--pre-end", "March"], "--pre-end: 'March' is not a date"),
        (["--arms", "control,treatment", "--salt", "s", "--metrics", "revenue"], "unknown metric 'revenue'"),
    ],
)
def test_analyze_bad_input(ab_log, args, message):
    log, _ = ab_log
    result = runner.invoke(app, ["experiment", "analyze", str(log), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_analyze_missing_log(tmp_path):
    result = runner.invoke(app, ["experiment", "analyze", str(tmp_path / "nope"), "--arms", "a,b", "--salt", "s"])
    assert result.exit_code == 2 and "no event log under" in result.output


def test_plan_from_log_estimates_baseline_variance_and_cuped(ab_log):
    log, _ = ab_log
    result = runner.invoke(
        app,
        [
            "experiment",
            "plan",
            "--metric",
            "ctr",
            "--from-log",
            str(log),
            "--pre-end",
            "2024-03-02",
            "--mde",
            "5%",
            "--daily-users",
            "100000",
            "--traffic",
            "5%",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    metric = json.loads(result.output)["metric"]
    assert 0.03 < metric["baseline"] < 0.15
    assert metric["design_effect"] > 1 and 0 < metric["variance_factor"] < 1
    no_baseline = runner.invoke(
        app, ["experiment", "plan", "--metric", "time_spent", "--mde", "5%", "--daily-users", "1000", "--traffic", "5%"]
    )
    assert no_baseline.exit_code == 2 and "--baseline is required" in no_baseline.output
