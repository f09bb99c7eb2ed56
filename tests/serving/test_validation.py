"""The pure checks of the HTTP boundary: JSON depth without parsing, ids, the timestamp window, short messages."""

import datetime as dt
import json

import pytest

from feedrank.serving.config import RequestLimits, ServingConfig
from feedrank.serving.validation import EventContext, check_id, check_ts, json_depth, short

UTC = dt.timezone.utc


@pytest.mark.parametrize("doc", [
    [], {}, [{"a": 1}], [[[]]], {"a": {"b": [1, {"c": []}]}}, "[{", {"k": "[[[{{{"}, ["\\", "\\\"[", "]]]"],
    [{"user_id": "u\"[x", "item_id": "\\\\[{"}], [{"a": ["\u00e9[", "\"", "\\"]}],
])  # fmt: skip
def test_json_depth_matches_the_parsed_depth(doc):
    def depth(x) -> int:
        children = x.values() if isinstance(x, dict) else x if isinstance(x, list) else None
        return 0 if children is None else 1 + max(map(depth, children), default=0)

    assert json_depth(json.dumps(doc, ensure_ascii=False).encode()) == depth(doc)


def test_json_depth_of_text_and_scalars():
    assert json_depth(b"") == 0 and json_depth(b"17") == 0 and json_depth(b'"[[["') == 0
    assert json_depth(b"[" * 5000) == 5000  # no recursion, whatever the depth


@pytest.mark.parametrize("good", ["u17", "N55189", "ユーザー 1", "a" * 256, "user@example.com", "émile"])
def test_ids_accept_any_printable_text(good):
    assert check_id(good) == good


@pytest.mark.parametrize("bad, says", [
    ("", "blank"), ("  ", "blank"), ("a" * 257, "at most 256"), ("u\x00", "control"), ("u\r", "control"),
    ("u\n", "control"), ("u\t1", "control"), ("u\x7f", "control"), ("u\x85", "control"), ("u\u2029", "line separators"),
    (" u", "whitespace"), ("u\u00a0", "whitespace"),
])  # fmt: skip
def test_ids_refuse_blank_long_control_and_padded(bad, says):
    with pytest.raises(ValueError, match=says):
        check_id(bad)


def test_ts_window_is_relative_to_the_service_clock():
    now = dt.datetime(2024, 5, 1, 12, tzinfo=UTC)
    ctx = EventContext(now, RequestLimits(max_future_s=60, max_past_days=1))
    assert check_ts(now + dt.timedelta(seconds=60), ctx) == now + dt.timedelta(seconds=60)
    assert check_ts(dt.datetime(2024, 5, 1, 11), ctx) == dt.datetime(2024, 5, 1, 11, tzinfo=UTC)  # naive = UTC
    assert check_ts(dt.datetime(2024, 5, 1, 13, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))), ctx).tzinfo is UTC
    with pytest.raises(ValueError, match="61 s after server time"):
        check_ts(now + dt.timedelta(seconds=61), ctx)
    with pytest.raises(ValueError, match="before server time"):
        check_ts(now - dt.timedelta(days=1, seconds=1), ctx)
    with pytest.raises(ValueError, match="after server time"):  # not an OverflowError converting it to UTC
        check_ts(dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-5))), ctx)
    far = dt.datetime(3000, 1, 1, tzinfo=UTC)
    assert check_ts(far, None) == far  # without a context only the type rules apply


def test_short_caps_utf8_bytes():
    assert short("abc", 10) == "abc"
    assert len(short("x" * 1000, 50).encode()) <= 50
    assert len(short("é" * 1000, 51).encode()) <= 51 and short("é" * 1000, 51).endswith("…")


def test_limits_are_validated():
    for bad in (RequestLimits(max_dwell_s=float("inf")), RequestLimits(max_future_s=-1),
                RequestLimits(max_past_days=float("nan")), RequestLimits(max_json_depth=1)):  # fmt: skip
        with pytest.raises(ValueError):
            ServingConfig(limits=bad).validate()
