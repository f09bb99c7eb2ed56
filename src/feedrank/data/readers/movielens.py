"""MovieLens reader for three layouts, detected from the files a directory holds.

- ``100k`` (``u.data`` tab-separated ``user item rating unix_ts``; ``u.item`` pipe-separated,
  latin-1: id, title, release date, video release date, IMDb url, 19 genre flags; ``u.user``
  pipe-separated ``id|age|gender|occupation|zip``),
- ``1m`` (``ratings.dat`` ``user::movie::rating::unix_ts``; ``movies.dat`` ``id::title::A|B``,
  latin-1; ``users.dat`` ``id::gender::age_code::occupation::zip``),
- ``recbole`` atomic files (``<name>.inter`` with a typed header such as
  ``user_id:token  item_id:token  rating:float  timestamp:float``, and ``<name>.item`` /
  ``<name>.user`` when present); columns are found by header name, not position.

Mapping choices: every rating is one ``clicked=True`` row with ``rating`` kept. MovieLens has no
feed requests, so ``request_id = "<user>@<unix_ts>"``: the ratings a user submitted in the same
second form one "page" (``position`` 0 for all). ``item_type`` = ``"movie"``; ``category`` = the
first listed genre (the 100K flags in their documented order); ``publisher`` null. ``created_ts``
is left null on purpose: the release date is not when the movie entered MovieLens, and ratings do
precede release dates in the data, which the time-travel rule would wrongly refuse. ``age_bucket``
uses the MovieLens-1M bins for every layout (``<18``, ``18-24``, ``25-34``, ``35-44``, ``45-49``,
``50-55``, ``56+``), so 100K ages and 1M age codes land in the same buckets; ``country`` is null
(zip codes are mostly, not only, US).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.data.readers.common import (
    ReadResult,
    NoRowsError,
    RowErrors,
    flag_unknown,
    parse_float,
    parse_int,
    read_lines,
    require_file,
    split_fields,
    unix_seconds_to_ts,
)

GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
AGE_EDGES = [18, 25, 35, 45, 50, 56]
AGE_BUCKETS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]

LAYOUTS = {
    "100k": "u.data, u.item, u.user",
    "1m": "ratings.dat, movies.dat, users.dat",
    "recbole": "<name>.inter (+ <name>.item, <name>.user)",
}


def detect_layout(root: Path) -> str:
    """Which MovieLens layout ``root`` holds: ``100k``, ``1m`` or ``recbole``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected a MovieLens folder: {_expected()})")
    if (root / "u.data").is_file():
        return "100k"
    if (root / "ratings.dat").is_file():
        return "1m"
    if any(root.glob("*.inter")):
        return "recbole"
    raise FileNotFoundError(f"{root}: no MovieLens ratings file found (expected one of: {_expected()})")


def _expected() -> str:
    return "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())


def read_movielens(path: str | Path, skip_bad_rows: bool = False) -> ReadResult:
    """Read a MovieLens 100K, 1M or RecBole-atomic directory (layout detected)."""
    root = Path(path)
    layout = detect_layout(root)
    reader = {"100k": _read_100k, "1m": _read_1m, "recbole": _read_recbole}[layout]
    ratings, items, users, errors = reader(root, skip_bad_rows)
    main = errors[0]
    flag_unknown(ratings["item_id"], items["item_id"], ratings["_line"], main, "movie id (not in the item file)")
    ratings = ratings.filter(main.keep(ratings["_line"]))
    events = pa.table(
        {
            "user_id": ratings["user_id"],
            "item_id": ratings["item_id"],
            "ts": ratings["ts"],
            "request_id": pc.binary_join_element_wise(
                ratings["user_id"], pc.cast(pc.divide(pc.cast(ratings["ts"], pa.int64()), 1_000_000), pa.string()), "@"
            ),
            "clicked": pa.array(np.ones(ratings.num_rows, dtype=bool)),
            "rating": ratings["rating"],
        }
    )
    return ReadResult(
        events=events,
        items=items,
        users=users,
        source=f"movielens-{layout}:{root}",
        skipped_rows=sum(e.count for e in errors),
        skip_examples=[x for e in errors for x in e.examples],
    )


