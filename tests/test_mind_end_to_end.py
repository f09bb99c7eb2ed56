"""MIND end to end through the command line: ingest the train and dev splits (real file format),
train the ranker with configs/mind.yaml, evaluate it with the MIND protocol.

MIND has no dwell, share, hide, item creation time or user attributes; the pipeline must run on
what it has (configs/mind.yaml documents the defaults). The fixture is a small generated MIND in
the real on-disk format, written with the reader tests' fixture writer: users prefer one category,
so the ranker has something to learn.
"""

import datetime as dt
import importlib.util
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from feedrank.cli import app

CATEGORIES = ("sports", "news", "finance", "lifestyle")


def _fixture_writers():
    path = Path(__file__).parent / "data" / "fixtures_readers.py"
    spec = importlib.util.spec_from_file_location("fixtures_readers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mind_split(rng: random.Random, days: list[int], users: int = 60, news: int = 40) -> tuple[list[str], list[str]]:
    """(behaviors lines, news lines): ``users`` users who each prefer one category and read three of
    its items before the window, two impression lines a day of 8 candidates, at least one click per
    line (as in MIND)."""
    items = [(f"N{i}", CATEGORIES[i % len(CATEGORIES)]) for i in range(news)]
    news_lines = [f"{n}\t{c}\t{c}_sub\tTitle {n}\tAbstract\thttps://www.msn.com/{c}/{n}\t[]\t[]" for n, c in items]
    lines = []
    for u in range(users):
        favourite = CATEGORIES[u % len(CATEGORIES)]
        history = " ".join([n for n, c in items if c == favourite][:3])
        for day in days:
            for hour in (9, 18):
                shown = rng.sample(items, 8)
                clicks = [rng.random() < (0.6 if c == favourite else 0.05) for _, c in shown]
                clicks[0] = clicks[0] or not any(clicks)
                tokens = " ".join(f"{n}-{int(k)}" for (n, _), k in zip(shown, clicks))
                time = dt.datetime(2019, 11, day, hour, u % 60)
                lines.append(f"{len(lines) + 1}\tU{u}\t{time:%m/%d/%Y %I:%M:%S %p}\t{history}\t{tokens}")
    return lines, news_lines


@pytest.fixture(scope="module")
def mind(tmp_path_factory):
    root = tmp_path_factory.mktemp("mind")
    writers, rng = _fixture_writers(), random.Random(0)
    behaviors, news = _mind_split(rng, [13, 14])
    writers.write_mind(root / "MINDsmall_train", behaviors=behaviors, news=news)
    behaviors, news = _mind_split(rng, [15])
    writers.write_mind(root / "MINDsmall_dev", behaviors=behaviors, news=news)
    return root


def test_ingest_train_and_evaluate_mind_with_the_shipped_config(mind):
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731

    result = run("ingest", "mind", mind / "MINDsmall_train", mind / "MINDsmall_dev", "--out", mind / "log")
    assert result.exit_code == 0, result.output

    result = run("train", "ranking", "--config", "configs/mind.yaml", "--log", mind / "log", "--out", mind / "run")
    assert result.exit_code == 0, result.output

    result = run("evaluate", "ranking", mind / "run" / "ranker")
    assert result.exit_code == 0, result.output
    for metric in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert metric in result.output, metric

    doc = json.loads((mind / "run" / "eval" / "metrics.json").read_text())
    holdout = doc["holdout"]
    # the dev day: 60 users x 2 impression lines x 8 candidates; the dev users' history rows are
    # not impressions and are left out
    assert holdout["requests"] == 120 and holdout["impressions"] == 960 and holdout["rows_excluded"] > 0
    assert holdout["requests_without_click"] == 0
    ranker = {k: v["value"] for k, v in doc["models"]["ranker"].items()}
    assert all(0.0 <= ranker[m] <= 1.0 for m in ("auc", "gauc", "mrr", "ndcg@5", "ndcg@10", "ece"))
