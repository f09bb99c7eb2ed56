"""Writers of tiny dataset fixtures in the real on-disk formats, for the reader and ingest tests.

Each function writes files under a directory and returns it; the contents are small enough that
every expected value in the tests can be computed by hand from the literals here.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MIND_NEWS = [
    "N1\tsports\tfootball_nfl\tBig game\tAbstract 1\thttps://assets.msn.com/labs/mind/AAA.html\t[]\t[]",
    'N2\tnews\tnewsus\tA "quoted title\tAbstract 2\thttps://assets.msn.com/labs/mind/BBB.html\t[]\t[]',
    "N3\tfinance\tmarkets\tStocks up\t\t\t[]\t[]",
]
MIND_BEHAVIORS = [
    "1\tU1\t11/15/2019 8:55:22 AM\tN3 N2\tN1-1 N2-0",
    "2\tU2\t11/15/2019 1:05:00 PM\t\tN2-0 N3-0 N1-1",
    "3\tU1\t11/14/2019 11:59:59 PM\tN3 N2\tN3-0",
]


def write_text(path: Path, lines: list[str], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def write_mind(root: Path, behaviors: list[str] = MIND_BEHAVIORS, news: list[str] = MIND_NEWS) -> Path:
    write_text(root / "news.tsv", news)
    write_text(root / "behaviors.tsv", behaviors)
    return root


ML100K_DATA = ["1\t10\t5\t881250949", "1\t20\t3\t881250949", "2\t10\t4\t891717742"]
ML100K_ITEM = [
    "10|Toy Story (1995)|01-Jan-1995||http://imdb|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "20|Café Society (1995)|01-Jan-1995||http://imdb|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0",
]
ML100K_USER = ["1|24|M|technician|85711", "2|53|F|other|94043"]

ML1M_RATINGS = ["1::1193::5::978300760", "1::661::3::978302109", "2::1193::4::978298413"]
ML1M_MOVIES = ["1193::One Flew Over the Cuckoo's Nest (1975)::Drama", "661::James and the Giant Peach (1996)::Animation|Children's|Musical"]
ML1M_USERS = ["1::F::1::10::48067", "2::M::56::16::70072"]

RECBOLE_INTER = [
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "196\t242\t3\t881250949",
    "186\t302\t3.5\t891717742",
]
RECBOLE_ITEM = [
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
    "242\tKolya\t1996\tComedy",
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller",
]
RECBOLE_USER = [
    "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
    "196\t49\tM\twriter\t55105",
    "186\t39\tF\texecutive\t00000",
]


def write_ml100k(root: Path, data: list[str] = ML100K_DATA) -> Path:
    write_text(root / "u.data", data)
    write_text(root / "u.item", ML100K_ITEM, encoding="latin-1")
    write_text(root / "u.user", ML100K_USER)
    return root


def write_ml1m(root: Path, ratings: list[str] = ML1M_RATINGS) -> Path:
    write_text(root / "ratings.dat", ratings)
    write_text(root / "movies.dat", ML1M_MOVIES, encoding="latin-1")
    write_text(root / "users.dat", ML1M_USERS)
    return root


def write_recbole(root: Path, inter: list[str] = RECBOLE_INTER, name: str = "ml-100k") -> Path:
    write_text(root / f"{name}.inter", inter)
    write_text(root / f"{name}.item", RECBOLE_ITEM)
    write_text(root / f"{name}.user", RECBOLE_USER)
    return root


def _t(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s)


def ebnerd_behaviors(**overrides) -> pa.Table:
    """Two impressions of EB-NeRD ``behaviors.parquet`` with the real column names and types."""
    cols = {
        "impression_id": pa.array([101, 102], pa.uint32()),
        "article_id": pa.array([None, 7], pa.int32()),
        "impression_time": pa.array([_t("2023-05-24 07:47:53"), _t("2023-05-25 10:00:00")], pa.timestamp("us")),
        "read_time": pa.array([13.0, 30.0], pa.float32()),
        "scroll_percentage": pa.array([None, 80.0], pa.float32()),
        "device_type": pa.array([2, 1], pa.int8()),
        "article_ids_inview": pa.array([[1, 2, 3], [3, 1]], pa.list_(pa.int32())),
        "article_ids_clicked": pa.array([[2], []], pa.list_(pa.int32())),
        "user_id": pa.array([22779, 150224], pa.uint32()),
        "is_sso_user": pa.array([False, True]),
        "gender": pa.array([None, 1], pa.int8()),
        "postcode": pa.array([None, 2], pa.int8()),
        "age": pa.array([50, None], pa.int8()),
        "is_subscriber": pa.array([False, True]),
        "session_id": pa.array([21, 22], pa.uint32()),
        "next_read_time": pa.array([25.0, None], pa.float32()),
        "next_scroll_percentage": pa.array([100.0, None], pa.float32()),
    }
    cols.update(overrides)
    return pa.table(cols)


def ebnerd_history() -> pa.Table:
    ts = pa.list_(pa.timestamp("us"))
    return pa.table(
        {
            "user_id": pa.array([22779], pa.uint32()),
            "impression_time_fixed": pa.array([[_t("2023-05-01 06:00:00"), _t("2023-05-02 09:30:00")]], ts),
            "scroll_percentage_fixed": pa.array([[100.0, None]], pa.list_(pa.float32())),
            "article_id_fixed": pa.array([[1, 3]], pa.list_(pa.int32())),
            "read_time_fixed": pa.array([[12.0, 40.0]], pa.list_(pa.float32())),
        }
    )


def ebnerd_articles(published: list[str] | None = None) -> pa.Table:
    published = published or ["2023-04-30 00:00:00", "2023-05-20 00:00:00", "2023-04-01 00:00:00", "2023-05-01 00:00:00"]
    return pa.table(
        {
            "article_id": pa.array([1, 2, 3, 7], pa.int32()),
            "title": ["Et", "To", "Tre", "Syv"],
            "subtitle": ["", "", "", ""],
            "published_time": pa.array([_t(p) for p in published], pa.timestamp("us")),
            "article_type": ["article_default", "article_default", "video", "article_default"],
            "category": pa.array([142, 118, 142, 118], pa.int16()),
            "category_str": ["sport", "nyheder", "sport", "nyheder"],
        }
    )


def write_ebnerd(root: Path, behaviors: pa.Table | None = None, articles_in_parent: bool = True) -> Path:
    """An EB-NeRD bundle: ``root/articles.parquet`` and ``root/train/{behaviors,history}.parquet``."""
    split = root / "train"
    split.mkdir(parents=True, exist_ok=True)
    pq.write_table(behaviors if behaviors is not None else ebnerd_behaviors(), split / "behaviors.parquet")
    pq.write_table(ebnerd_history(), split / "history.parquet")
    pq.write_table(ebnerd_articles(), (root if articles_in_parent else split) / "articles.parquet")
    return split


def write_world_as_mind(log: Path, root: Path, split_day: dt.date, abstract_words: int = 0, seed: int = 0) -> Path:
    """A simulated world's log (``feedrank simulate``) as two MIND split folders under ``root``:
    ``MINDsmall_train`` (days before ``split_day``) and ``MINDsmall_dev`` (from it). ``news.tsv``
    has the world's titles, categories and subtypes, publishers as url hosts and no creation times;
    with ``abstract_words`` each item also gets an abstract of that many words drawn, like its
    title, from its own topic mix (``feedrank.data.world.world.topic_text``, seeded), else none.
    Impression lines without a click are dropped (MIND's have one); no pre-window histories."""
    import numpy as np

    from feedrank.data.log import read_events
    from feedrank.data.world.world import load_world, topic_text

    events = read_events(log).to_pandas()
    items = events.drop_duplicates("item_id", keep="last")
    abstracts = [""] * len(items)
    if abstract_words:
        world = load_world(log)
        text = topic_text(np.random.default_rng(seed), world.item_topics, world.topic_names, abstract_words)
        abstracts = text.take(pa.array(world.item_index(items["item_id"].tolist()))).to_pylist()
    news = [f"{r.item_id}\t{r.category}\t{r.item_type}\t{r.title}\t{a}\thttps://{r.publisher}.example.com/{r.item_id}\t[]\t[]"
            for r, a in zip(items.itertuples(), abstracts)]  # fmt: skip
    for name, part in (("MINDsmall_train", events[events.ts.dt.date < split_day]), ("MINDsmall_dev", events[events.ts.dt.date >= split_day])):
        lines = []
        for (request, user), g in part.groupby(["request_id", "user_id"], sort=False):
            if not g.clicked.any():
                continue  # MIND impression lines have a click
            g = g.sort_values("position")
            tokens = " ".join(f"{i}-{int(c)}" for i, c in zip(g.item_id, g.clicked))
            lines.append(f"{len(lines) + 1}\t{user}\t{g.ts.iloc[0]:%m/%d/%Y %I:%M:%S %p}\t\t{tokens}")
        write_mind(root / name, behaviors=lines, news=news)
    return root
