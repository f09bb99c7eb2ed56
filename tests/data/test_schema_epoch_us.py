"""to_epoch_us: the one datetime -> TS_TYPE integer conversion (serving, features, bundle)."""

import datetime as dt

import pyarrow as pa

from feedrank.data.schema import TS_TYPE, to_epoch_us

UTC = dt.timezone.utc


def test_hand_computed_values():
    assert to_epoch_us(dt.datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert to_epoch_us(dt.datetime(1970, 1, 2, 0, 0, 1, 5, tzinfo=UTC)) == 86_401_000_005
    assert to_epoch_us(dt.datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == -1


def test_offsets_are_honoured_and_naive_is_utc():
    plus2 = dt.datetime(2024, 1, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert to_epoch_us(plus2) == to_epoch_us(dt.datetime(2024, 1, 1, 12, 0, tzinfo=UTC)) == 1_704_110_400_000_000
    assert to_epoch_us(dt.datetime(2024, 1, 1, 12, 0)) == 1_704_110_400_000_000


def test_matches_what_a_ts_column_stores_to_the_microsecond():
    stamps = [dt.datetime(2024, 5, 17, 3, 4, 5, us, tzinfo=UTC) for us in (0, 1, 123_457, 999_999)]
    stamps.append(dt.datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC))  # floats lose microseconds here
    stored = pa.array(stamps, TS_TYPE).cast(pa.int64()).to_pylist()
    assert [to_epoch_us(t) for t in stamps] == stored
