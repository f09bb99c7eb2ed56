"""`feedrank index build` reads item ids chunk by chunk into Arrow and the index makes one Python copy:
the same ids, errors and index as reading them whole."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from feedrank.commands import index as index_commands
from feedrank.commands.index import read_item_ids
from feedrank.index import IndexConfig, build_index, load_index
from feedrank.index.build import IndexInputError, check_ids

runner = CliRunner()


@pytest.fixture
def id_files(tmp_path, catalogue):
    _, ids = catalogue
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    pq.write_table(pa.table({"item_id": pa.array(list(ids))}), tmp_path / "ids.parquet", row_group_size=300)
    return tmp_path


@pytest.mark.parametrize("name", ["ids.txt", "ids.parquet"])
def test_chunked_read_gives_the_ids_of_a_whole_read(id_files, catalogue, name):
    ids = read_item_ids(id_files / name, chunk_rows=7)
    assert ids.num_chunks > 1 and ids.type == pa.string()
    assert ids.to_pylist() == list(catalogue[1])
    checked = check_ids(ids, len(catalogue[1]))
    assert checked.dtype == object and type(checked[0]) is str
    assert np.array_equal(checked, check_ids(list(catalogue[1]), len(catalogue[1])))


def test_errors_in_a_later_chunk_name_the_line_or_row(tmp_path):
    (tmp_path / "ids.txt").write_text("a\nb\nc\nd\n\nf\n")
    with pytest.raises(ValueError, match="line 5 is blank"):
        read_item_ids(tmp_path / "ids.txt", chunk_rows=2)
    pq.write_table(pa.table({"item_id": pa.array(["a", "b", "c", None, "e"])}), tmp_path / "ids.parquet", row_group_size=2)
    with pytest.raises(ValueError, match="null\\(s\\), first at row 3"):
        read_item_ids(tmp_path / "ids.parquet", chunk_rows=2)
    dup = pa.chunked_array([pa.array(["a", "b"]), pa.array(["c", "a"])])
    with pytest.raises(IndexInputError, match="1 duplicated id\\(s\\), e.g. 'a'"):
        check_ids(dup, 4)
    with pytest.raises(IndexInputError, match="Arrow int64 array, item ids must be strings"):
        check_ids(pa.chunked_array([pa.array([1, 2])]), 2)


def test_cli_build_with_chunked_ids_publishes_the_same_index(app, id_files, catalogue, monkeypatch):
    vectors, ids = catalogue
    np.save(id_files / "vecs.npy", vectors)
    monkeypatch.setattr(index_commands, "ID_CHUNK", 150)
    (id_files / "cfg.yaml").write_text("index:\n  kind: ivf\n  nprobe: 64\n")
    result = runner.invoke(app, ["index", "build", str(id_files / "vecs.npy"), "--ids", str(id_files / "ids.parquet"),
                                 "--out", str(id_files / "idx"), "--config", str(id_files / "cfg.yaml")])
    assert result.exit_code == 0, result.output
    published = load_index(id_files / "idx")
    whole = build_index(vectors, list(ids), IndexConfig(kind="ivf", nprobe=64))  # the ids as one Python list
    assert np.array_equal(published.item_ids, whole.item_ids) and published.item_ids.dtype == object
    assert np.array_equal(published.search(vectors[:50], 20)[1], whole.search(vectors[:50], 20)[1])
