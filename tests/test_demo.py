"""`feedrank demo` runs the pipeline on a small synthetic world and prints what it did."""

from pathlib import Path

from typer.testing import CliRunner

from feedrank.cli import app


def test_demo_simulates_and_prints_summary(tmp_path: Path):
    world = tmp_path / "world.yaml"
    world.write_text("users: 300\nitems: 200\ndays: 3\nseed: 1\n")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "run"), "--world", str(world)])
    assert result.exit_code == 0, result.output
    assert "events" in result.output and "CTR" in result.output
    assert (tmp_path / "run" / "log" / "summary.json").is_file()
