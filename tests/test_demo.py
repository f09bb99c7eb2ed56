"""`feedrank demo` chains simulate -> retrieval -> ranking -> report -> serving on a small world."""

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from feedrank.cli import app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shrunk(src: Path, dst: Path, **overrides: dict) -> Path:
    """The shipped config with some sections overridden (a smaller world, a split inside it)."""
    cfg = yaml.safe_load(src.read_text())
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    dst.write_text(yaml.safe_dump(cfg))
    return dst


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path: Path):
    world = tmp_path / "world.yaml"
    world.write_text("users: 600\nitems: 300\ndays: 4\nseed: 1\nstart_date: '2024-01-01'\n")
    retrieval = shrunk(CONFIGS / "demo.yaml", tmp_path / "retrieval.yaml",
                       features={"split_at": "2024-01-04T00:00:00+00:00"}, train={"epochs": 1},
                       loader={"batch_size": 256})
    ranking = shrunk(CONFIGS / "ranking_demo.yaml", tmp_path / "ranking.yaml", train={"epochs": 1})
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--world", str(world),
                                      "--retrieval", str(retrieval), "--ranking", str(ranking)])
    assert result.exit_code == 0, result.output
    for expected in ("CTR", "recall@10", "gauc", "report:", "cold_start", "accepted", "gone from the feed"):
        assert expected in result.output
    assert (out / "report.html").is_file() and (out / "bundle" / "bundle.json").is_file()


def test_demo_rejects_a_bad_config_before_any_work(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("two_tower:\n  dimm: 3\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--retrieval", str(bad)])
    assert result.exit_code == 2 and "dimm" in result.output
    assert not out.exists()


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path: Path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--out", str(precious)])
    assert result.exit_code == 2 and "not a feedrank demo run" in result.output
    assert (precious / "keep.txt").read_text() == "mine"
