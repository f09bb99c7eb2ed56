"""MovieLens reader: 100K, 1M and RecBole layouts (autodetected) -> canonical log; bad input."""

import datetime as dt

import pyarrow as pa
import pytest

from feedrank.data.ingest import ingest
from feedrank.data.log import read_events, read_users
from feedrank.data.readers import BadInputError, NoRowsError, read_movielens
from feedrank.data.readers.movielens import age_bucket

UTC = dt.timezone.utc


def _by_key(table):
    return {(r["user_id"], r["item_id"]): r for r in table.to_pylist()}


def test_ml100k_round_trip(tmp_path, rfx):
    result = read_movielens(rfx.write_ml100k(tmp_path / "ml-100k"))
    assert result.source.startswith("movielens-100k:")
    done = ingest(result, tmp_path / "log")
    assert done.ok
    rows = _by_key(read_events(tmp_path / "log"))
    assert len(rows) == 3
    r = rows[("1", "20")]
    assert r["rating"] == 3.0 and r["clicked"] is True and r["position"] == 0
    assert r["ts"] == dt.datetime.fromtimestamp(881250949, UTC)
    assert r["request_id"] == "1@881250949" == rows[("1", "10")]["request_id"]  # same second, same page
    assert r["title"] == "Café Society (1995)"  # latin-1 decoded
    assert r["category"] == "Drama" and rows[("1", "10")]["category"] == "Animation"  # first genre flag
    assert r["age_bucket"] == "18-24" and rows[("2", "10")]["age_bucket"] == "50-55"
    assert r["created_ts"] is None and r["item_type"] == "movie"
    assert read_users(tmp_path / "log").num_rows == 2


def test_ml1m_round_trip(tmp_path, rfx):
    done = ingest(read_movielens(rfx.write_ml1m(tmp_path / "ml-1m")), tmp_path / "log")
    assert done.ok and done.run["rows_written"] == 3
    rows = _by_key(read_events(tmp_path / "log"))
    assert rows[("1", "661")]["category"] == "Animation"  # "Animation|Children's|Musical"
    assert rows[("1", "661")]["ts"] == dt.datetime(2000, 12, 31, 22, 35, 9, tzinfo=UTC)
    assert rows[("2", "1193")]["rating"] == 4.0
    assert rows[("1", "1193")]["age_bucket"] == "<18" and rows[("2", "1193")]["age_bucket"] == "56+"


def test_recbole_round_trip(tmp_path, rfx):
    result = read_movielens(rfx.write_recbole(tmp_path / "rb"))
    assert result.source.startswith("movielens-recbole:")
    ingest(result, tmp_path / "log")
    rows = _by_key(read_events(tmp_path / "log"))
    assert rows[("186", "302")]["rating"] == 3.5
    assert rows[("186", "302")]["category"] == "Crime" and rows[("196", "242")]["title"] == "Kolya"
    assert rows[("196", "242")]["age_bucket"] == "45-49"


def test_age_buckets():
    assert age_bucket(pa.array([7, 18, 24, 25, 49, 50, 56, 73, None])).to_pylist() == [
        "<18", "18-24", "18-24", "25-34", "45-49", "50-55", "56+", "56+", None,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad, message",
    [("1\t30\t4", "expected 4"), ("1\t10\tfive\t881250949", "rating is not a number: 'five'"), ("1\t99\t4\t881250949", "unknown movie id")],
)
def test_ml100k_bad_line(tmp_path, rfx, bad, message):
    data = [rfx.ML100K_DATA[0], rfx.ML100K_DATA[1], bad]
    with pytest.raises(BadInputError, match=message) as exc:
        read_movielens(rfx.write_ml100k(tmp_path / "d", data=data))
    assert str(exc.value).startswith(f"{tmp_path / 'd' / 'u.data'}:3:")


def test_ml1m_skip_bad_rows(tmp_path, rfx):
    ratings = [rfx.ML1M_RATINGS[0], "1::661::x::978302109", rfx.ML1M_RATINGS[2], "2::1193"]
    result = read_movielens(rfx.write_ml1m(tmp_path / "d", ratings=ratings), skip_bad_rows=True)
    assert result.skipped_rows == 2 and result.events.num_rows == 2
    assert any("ratings.dat:2" in e for e in result.skip_examples)


def test_recbole_header_only_and_missing_layout(tmp_path, rfx):
    with pytest.raises(NoRowsError, match="only a header"):
        read_movielens(rfx.write_recbole(tmp_path / "rb", inter=[rfx.RECBOLE_INTER[0]]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected one of: 100k: u.data"):
        read_movielens(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_movielens(tmp_path / "nope")


def test_ml100k_empty_ratings_and_missing_items(tmp_path, rfx):
    root = rfx.write_ml100k(tmp_path / "d")
    (root / "u.data").write_text("")
    with pytest.raises(NoRowsError, match="u.data: no rows"):
        read_movielens(root)
    rfx.write_ml100k(root)
    (root / "u.item").unlink()
    with pytest.raises(FileNotFoundError, match="u.item: file not found"):
        read_movielens(root)
