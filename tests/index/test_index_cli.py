"""`feedrank index build|check` through a typer app with the group registered (exit codes 0/1/2)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from feedrank.index import load_index, read_manifest

runner = CliRunner()


@pytest.fixture
def files(tmp_path, catalogue):
    vectors, ids = catalogue
    np.save(tmp_path / "vecs.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    pq.write_table(pa.table({"item_id": pa.array(list(ids))}), tmp_path / "ids.parquet")
    return tmp_path


def test_build_then_check(app, files):
    out = files / "idx"
    result = runner.invoke(app, ["index", "build", str(files / "vecs.npy"), "--ids", str(files / "ids.txt"),
                                 "--kind", "hnsw", "--out", str(out), "--model-version", "tt@1"])
    assert result.exit_code == 0, result.output
    assert f"published hnsw index of 2,000 items (dim 16) -> {out}: recall@100" in result.output
    assert read_manifest(out).model_version == "tt@1"

    result = runner.invoke(app, ["index", "check", str(out), "--queries", "200", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["manifest"]["count"] == 2000 and report["recall"]["queries"] == 200
    assert report["recall_ok"] is True and report["rebuild"] is False

    result = runner.invoke(app, ["index", "check", str(out), "--queries", "50", "--fresh", "500"])
    assert result.exit_code == 1, result.output  # 500 / 2500 = 20% fresh: action needed
    assert "recall@100:" in result.output and "rebuild: YES - 500 fresh items are 20.0% of the catalogue" in result.output

    result = runner.invoke(app, ["index", "check", str(out), "--model-version", "tt@2"])
    assert result.exit_code == 1 and "model changed" in result.output


def test_build_reads_parquet_ids_and_a_yaml_config(app, files):
    (files / "cfg.yaml").write_text("index:\n  kind: ivf\n  nprobe: 64\n  recall_k: 10\n")
    result = runner.invoke(app, ["index", "build", str(files / "vecs.npy"), "--ids", str(files / "ids.parquet"),
                                 "--out", str(files / "idx"), "--config", str(files / "cfg.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["config"]["kind"] == "ivf" and manifest["config"]["nprobe"] == 64 and manifest["recall_k"] == 10
    assert load_index(files / "idx").item_ids[7] == "i7"


def test_recall_gate_refusal_exits_1_and_writes_nothing(app, files):
    (files / "cfg.yaml").write_text("index:\n  kind: ivf\n  nlist: 100\n  nprobe: 1\n")
    result = runner.invoke(app, ["index", "build", str(files / "vecs.npy"), "--ids", str(files / "ids.txt"),
                                 "--out", str(files / "idx"), "--config", str(files / "cfg.yaml")])
    assert result.exit_code == 1
    assert "is below the floor 0.95" in result.output
    assert not (files / "idx").exists()


def _bad_input(files, kind):
    if kind == "blank line":
        (files / "ids.txt").write_text("a\n\nb\n")
        return [], "line 2 is blank"
    if kind == "too few ids":
        (files / "ids.txt").write_text("a\nb\n")
        return [], "item_ids has shape (2,), expected (2000,)"
    if kind == "nan vectors":
        vectors = np.load(files / "vecs.npy")
        vectors[17, 3] = np.nan
        np.save(files / "vecs.npy", vectors)
        return [], "1 row(s) with NaN or inf, first at row 17"
    if kind == "missing vectors":
        (files / "vecs.npy").unlink()
        return [], "vecs.npy: no such file"
    if kind == "not npy":
        (files / "vecs.npy").write_text("hello")
        return [], "not a readable .npy array"
    if kind == "ids column":
        pq.write_table(pa.table({"id": ["a"]}), files / "ids.parquet")
        return ["--ids", str(files / "ids.parquet")], "no column 'item_id' (columns: id)"
    if kind == "int ids":
        pq.write_table(pa.table({"item_id": [1, 2]}), files / "ids.parquet")
        return ["--ids", str(files / "ids.parquet")], "column item_id is int64, item ids must be strings"
    if kind == "unknown config key":
        (files / "cfg.yaml").write_text("index:\n  nprobes: 3\n")
        return ["--config", str(files / "cfg.yaml")], "unknown key(s) 'nprobes'"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["blank line", "too few ids", "nan vectors", "missing vectors", "not npy", "ids column", "int ids", "unknown config key"],
)
def test_bad_input_exits_2_naming_the_problem(app, files, kind):
    extra, message = _bad_input(files, kind)
    args = ["index", "build", str(files / "vecs.npy"), "--ids", str(files / "ids.txt"), "--kind", "flat",
            "--out", str(files / "idx"), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (files / "idx").exists()


def test_check_of_a_broken_index_exits_2(app, files):
    result = runner.invoke(app, ["index", "check", str(files / "nothing")])
    assert result.exit_code == 2 and "manifest.json not found" in result.output
