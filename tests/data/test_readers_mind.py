"""MIND reader: real-format fixture files -> canonical log, and every kind of bad input."""

import datetime as dt

import pyarrow.compute as pc
import pytest

from feedrank.data.ingest import ingest
from feedrank.data.log import read_events, read_items
from feedrank.data.readers import BadInputError, NoRowsError, read_mind

UTC = dt.timezone.utc


def _rows(table, request_id):
    return sorted(
        (r for r in table.to_pylist() if r["request_id"] == request_id), key=lambda r: r["position"]
    )


def test_mind_round_trip_into_valid_log(tmp_path, rfx):
    split = rfx.write_mind(tmp_path / "MINDsmall_train")
    result = read_mind(split)
    done = ingest(result, tmp_path / "log")
    assert done.ok and done.manifest["days"] == ["2019-11-14", "2019-11-15"]

    events = read_events(tmp_path / "log")
    # 2 + 3 + 1 impression tokens, plus U1's two history clicks (U2's history is empty).
    assert events.num_rows == 8
    first = _rows(events, "MINDsmall_train-1")
    assert [(r["item_id"], r["position"], r["clicked"]) for r in first] == [("N1", 0, True), ("N2", 1, False)]
    assert first[0]["ts"] == dt.datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC)
    assert first[1]["title"] == 'A "quoted title' and first[0]["category"] == "sports"
    assert first[0]["item_type"] == "football_nfl" and first[0]["publisher"] == "assets.msn.com"
    assert all(r["dwell_s"] == 0.0 and r["created_ts"] is None for r in events.to_pylist())
    # "1:05:00 PM" is 13:05.
    assert _rows(events, "MINDsmall_train-2")[2]["ts"] == dt.datetime(2019, 11, 15, 13, 5, tzinfo=UTC)


def test_mind_history_rows_precede_first_impression(tmp_path, rfx):
    events = read_mind(rfx.write_mind(tmp_path / "train")).events
    hist = _rows(events, "hist-train-U1")
    # U1's earliest impression (line 3) is at 2019-11-14 23:59:59; history "N3 N2", oldest first.
    assert [(r["item_id"], r["position"], r["clicked"]) for r in hist] == [("N3", 0, True), ("N2", 1, True)]
    assert [r["ts"].time() for r in hist] == [dt.time(23, 59, 57), dt.time(23, 59, 58)]
    assert not any(r["request_id"].startswith("hist-train-U2") for r in events.to_pylist())


def test_mind_split_prefix_and_items(tmp_path, rfx):
    result = read_mind(rfx.write_mind(tmp_path / "x"), split="dev")
    assert set(pc.unique(result.events["request_id"]).to_pylist()) == {"dev-1", "dev-2", "dev-3", "hist-dev-U1"}
    ingest(result, tmp_path / "log")
    items = {r["item_id"]: r for r in read_items(tmp_path / "log").to_pylist()}
    assert items["N3"]["publisher"] is None and items["N3"]["category"] == "finance"


@pytest.mark.parametrize(
    "line, message",
    [
        ("2\tU2\t11/15/2019 1:05:00 PM\tN1-1", "expected 5 .* fields, found: 4$"),
        ("2\tU2\t11/15/2019 1:05:00 PM\t\tN2-0 N12-x", "N12-x"),
        ("2\tU2\t2019-11-15 13:05\t\tN2-0", "time not in MIND format"),
    ],
)
def test_mind_bad_line_names_file_and_line(tmp_path, rfx, line, message):
    behaviors = [rfx.MIND_BEHAVIORS[0], line, rfx.MIND_BEHAVIORS[2]]
    with pytest.raises(BadInputError, match=message) as exc:
        read_mind(rfx.write_mind(tmp_path / "s", behaviors=behaviors))
    assert str(exc.value).startswith(f"{tmp_path / 's' / 'behaviors.tsv'}:2:")
    assert exc.value.line == 2


def test_mind_news_ids_missing_from_news_tsv_are_kept_without_metadata(tmp_path, rfx):
    # Real MIND subsets name news that news.tsv lacks, in impressions (N9) and histories (N8).
    behaviors = [rfx.MIND_BEHAVIORS[0], "2\tU2\t11/15/2019 1:05:00 PM\tN8\tN9-1 N1-0", rfx.MIND_BEHAVIORS[2]]
    result = read_mind(rfx.write_mind(tmp_path / "s", behaviors=behaviors))
    assert result.skipped_rows == 0 and {"N8", "N9"} <= set(result.events["item_id"].to_pylist())
    done = ingest(result, tmp_path / "log")
    assert done.ok
    assert done.run["items_without_metadata"] == 2 and done.run["items_without_metadata_examples"] == ["N8", "N9"]
    assert done.run["rows_without_item_metadata"] == 2
    items = {r["item_id"]: r for r in read_items(tmp_path / "log").to_pylist()}
    assert items["N9"]["category"] is None and items["N9"]["title"] is None and items["N1"]["category"] == "sports"
    clicked = _rows(read_events(tmp_path / "log"), "s-2")[0]
    assert (clicked["item_id"], clicked["clicked"], clicked["category"]) == ("N9", True, None)


def test_mind_skip_bad_rows_counts_and_drops_whole_lines(tmp_path, rfx):
    behaviors = [rfx.MIND_BEHAVIORS[0], "2\tU2\t11/15/2019 1:05:00 PM\t\tN2-0 N12-x", rfx.MIND_BEHAVIORS[2], "4\tU3\tnot a time\t\tN1-0"]
    result = read_mind(rfx.write_mind(tmp_path / "s", behaviors=behaviors), skip_bad_rows=True)
    assert result.skipped_rows == 2
    assert "behaviors.tsv:2" in result.skip_examples[0] or "behaviors.tsv:2" in result.skip_examples[1]
    assert set(pc.unique(result.events["user_id"]).to_pylist()) == {"U1"}  # no half of line 2 kept
    done = ingest(result, tmp_path / "log")
    assert done.run["skipped_rows"] == 2 and done.run["rows_written"] == 5


def test_mind_empty_and_missing_files(tmp_path, rfx):
    split = rfx.write_mind(tmp_path / "s")
    (split / "behaviors.tsv").write_text("")
    with pytest.raises(NoRowsError, match="behaviors.tsv: no rows"):
        read_mind(split)
    (split / "news.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"news\.tsv: file not found \(expected MIND news.tsv"):
        read_mind(split)
