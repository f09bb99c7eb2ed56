"""Generic CSV/Parquet reader with a column mapping; timestamps, booleans, bad rows, refusals."""

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feedrank.config import ConfigError, load_yaml
from feedrank.data.ingest import ingest
from feedrank.data.log import list_days, read_events
from feedrank.data.readers import BadInputError, ColumnMap, NoRowsError, read_tabular

UTC = dt.timezone.utc
MAP = ColumnMap.from_pairs(["user_id=uid", "item_id=article", "ts=event_time", "clicked=click", "dwell_s=dwell"])
HEADER = "uid,article,event_time,click,dwell,published,age_bucket"


def _csv(tmp_path, *lines, name="events.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_round_trip_with_mapping(tmp_path):
    path = _csv(
        tmp_path,
        HEADER,
        "u1,a1,2024-01-01T10:00:00,1,3.5,2023-12-31,18-24",
        "u1,a2,1704103200,no,,,18-24",
        "u2,a1,2024-01-02 08:00:00+01:00,TRUE,,,",
    )
    columns = ColumnMap.from_pairs(["user_id=uid", "item_id=article", "ts=event_time", "clicked=click", "dwell_s=dwell", "created_ts=published"])
    result = read_tabular(path, columns)
    assert ingest(result, tmp_path / "log").ok
    rows = {(r["user_id"], r["item_id"]): r for r in read_events(tmp_path / "log").to_pylist()}
    assert rows[("u1", "a1")]["ts"] == dt.datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert rows[("u1", "a2")]["ts"] == dt.datetime(2024, 1, 1, 10, tzinfo=UTC)  # 1704103200 = same instant
    assert rows[("u2", "a1")]["ts"] == dt.datetime(2024, 1, 2, 7, tzinfo=UTC)  # +01:00 offset applied
    assert [rows[k]["clicked"] for k in [("u1", "a1"), ("u1", "a2"), ("u2", "a1")]] == [True, False, True]
    assert rows[("u1", "a1")]["dwell_s"] == 3.5 and rows[("u2", "a1")]["dwell_s"] == 0.0
    assert rows[("u2", "a1")]["created_ts"] == dt.datetime(2023, 12, 31, tzinfo=UTC)  # from the catalogue
    assert rows[("u1", "a1")]["request_id"] == "u1@1704103200000000" == rows[("u1", "a2")]["request_id"]
    assert rows[("u1", "a1")]["age_bucket"] == "18-24"  # same-named column taken without a mapping


def test_parquet_native_types_without_mapping(tmp_path):
    table = pa.table(
        {
            "user_id": pa.array([7, 8], pa.int64()),
            "item_id": ["x", "y"],
            "ts": pa.array([1704103200, 1704189600], pa.int64()),
            "clicked": [True, False],
            "request_id": ["r1", "r2"],
            "position": pa.array([3, 0], pa.int32()),
        }
    )
    pq.write_table(table, tmp_path / "e.parquet")
    events = read_tabular(tmp_path / "e.parquet").canonical().to_pylist()
    assert events[0]["user_id"] == "7" and events[0]["position"] == 3 and events[0]["request_id"] == "r1"
    assert events[1]["ts"] == dt.datetime(2024, 1, 2, 10, tzinfo=UTC) and events[1]["clicked"] is False


def test_column_map_errors(tmp_path):
    with pytest.raises(ConfigError, match="'userid'"):
        ColumnMap.from_pairs(["userid=uid"])
    with pytest.raises(ConfigError, match="expected canonical=source"):
        ColumnMap.from_pairs(["user_id"])
    path = _csv(tmp_path, HEADER, "u1,a1,2024-01-01,1,0,,")
    with pytest.raises(ValueError, match="column 'nope' \\(mapped to item_id\\) not found"):
        read_tabular(path, ColumnMap(user_id="uid", item_id="nope", ts="event_time"))
    with pytest.raises(ValueError, match=r"no column for required \['user_id', 'item_id', 'ts'\]"):
        read_tabular(path)
    (tmp_path / "map.yaml").write_text("user_id: uid\nitem_id: article\nts: event_time\n")
    assert load_yaml(ColumnMap, tmp_path / "map.yaml").item_id == "article"
    (tmp_path / "bad.yaml").write_text("user: uid\n")
    with pytest.raises(ConfigError, match="'user'"):
        load_yaml(ColumnMap, tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "line, message",
    [
        ("u1,a2,2024-01-01", "expected 7 fields, found: 3"),
        ("u1,a2,yesterday,1,0,,", "event_time: not unix seconds or an ISO 8601 time: 'yesterday'"),
        ("u1,a2,2024-13-45T00:00:00,1,0,,", "not unix seconds or an ISO 8601 time"),
        ("u1,a2,2024-01-01,maybe,0,,", "click: not a boolean"),
        ("u1,a2,2024-01-01,1,long,,", "dwell is not a number: 'long'"),
        (",a2,2024-01-01,1,0,,", "empty uid"),
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path, line, message):
    path = _csv(tmp_path, HEADER, "u1,a1,2024-01-01,1,0,,", line, "u2,a1,2024-01-01,0,0,,")
    with pytest.raises(BadInputError, match=message) as exc:
        read_tabular(path, MAP)
    assert str(exc.value).startswith(f"{path}:3:")


def test_csv_skip_bad_rows_counts(tmp_path):
    path = _csv(tmp_path, HEADER, "u1,a1,2024-01-01,1,0,,", "u1,a2,2024-01-01", "u1,a3,never,1,0,,", "u2,a1,2024-01-01,0,0,,")
    result = read_tabular(path, MAP, skip_bad_rows=True)
    assert result.skipped_rows == 2
    assert sorted(result.events["item_id"].to_pylist()) == ["a1", "a1"]
    assert ingest(result, tmp_path / "log").run["skipped_rows"] == 2


def test_empty_header_only_and_missing(tmp_path):
    with pytest.raises(NoRowsError, match="no rows"):
        read_tabular(_csv(tmp_path, "", name="empty.csv"), MAP)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(NoRowsError, match="empty.csv: no rows"):
        read_tabular(tmp_path / "empty.csv", MAP)
    with pytest.raises(NoRowsError, match="only a header"):
        read_tabular(_csv(tmp_path, HEADER, name="h.csv"), MAP)
    with pytest.raises(FileNotFoundError, match="nope.csv: file not found"):
        read_tabular(tmp_path / "nope.csv", MAP)
    with pytest.raises(ValueError, match="unknown table format '.json'"):
        read_tabular(_csv(tmp_path, HEADER, name="e.json"), MAP)


def test_invalid_days_refused_earlier_partitions_intact(tmp_path):
    log = tmp_path / "log"
    first = _csv(tmp_path, HEADER, "u0,a0,2024-01-01T09:00:00,1,2,,", name="first.csv")
    assert ingest(read_tabular(first, MAP), log).ok
    columns = ColumnMap.from_pairs(["user_id=uid", "item_id=article", "ts=event_time", "clicked=click", "dwell_s=dwell", "created_ts=published"])
    bad = _csv(
        tmp_path,
        HEADER,
        "u1,a1,2024-01-02T10:00:00,1,5,2024-01-01,",  # day 2: fine
        "u1,a2,2024-01-03T10:00:00,1,-4,2024-01-01,",  # day 3: negative dwell
        "u2,a3,2024-01-04T10:00:00,1,1,2024-01-05,",  # day 4: clicked before it was published
        name="bad.csv",
    )
    done = ingest(read_tabular(bad, columns), log)
    assert not done.ok and sorted(done.write.refused) == ["2024-01-03", "2024-01-04"]
    assert "negative dwell_s" in str(done.write.refused["2024-01-03"])
    assert "time travel" in str(done.write.refused["2024-01-04"])
    assert list_days(log) == ["2024-01-01", "2024-01-02"]
    kept = read_events(log).to_pylist()
    assert [(r["user_id"], r["item_id"], r["dwell_s"]) for r in kept] == [("u0", "a0", 2.0), ("u1", "a1", 5.0)]
    assert done.run["refused_days"]["2024-01-03"]["violations"][0]["rule"] == "negative dwell_s"
