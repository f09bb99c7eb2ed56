"""Abstracts (the optional ``abstract`` item column): every reader keeps them, the log stores them,
a log written before the column existed reads them as null, and bad ones are refused at the reader."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.data.ingest import ingest
from feedrank.data.log import EVENTS_DIR, read_events, read_items
from feedrank.data.readers import BadInputError, read_ebnerd, read_mind, read_tabular
from feedrank.data.schema import EVENT_SCHEMA, MAX_ABSTRACT_CHARS


def test_mind_keeps_abstracts_into_items_and_log_rows_and_an_empty_one_is_null(tmp_path, rfx):
    result = read_mind(rfx.write_mind(tmp_path / "MINDsmall_train"))
    items = {r["item_id"]: r["abstract"] for r in result.items.to_pylist()}
    assert items == {"N1": "Abstract 1", "N2": "Abstract 2", "N3": None}  # N3's abstract field is empty
    assert ingest(result, tmp_path / "log").ok
    rows = read_events(tmp_path / "log", columns=["item_id", "abstract"]).to_pylist()
    assert {(r["item_id"], r["abstract"]) for r in rows} == {("N1", "Abstract 1"), ("N2", "Abstract 2"), ("N3", None)}
    assert {r["item_id"]: r["abstract"] for r in read_items(tmp_path / "log").to_pylist()}["N2"] == "Abstract 2"


def test_mind_refuses_an_abstract_too_long_naming_the_line_or_skips_and_counts_it(tmp_path, rfx):
    news = list(rfx.MIND_NEWS)
    news[1] = news[1].replace("Abstract 2", "w" * (MAX_ABSTRACT_CHARS + 1))
    split = rfx.write_mind(tmp_path / "MINDsmall_train", news=news)
    with pytest.raises(BadInputError, match=rf"news.tsv:2: abstract longer than {MAX_ABSTRACT_CHARS} characters"):
        read_mind(split)
    result = read_mind(split, skip_bad_rows=True)
    assert result.skipped_rows == 1 and "N2" not in result.items["item_id"].to_pylist()


def test_ebnerd_keeps_the_subtitle_as_abstract_and_reads_articles_without_one(tmp_path, rfx):
    articles = rfx.ebnerd_articles()
    articles = articles.set_column(articles.schema.get_field_index("subtitle"), "subtitle",
                                   pa.array(["Lead one", "", None, "Lead seven"]))  # fmt: skip
    split = rfx.write_ebnerd(tmp_path / "a")
    pq.write_table(articles, tmp_path / "a" / "articles.parquet")
    got = {r["item_id"]: r["abstract"] for r in read_ebnerd(split).items.to_pylist()}
    assert got == {"1": "Lead one", "2": None, "3": None, "7": "Lead seven"}
    pq.write_table(articles.drop_columns(["subtitle"]), tmp_path / "a" / "articles.parquet")
    assert read_ebnerd(split).items["abstract"].null_count == 4
    pq.write_table(articles.set_column(articles.schema.get_field_index("subtitle"), "subtitle", pa.array([1, 2, 3, 4])),
                   tmp_path / "a" / "articles.parquet")  # fmt: skip
    with pytest.raises(ValueError, match="column 'subtitle' must be text"):
        read_ebnerd(split)


def test_tabular_maps_an_abstract_column_and_refuses_a_numeric_one(tmp_path):
    base = {"user_id": ["u1", "u2"], "item_id": ["i1", "i2"], "ts": ["2024-01-01T00:00:00", "2024-01-01T01:00:00"]}
    pq.write_table(pa.table({**base, "lead": ["A storm hits", " "]}), tmp_path / "t.parquet")
    from feedrank.data.readers.tabular import ColumnMap

    result = read_tabular(tmp_path / "t.parquet", ColumnMap(abstract="lead"))
    assert result.items["abstract"].to_pylist() == ["A storm hits", None]
    pq.write_table(pa.table({**base, "abstract": [1.5, 2.5]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match="column 'abstract' must be text"):
        read_tabular(tmp_path / "n.parquet")


def test_a_log_written_before_abstracts_reads_them_as_null(tmp_path, rfx):
    assert ingest(read_mind(rfx.write_mind(tmp_path / "MINDsmall_train")), tmp_path / "log").ok
    for part in (tmp_path / "log" / EVENTS_DIR).rglob("*.parquet"):  # rewrite as the old schema wrote it
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["abstract"]), part)
        assert "abstract" not in pq.read_schema(part).names
    events = read_events(tmp_path / "log")
    assert events.schema.names == EVENT_SCHEMA.names and events["abstract"].null_count == events.num_rows
