"""EB-NeRD (Ekstra Bladet News Recommendation Dataset) reader: one split's Parquet files.

A split directory (``train/``, ``validation/``) holds ``behaviors.parquet`` and ``history.parquet``;
``articles.parquet`` sits in the split directory or in its parent (the official zips put it in the
parent). Column names and types are those of the official release: ``behaviors`` has
``impression_id, user_id, impression_time, article_ids_inview (list), article_ids_clicked (list),
next_read_time, next_scroll_percentage, age, ...``; ``history`` has ``user_id`` and the parallel
lists ``impression_time_fixed, article_id_fixed, read_time_fixed, scroll_percentage_fixed``;
``articles`` has ``article_id, title, published_time, article_type, category_str, ...``.
Timestamps carry no zone in the files and are read as UTC.

Mapping choices:

- Each in-view article of an impression is one row: ``request_id`` = the impression id,
  ``position`` = its index in ``article_ids_inview`` (EB-NeRD shuffles that list, so this is not a
  screen position), ``clicked`` = it is in ``article_ids_clicked``.
- Dwell and scroll: ``read_time``/``scroll_percentage`` of a behaviors row belong to the page the
  user was on (``article_id``), not to an in-view article; the time spent on the *clicked* article
  is ``next_read_time``/``next_scroll_percentage``. Those go on the clicked row when the impression
  has exactly one click (which one a multi-click impression's values belong to is unknown, so those
  rows get ``dwell_s = 0`` and null scroll).
- History rows are the user's clicks in the 21 days before the split: ``clicked=True`` at their own
  timestamps, ``request_id = "hist-<user>"``, position = index in the history lists, dwell and
  scroll from ``read_time_fixed``/``scroll_percentage_fixed``.
- Items: ``publisher = "ekstrabladet.dk"`` (the dataset has one publisher), ``item_type`` =
  ``article_type`` (``article_default``, ``video``, ...), ``category`` = ``category_str``,
  ``created_ts`` = ``published_time``, ``abstract`` = ``subtitle`` (the lead paragraph) when
  ``articles.parquet`` has that column, else null.
- Users: ``age_bucket`` = EB-NeRD's 10-year bin written ``"50-59"``; ``country`` null.

Bad rows are named by file and 1-based row number (``behaviors.parquet row 17: ...``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedrank.data.readers.common import (
    NoRowsError,
    ReadResult,
    RowErrors,
    abstract_column,
    flag_unknown,
    positions,
    prefixed,
    require_file,
)

PUBLISHER = "ekstrabladet.dk"
BEHAVIOR_COLUMNS = [
    "impression_id", "user_id", "impression_time", "article_ids_inview", "article_ids_clicked",
    "next_read_time", "next_scroll_percentage", "age",
]  # fmt: skip
HISTORY_COLUMNS = ["user_id", "impression_time_fixed", "article_id_fixed", "read_time_fixed", "scroll_percentage_fixed"]
ARTICLE_COLUMNS = ["article_id", "title", "published_time", "article_type", "category_str"]
#: The article's lead paragraph, kept as the canonical ``abstract`` when the file has it.
ABSTRACT_COLUMN = "subtitle"


def read_ebnerd(path: str | Path, skip_bad_rows: bool = False) -> ReadResult:
    """Read one EB-NeRD split directory (see the module docstring for the layout and mapping)."""
    root = Path(path)
    behaviors_path = require_file(root / "behaviors.parquet", "EB-NeRD behaviors.parquet")
    history_path = require_file(root / "history.parquet", "EB-NeRD history.parquet")
    articles_path = root / "articles.parquet"
    if not articles_path.is_file():
        articles_path = require_file(root.parent / "articles.parquet", f"EB-NeRD articles.parquet in {root} or {root.parent}")

    article_errors = RowErrors(articles_path, skip_bad_rows, unit="row")
    items = _articles(articles_path, article_errors)
    unknown = f"article id (not in {articles_path.name})"
    errors = RowErrors(behaviors_path, skip_bad_rows, unit="row")
    behaviors = _read(behaviors_path, BEHAVIOR_COLUMNS)
    shown = _impressions(behaviors, errors)
    flag_unknown(shown["item_id"], items["item_id"], shown["_row"], errors, unknown)
    shown = shown.filter(errors.keep(shown["_row"])).drop_columns(["_row"])

    history_errors = RowErrors(history_path, skip_bad_rows, unit="row")
    history = _history(_read(history_path, HISTORY_COLUMNS), history_errors)
    flag_unknown(history["item_id"], items["item_id"], history["_row"], history_errors, unknown)
    history = history.filter(history_errors.keep(history["_row"])).drop_columns(["_row"])

    kept = behaviors.filter(errors.keep(behaviors["_row"]))
    users = pa.table({"user_id": pc.cast(kept["user_id"], pa.string()), "age_bucket": _age_bucket(kept["age"])})
    return ReadResult(
        events=pa.concat_tables([shown, history], promote_options="permissive"),
        items=items,
        users=users,
        source=f"ebnerd:{root}",
        skipped_rows=errors.count + history_errors.count + article_errors.count,
        skip_examples=article_errors.examples + errors.examples + history_errors.examples,
    )


def _read(path: Path, columns: list[str]) -> pa.Table:
    """The needed columns of a Parquet file, with a 1-based ``_row``; clear errors if they lack."""
    present = pq.read_schema(path).names
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {present}")
    table = pq.read_table(path, columns=columns)
    if table.num_rows == 0:
        raise NoRowsError(f"{path}: no rows")
    return table.append_column("_row", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def _flag_nulls(table: pa.Table, columns: list[str], errors: RowErrors) -> None:
    for name in columns:
        null = pc.is_null(table[name]).to_numpy(zero_copy_only=False)
        if null.any():
            errors.flag(table["_row"].to_numpy()[null], f"null {name}")


def _impressions(b: pa.Table, errors: RowErrors) -> pa.Table:
    _flag_nulls(b, ["impression_id", "user_id", "impression_time"], errors)
    inview = b["article_ids_inview"].combine_chunks()
    parents, pos = positions(inview)
    idx = pa.array(parents)
    rows = b["_row"].take(idx)

    # clicked = (row, article) also appears among that row's clicked ids: a hash join, no loop.
    clicked_lists = b["article_ids_clicked"].combine_chunks()
    click_parents, _ = positions(clicked_lists)
    n_clicks = pc.fill_null(pc.list_value_length(clicked_lists), 0).to_numpy()
    clicks = pa.table({"_p": pa.array(click_parents), "_a": clicked_lists.flatten(), "_c": pa.repeat(True, len(click_parents))})
    shown = pa.table({"_p": idx, "_a": inview.flatten(), "_i": pa.array(np.arange(len(parents)))})
    joined = shown.join(clicks, keys=["_p", "_a"], join_type="left outer").sort_by("_i")
    clicked = pc.fill_null(joined["_c"], False)

    single = pa.array(n_clicks[parents] == 1)
    with_dwell = pc.and_(clicked, single)
    dwell = pc.if_else(with_dwell, pc.fill_null(b["next_read_time"].take(idx), 0.0), 0.0)
    scroll = pc.if_else(with_dwell, b["next_scroll_percentage"].take(idx), None)
    return pa.table(
        {
            "user_id": pc.cast(b["user_id"].take(idx), pa.string()),
            "item_id": pc.cast(inview.flatten(), pa.string()),
            "ts": _utc(b["impression_time"].take(idx)),
            "request_id": pc.cast(b["impression_id"].take(idx), pa.string()),
            "position": pa.array(pos, pa.int32()),
            "clicked": clicked,
            "dwell_s": dwell,
            "scroll_pct": scroll,
            "_row": rows,
        }
    )


def _history(h: pa.Table, errors: RowErrors) -> pa.Table:
    _flag_nulls(h, ["user_id"], errors)
    lists = {c: h[c].combine_chunks() for c in HISTORY_COLUMNS[1:]}
    lengths = {c: pc.fill_null(pc.list_value_length(v), 0).to_numpy() for c, v in lists.items()}
    n = lengths["article_id_fixed"]
    for name, length in lengths.items():
        bad = length != n
        if bad.any():
            errors.flag(h["_row"].to_numpy()[bad], f"{name} has another length than article_id_fixed", length[bad])
    h = h.filter(errors.keep(h["_row"]))
    lists = {c: h[c].combine_chunks() for c in HISTORY_COLUMNS[1:]}
    parents, pos = positions(lists["article_id_fixed"])
    idx = pa.array(parents)
    ts = lists["impression_time_fixed"].flatten()
    bad_ts = pc.is_null(ts).to_numpy(zero_copy_only=False)
    if bad_ts.any():
        errors.flag(h["_row"].to_numpy()[parents][bad_ts], "null timestamp in impression_time_fixed")
    user = pc.cast(h["user_id"].take(idx), pa.string())
    return pa.table(
        {
            "user_id": user,
            "item_id": pc.cast(lists["article_id_fixed"].flatten(), pa.string()),
            "ts": _utc(ts),
            "request_id": prefixed("hist", user),
            "position": pa.array(pos, pa.int32()),
            "clicked": pa.repeat(True, len(parents)),
            "dwell_s": pc.fill_null(lists["read_time_fixed"].flatten(), 0.0),
            "scroll_pct": lists["scroll_percentage_fixed"].flatten(),
            "_row": h["_row"].take(idx),
        }
    )


def _articles(path: Path, errors: RowErrors) -> pa.Table:
    optional = [c for c in (ABSTRACT_COLUMN,) if c in pq.read_schema(path).names]
    a = _read(path, ARTICLE_COLUMNS + optional)
    abstract = abstract_column(a[ABSTRACT_COLUMN], a["_row"], errors, ABSTRACT_COLUMN) if optional else pa.nulls(a.num_rows, pa.string())
    items = pa.table(
        {
            "item_id": pc.cast(a["article_id"], pa.string()),
            "publisher": pa.repeat(PUBLISHER, a.num_rows),
            "item_type": a["article_type"],
            "created_ts": _utc(a["published_time"]),
            "title": a["title"],
            "abstract": abstract,
            "category": a["category_str"],
        }
    )
    return items.filter(errors.keep(a["_row"]))


def _utc(col):
    """Timestamps as UTC: the files store zone-less times, which we read as UTC."""
    return pc.assume_timezone(col, "UTC") if col.type.tz is None else col


def _age_bucket(age: pa.ChunkedArray) -> pa.Array:
    """EB-NeRD ages are 10-year bins given by their lower edge: 50 -> ``"50-59"``."""
    low = pc.cast(age, pa.int64())
    return pc.binary_join_element_wise(pc.cast(low, pa.string()), pc.cast(pc.add(low, 9), pa.string()), "-")