def age_bucket(ages: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Age in years (or a MovieLens-1M age code, which is a bin's lower edge) to its bucket label."""
    values = pc.fill_null(ages, -1).to_numpy()
    labels = np.asarray(AGE_BUCKETS, dtype=object)[np.digitize(values, AGE_EDGES)]
    return pa.array(labels, pa.string(), mask=pc.is_null(ages).to_numpy(zero_copy_only=False))


def _ratings(t: pa.Table, user: str, item: str, rating: str, ts: str, errors: RowErrors) -> pa.Table:
    """The common ratings table: user, item, rating (float), ts (UTC), _line."""
    lines = t["_line"]
    return pa.table(
        {
            "user_id": pc.utf8_trim_whitespace(t[user]),
            "item_id": pc.utf8_trim_whitespace(t[item]),
            "rating": parse_float(t[rating], lines, errors, "rating"),
            "ts": unix_seconds_to_ts(parse_float(t[ts], lines, errors, "timestamp")),
            "_line": lines,
        }
    )


def _read_100k(root: Path, skip: bool):
    data_path = root / "u.data"
    errors = RowErrors(data_path, skip)
    data = split_fields(*read_lines(data_path), "\t", ["user", "item", "rating", "ts"], errors)
    ratings = _ratings(data, "user", "item", "rating", "ts", errors)

    item_path = require_file(root / "u.item", "MovieLens 100K u.item: id|title|release|video|url|19 genre flags")
    item_errors = RowErrors(item_path, skip)
    names = ["item_id", "title", "release", "video_release", "url", *GENRES_100K]
    raw = split_fields(*read_lines(item_path, encoding="latin-1"), "|", names, item_errors)
    flags = np.stack(
        [parse_int(raw[g], raw["_line"], item_errors, f"genre flag {g!r}").fill_null(0).to_numpy() for g in GENRES_100K],
        axis=1,
    )
    first = np.argmax(flags == 1, axis=1)
    category = pa.array(np.asarray(GENRES_100K, dtype=object)[first], pa.string(), mask=~(flags == 1).any(axis=1))
    items = _items(raw["item_id"], raw["title"], category).filter(item_errors.keep(raw["_line"]))

    user_path = require_file(root / "u.user", "MovieLens 100K u.user: id|age|gender|occupation|zip")
    user_errors = RowErrors(user_path, skip)
    raw_users = split_fields(*read_lines(user_path), "|", ["user_id", "age", "gender", "occupation", "zip"], user_errors)
    users = _users(raw_users, user_errors)
    return ratings, items, users, [errors, item_errors, user_errors]


def _read_1m(root: Path, skip: bool):
    ratings_path = root / "ratings.dat"
    errors = RowErrors(ratings_path, skip)
    data = split_fields(*read_lines(ratings_path), "::", ["user", "item", "rating", "ts"], errors)
    ratings = _ratings(data, "user", "item", "rating", "ts", errors)

    movies_path = require_file(root / "movies.dat", "MovieLens 1M movies.dat: id::title::genre|genre")
    item_errors = RowErrors(movies_path, skip)
    raw = split_fields(*read_lines(movies_path, encoding="latin-1"), "::", ["item_id", "title", "genres"], item_errors)
    category = pc.list_element(pc.split_pattern(raw["genres"], "|"), 0)
    items = _items(raw["item_id"], raw["title"], pc.if_else(pc.equal(category, ""), None, category))

    users_path = require_file(root / "users.dat", "MovieLens 1M users.dat: id::gender::age::occupation::zip")
    user_errors = RowErrors(users_path, skip)
    raw_users = split_fields(*read_lines(users_path), "::", ["user_id", "gender", "age", "occupation", "zip"], user_errors)
    users = _users(raw_users, user_errors)
    return ratings, items, users, [errors, item_errors, user_errors]


def _read_recbole(root: Path, skip: bool):
    inter_path = sorted(root.glob("*.inter"))[0]
    stem = inter_path.with_suffix("")
    errors = RowErrors(inter_path, skip)
    data = _atomic(inter_path, errors, required=["user_id", "item_id", "rating", "timestamp"])
    ratings = _ratings(data, "user_id", "item_id", "rating", "timestamp", errors)
    all_errors = [errors]

    item_path = stem.with_suffix(".item")
    if item_path.is_file():
        item_errors = RowErrors(item_path, skip)
        raw = _atomic(item_path, item_errors, required=["item_id"])
        genre = next((g for g in ("genre", "class") if g in raw.column_names), None)
        category = pc.list_element(pc.split_pattern(raw[genre], " "), 0) if genre else pa.nulls(raw.num_rows, pa.string())
        title = raw["movie_title"] if "movie_title" in raw.column_names else pa.nulls(raw.num_rows, pa.string())
        items = _items(raw["item_id"], title, category)
        all_errors.append(item_errors)
    else:  # the catalogue is then exactly the rated items, without metadata
        items = pa.table({"item_id": pc.unique(ratings["item_id"])})

    users = None
    user_path = stem.with_suffix(".user")
    if user_path.is_file():
        user_errors = RowErrors(user_path, skip)
        users = _users(_atomic(user_path, user_errors, required=["user_id"]), user_errors)
        all_errors.append(user_errors)
    return ratings, items, users, all_errors


def _users(raw: pa.Table, errors: RowErrors) -> pa.Table:
    """user_id and age bucket (null without an age column) of the users file's good rows."""
    if "age" in raw.column_names:
        buckets = age_bucket(parse_int(raw["age"], raw["_line"], errors, "age"))
    else:
        buckets = pa.nulls(raw.num_rows, pa.string())
    return pa.table({"user_id": raw["user_id"], "age_bucket": buckets}).filter(errors.keep(raw["_line"]))


def _atomic(path: Path, errors: RowErrors, required: list[str]) -> pa.Table:
    """A RecBole atomic file: tab-separated, header ``name:type`` per column; columns by name."""
    lines, numbers = read_lines(path)
    header = [h.split(":")[0] for h in lines[0].as_py().split("\t")]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {missing}; found {header}")
    if len(lines) < 2:
        raise NoRowsError(f"{path}: no rows (only a header)")
    return split_fields(lines.slice(1), numbers[1:], "\t", header, errors)


def _items(item_id, title, category) -> pa.Table:
    return pa.table(
        {
            "item_id": pc.utf8_trim_whitespace(item_id),
            "item_type": pa.repeat(pa.scalar("movie"), len(item_id)),
            "title": title,
            "category": category,
        }
    )
