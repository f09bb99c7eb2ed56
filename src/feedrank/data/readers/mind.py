"""MIND (Microsoft News Dataset) reader: ``behaviors.tsv`` + ``news.tsv`` of one split directory.

``behaviors.tsv``: ``impression_id \\t user_id \\t time \\t history \\t impressions`` where time is
``11/15/2019 8:55:22 AM`` (read as UTC: MIND documents no zone), history is space-separated news
ids (possibly empty) and impressions are ``N123-1 N456-0`` tokens (1 = clicked).
``news.tsv``: ``news_id \\t category \\t subcategory \\t title \\t abstract \\t url \\t
title_entities \\t abstract_entities``.

Mapping choices (MIND has no publisher, item type, creation time, dwell or user metadata):

- Each impression token is one row: ``request_id = "<split>-<impression_id>"`` (the split defaults
  to the directory name, so train and dev, whose impression ids both start at 1, never collide;
  ``feedrank.data.readers.read_many`` names folders that share a name by their distinct path
  suffixes, ``a/train`` and ``b/train``),
  ``position`` = index of the token in the impression list, ``clicked`` from the suffix,
  ``dwell_s = 0``.
- Items: ``title`` and ``abstract`` as written (an empty abstract, common in MIND, is null; one
  longer than ``feedrank.data.schema.MAX_ABSTRACT_CHARS`` is a bad line), ``category`` = MIND category (``sports``), ``item_type`` = MIND subcategory
  (``football_nfl``): the coarse topic is what diversity and category features want, and the
  subcategory is kept in the only other free categorical slot. ``publisher`` = host of the url
  (null when the url is empty); ``created_ts`` null (unknown, so no time-travel check applies).
- History: the clicks a user made before the log window. They are emitted as clicked rows with
  ``request_id = "hist-<split>-<user>"`` and ``position`` = index in the history, timestamped one
  second apart and ending one second before the user's first impression in this split (MIND gives
  their order, oldest first, but not their times). Point-in-time features therefore see them as
  the user's past and never as future information. The history is taken from the user's earliest
  impression line; MIND repeats the same pre-window history on every line of a user.
- News ids in impressions or histories that ``news.tsv`` lacks are kept: real MIND subsets and
  partial dumps have them. Those items have no metadata (null category, title, publisher); ingest
  adds them to the catalogue as such and counts them in its manifest (``items_without_metadata``).
- The MIND test split (impressions without ``-0``/``-1`` labels) is not supported: its tokens are
  reported as bad impression tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.data.readers.common import (
    ReadResult,
    RowErrors,
    abstract_column,
    positions,
    prefixed,
    read_lines,
    require_file,
    split_fields,
)

BEHAVIOR_FIELDS = ["impression_id", "user_id", "time", "history", "impressions"]
NEWS_FIELDS = ["news_id", "category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities"]
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
_TOKEN_RE = r"^(?P<item>[^\s-][^\s]*)-(?P<label>[01])$"
_HOST_RE = r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?P<host>[^/:?#]+)"


def read_mind(path: str | Path, split: str | None = None, skip_bad_rows: bool = False) -> ReadResult:
    """Read a MIND split directory (holding ``behaviors.tsv`` and ``news.tsv``).

    ``split`` prefixes request ids (default: the directory name). Bad lines raise
    ``BadInputError`` naming ``file:line``, or are skipped and counted with ``skip_bad_rows``.
    """
    root = Path(path)
    behaviors_path = require_file(root / "behaviors.tsv", f"MIND behaviors.tsv: {', '.join(BEHAVIOR_FIELDS)}")
    news_path = require_file(root / "news.tsv", f"MIND news.tsv: {', '.join(NEWS_FIELDS)}")
    split = split or root.resolve().name

    news_errors = RowErrors(news_path, skip_bad_rows)
    items = _read_news(news_path, news_errors)
    errors = RowErrors(behaviors_path, skip_bad_rows)
    b = split_fields(*read_lines(behaviors_path), "\t", BEHAVIOR_FIELDS, errors)

    ts = pc.assume_timezone(pc.strptime(b["time"], format=TIME_FORMAT, unit="us", error_is_null=True), "UTC")
    bad_ts = pc.is_null(ts).to_numpy(zero_copy_only=False)
    if bad_ts.any():
        errors.flag(b["_line"].to_numpy()[bad_ts], f"time not in MIND format {TIME_FORMAT!r}", b["time"].filter(pa.array(bad_ts)))
    b = b.append_column("ts", ts)
    for name in ("impression_id", "user_id"):
        empty = pc.equal(pc.utf8_length(b[name]), 0).to_numpy(zero_copy_only=False)
        if empty.any():
            errors.flag(b["_line"].to_numpy()[empty], f"empty {name}")

    shown = _impressions(b, split, errors)
    # History comes from each user's earliest line that is still good, so a skipped bad line
    # does not take the user's history with it.
    history = _history(b.filter(errors.keep(b["_line"])), split, errors)

    events = pa.concat_tables([shown, history])
    events = events.filter(errors.keep(events["_line"])).drop_columns(["_line"])
    return ReadResult(
        events=events,
        items=items,
        users=None,
        source=f"mind:{root}",
        skipped_rows=errors.count + news_errors.count,
        skip_examples=news_errors.examples + errors.examples,
    )


def _read_news(path: Path, errors: RowErrors) -> pa.Table:
    news = split_fields(*read_lines(path), "\t", NEWS_FIELDS, errors)
    host = pc.struct_field(pc.extract_regex(news["url"], _HOST_RE), "host")
    abstract = abstract_column(news["abstract"], news["_line"], errors)
    items = pa.table(
        {
            "item_id": news["news_id"],
            "publisher": host,
            "item_type": news["subcategory"],
            "title": news["title"],
            "abstract": abstract,
            "category": news["category"],
        }
    )
    return items.filter(errors.keep(news["_line"]))


def _impressions(b: pa.Table, split: str, errors: RowErrors) -> pa.Table:
    """One row per impression token, with its line, position and click label."""
    lists = pc.split_pattern(b["impressions"].combine_chunks(), " ")
    parents, pos = positions(lists)
    tokens = lists.flatten()
    parsed = pc.extract_regex(tokens, _TOKEN_RE)
    lines = b["_line"].to_numpy()[parents]
    bad = pc.is_null(parsed).to_numpy(zero_copy_only=False)
    if bad.any():
        errors.flag(lines[bad], "bad impression token (expected <news_id>-0 or <news_id>-1)", tokens.filter(pa.array(bad)))
    idx = pa.array(parents)
    return pa.table(
        {
            "user_id": b["user_id"].take(idx),
            "item_id": pc.struct_field(parsed, "item"),
            "ts": b["ts"].take(idx),
            "request_id": prefixed(split, b["impression_id"].take(idx)),
            "position": pa.array(pos, pa.int32()),
            "clicked": pc.equal(pc.struct_field(parsed, "label"), "1"),
            "_line": pa.array(lines),
        }
    )


def _history(b: pa.Table, split: str, errors: RowErrors) -> pa.Table:
    """Pre-window clicks, from each user's earliest impression line, placed just before it."""
    valid = b.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("_line", "ascending")])
    users = pc.dictionary_encode(valid["user_id"]).combine_chunks().indices.to_numpy()
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    firsts = valid.filter(pa.array(first))

    stripped = pc.utf8_trim(firsts["history"].combine_chunks(), characters=" ")
    lists = pc.split_pattern(stripped, " ")
    lists = pc.if_else(pc.equal(stripped, ""), pa.scalar([], lists.type), lists)
    parents, pos = positions(lists)
    items = lists.flatten()
    empty = pc.equal(items, "").to_numpy(zero_copy_only=False)  # two spaces in a row
    lines = firsts["_line"].to_numpy()[parents]
    if empty.any():
        errors.flag(lines[empty], "empty news id in history (double space)")
    lengths = pc.list_value_length(lists).to_numpy()[parents]
    first_ts = pc.cast(firsts["ts"], pa.int64()).to_numpy()[parents]
    ts = first_ts - (lengths - pos) * 1_000_000
    idx = pa.array(parents)
    user = firsts["user_id"].take(idx)
    return pa.table(
        {
            "user_id": user,
            "item_id": items,
            "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "request_id": prefixed(f"hist-{split}", user),
            "position": pa.array(pos, pa.int32()),
            "clicked": pa.array(np.ones(len(pos), dtype=bool)),
            "_line": pa.array(lines),
        }
    )
