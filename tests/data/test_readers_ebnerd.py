"""EB-NeRD reader: Parquet fixtures with the official column names and types -> canonical log."""

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.data.ingest import ingest
from feedrank.data.log import list_days, read_events
from feedrank.data.readers import BadInputError, NoRowsError, read_ebnerd

UTC = dt.timezone.utc


def _key(table):
    return {(r["request_id"], r["item_id"]): r for r in table.to_pylist()}


def test_ebnerd_round_trip(tmp_path, rfx):
    done = ingest(read_ebnerd(rfx.write_ebnerd(tmp_path / "ebnerd_demo")), tmp_path / "log")
    assert done.ok
    rows = _key(read_events(tmp_path / "log"))
    assert len(rows) == 7  # 3 + 2 in-view articles, 2 history clicks
    clicked = rows[("101", "2")]
    assert clicked["clicked"] and clicked["position"] == 1
    assert clicked["dwell_s"] == 25.0 and clicked["scroll_pct"] == 100.0  # next_read_time / next_scroll
    assert clicked["ts"] == dt.datetime(2023, 5, 24, 7, 47, 53, tzinfo=UTC)
    assert clicked["created_ts"] == dt.datetime(2023, 5, 20, tzinfo=UTC)
    assert clicked["publisher"] == "ekstrabladet.dk" and clicked["category"] == "nyheder"
    assert clicked["age_bucket"] == "50-59"
    unclicked = rows[("101", "3")]
    assert not unclicked["clicked"] and unclicked["dwell_s"] == 0.0 and unclicked["item_type"] == "video"
    assert rows[("102", "1")]["age_bucket"] is None
    hist = rows[("hist-22779", "3")]
    assert hist["clicked"] and hist["position"] == 1 and hist["dwell_s"] == 40.0 and hist["scroll_pct"] is None
    assert hist["ts"] == dt.datetime(2023, 5, 2, 9, 30, tzinfo=UTC)


def test_ebnerd_articles_in_split_dir_and_multi_click(tmp_path, rfx):
    behaviors = rfx.ebnerd_behaviors(article_ids_clicked=pa.array([[2, 3], []], pa.list_(pa.int32())))
    result = read_ebnerd(rfx.write_ebnerd(tmp_path / "b", behaviors=behaviors, articles_in_parent=False))
    rows = _key(result.events)
    # Two clicks: next_read_time cannot be attributed, so neither clicked row gets dwell.
    assert rows[("101", "2")]["clicked"] and rows[("101", "3")]["clicked"]
    assert rows[("101", "2")]["dwell_s"] == 0.0 and rows[("101", "2")]["scroll_pct"] is None


def test_ebnerd_bad_rows(tmp_path, rfx):
    behaviors = rfx.ebnerd_behaviors(user_id=pa.array([22779, None], pa.uint32()))
    split = rfx.write_ebnerd(tmp_path / "b", behaviors=behaviors)
    with pytest.raises(BadInputError, match=r"behaviors\.parquet row 2: null user_id"):
        read_ebnerd(split)
    result = read_ebnerd(split, skip_bad_rows=True)
    assert result.skipped_rows == 1 and "102" not in result.events["request_id"].to_pylist()

    unknown = rfx.ebnerd_behaviors(article_ids_inview=pa.array([[1, 2, 3], [3, 99]], pa.list_(pa.int32())))
    with pytest.raises(BadInputError, match=r"row 2: unknown article id .*99"):
        read_ebnerd(rfx.write_ebnerd(tmp_path / "c", behaviors=unknown))


def test_ebnerd_missing_column_empty_and_missing_files(tmp_path, rfx):
    split = rfx.write_ebnerd(tmp_path / "b", behaviors=rfx.ebnerd_behaviors().drop_columns(["article_ids_clicked"]))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['article_ids_clicked'\]"):
        read_ebnerd(split)
    pq.write_table(rfx.ebnerd_behaviors().slice(0, 0), split / "behaviors.parquet")
    with pytest.raises(NoRowsError, match="behaviors.parquet: no rows"):
        read_ebnerd(split)
    (split / "history.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="history.parquet: file not found"):
        read_ebnerd(split)


def test_ebnerd_time_travel_day_refused_others_written(tmp_path, rfx):
    split = rfx.write_ebnerd(tmp_path / "b")
    # Article 2 "published" after the 2023-05-24 click on it: that day must be refused.
    pq.write_table(
        rfx.ebnerd_articles(["2023-04-30 00:00:00", "2023-05-24 08:00:00", "2023-04-01 00:00:00", "2023-05-01 00:00:00"]),
        tmp_path / "b" / "articles.parquet",
    )
    done = ingest(read_ebnerd(split), tmp_path / "log")
    assert not done.ok and list(done.write.refused) == ["2023-05-24"]
    assert "time travel" in str(done.write.refused["2023-05-24"])
    assert list_days(tmp_path / "log") == ["2023-05-01", "2023-05-02", "2023-05-25"]
