"""Canonical schema validation and the partitioned, all-or-nothing log store."""

import datetime as dt

import pyarrow as pa
import pytest

from feedrank.data.log import list_days, read_events, write_day, write_items, read_items, write_log
from feedrank.data.schema import EVENT_SCHEMA, InvalidLogError, SchemaError, conform, validate

T0 = dt.datetime(2024, 3, 1, 8, 0, tzinfo=dt.timezone.utc)


def events(n_days: int = 2, per_day: int = 3) -> pa.Table:
    rows = []
    for d in range(n_days):
        for i in range(per_day):
            rows.append(
                dict(
                    user_id=f"u{i}",
                    item_id=f"i{i}",
                    ts=T0 + dt.timedelta(days=d, minutes=i),
                    request_id=f"r{d}-{i}",
                    position=i,
                    clicked=i == 0,
                    dwell_s=12.5 if i == 0 else 0.0,
                    shared=False,
                    hidden=i == 2,
                    created_ts=T0 - dt.timedelta(hours=1),
                    publisher="p1",
                )
            )
    return pa.Table.from_pylist(rows)


def test_valid_log_passes_and_conform_fills_defaults():
    table = events()
    assert validate(table).ok
    minimal = pa.table({"user_id": ["u"], "item_id": ["i"], "ts": [T0], "request_id": ["r"]})
    full = conform(minimal)
    assert full.schema.names == EVENT_SCHEMA.names
    assert full["clicked"].to_pylist() == [False] and full["dwell_s"].to_pylist() == [0.0]
    assert full["title"].null_count == 1


def test_missing_key_column_and_bad_cast_are_named():
    with pytest.raises(SchemaError, match="missing required column 'request_id'"):
        conform(pa.table({"user_id": ["u"], "item_id": ["i"], "ts": [T0]}))
    bad = events(1, 1).set_column(4, "position", pa.array(["third"]))
    with pytest.raises(SchemaError, match="column 'position'"):
        conform(bad)


def test_every_rule_is_reported_with_count_and_example():
    table = events(1, 3).to_pylist()
    table[0]["dwell_s"] = -1.0  # negative dwell (clicked row)
    table[1]["user_id"] = None  # null key
    table[2]["clicked"] = True
    table[2]["ts"] = T0 - dt.timedelta(days=1)  # clicked before creation
    table.append(dict(table[0]))  # duplicate
    table.append({**events(1, 1).to_pylist()[0], "request_id": "rx", "clicked": False, "dwell_s": float("nan")})
    table.append({**events(1, 1).to_pylist()[0], "request_id": "ry", "clicked": False, "dwell_s": 3.0})
    report = validate(pa.Table.from_pylist(table))
    rules = {v.rule: v for v in report.violations}
    assert rules["negative dwell_s"].count == 2
    assert rules["null user_id"].count == 1
    assert rules["engagement before item creation (time travel)"].count == 1
    assert rules["duplicate row (same request_id, user_id, item_id, ts)"].count == 1
    assert rules["non-finite dwell_s"].count == 1
    assert rules["dwell_s > 0 on an unclicked impression"].count == 1
    assert rules["null user_id"].examples[0]["item_id"] == "i1"
    assert not report.ok and "rule(s) violated" in str(report)


def test_write_log_partitions_by_day_and_round_trips(tmp_path):
    result = write_log(tmp_path, events(3, 4))
    assert result.ok and result.rows == 12
    assert list_days(tmp_path) == ["2024-03-01", "2024-03-02", "2024-03-03"]
    back = read_events(tmp_path)
    assert back.num_rows == 12 and back.schema == EVENT_SCHEMA
    window = read_events(tmp_path, start=T0 + dt.timedelta(days=1), end=T0 + dt.timedelta(days=2))
    assert window.num_rows == 4


def test_failing_day_is_refused_and_earlier_days_survive(tmp_path):
    write_log(tmp_path, events(2, 3))
    before = read_events(tmp_path).sort_by("request_id")
    rows = events(3, 3).to_pylist()
    for row in rows:
        if row["ts"].day == 2:
            row["dwell_s"] = -5.0  # poison day 2 only
        row["position"] += 10  # any change so we can see what was rewritten
    result = write_log(tmp_path, pa.Table.from_pylist(rows))
    assert not result.ok and list(result.refused) == ["2024-03-02"]
    assert result.written_days == ["2024-03-01", "2024-03-03"]
    after = read_events(tmp_path)
    day2 = after.filter(pa.compute.equal(pa.compute.day(after["ts"]), 2)).sort_by("request_id")
    assert day2.equals(before.filter(pa.compute.equal(pa.compute.day(before["ts"]), 2)))
    assert after.num_rows == 9


def test_write_day_is_all_or_nothing(tmp_path):
    good = events(1, 2)
    bad = conform(events(1, 2)).set_column(6, "dwell_s", pa.array([-1.0, 0.0], pa.float32()))
    write_day(tmp_path, "2024-03-01", [good])
    with pytest.raises(InvalidLogError, match="chunk 1"):
        write_day(tmp_path, "2024-03-01", [good, bad])
    assert read_events(tmp_path).num_rows == 2  # the earlier version of the day is intact
    assert not [p for p in (tmp_path / "events").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="other days"):
        write_day(tmp_path, "2024-03-05", [good])


def test_empty_log_dir_gives_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no event log"):
        read_events(tmp_path)
    with pytest.raises(FileNotFoundError, match="no item catalogue"):
        read_items(tmp_path)


def test_items_catalogue_round_trip(tmp_path):
    write_items(tmp_path, pa.table({"item_id": ["a", "b"], "publisher": ["p", "q"]}))
    items = read_items(tmp_path)
    assert items["item_id"].to_pylist() == ["a", "b"] and items["created_ts"].null_count == 2
