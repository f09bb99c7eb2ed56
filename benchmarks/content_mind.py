"""Do abstracts help new items? ID-only vs titles vs titles + abstracts, on MIND's file format.

There is no real MIND data on this machine (its network reaches only PyPI, npm and Debian), so the
data is the synthetic world written in MIND's format (``tests/data/fixtures_readers.py``:
``write_world_as_mind``): ``behaviors.tsv`` + ``news.tsv`` with the world's titles, categories and
publisher urls, no creation times, and an abstract per item of ``--abstract-words`` words drawn,
like its title (6 words), from the item's own topic mix. The MIND reader ingests it, and each
variant trains once on the train days and is scored on the dev day (the last):

- ``ranker``: ``configs/mind.yaml``'s features and ``configs/ranking_demo.yaml``'s ranker without
  two-tower inputs; ID-only, ``title_tokens`` + ``item_id_dropout`` over titles, and the same over
  ``features.content_fields: [title, abstract]``, and over abstracts alone (a diagnostic: how much
  the abstract's words carry by themselves);
- ``two_tower``: ``configs/demo.yaml``'s retrieval model, ID-only, ``title_dim`` over titles, and
  over titles + abstracts (``--no-two-tower`` skips it).

Figures: AUC on every held-out impression and on those of *new* items (not in the training
vocabulary), with the world's oracle and each model's share of its lift over random (as
``benchmarks/content_tower.py``, whose helpers this reuses). For each content variant also the
*untrained* match on new items: the AUC of the cosine between the history's and the candidate's
mean word vectors, the words' starting vectors (``feedrank.features.text.title_word_vectors``) and
nothing learned: how much the words themselves say, against what training makes of them.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/content_mind.py            # 2,000 users, 800 items
    .venv/bin/python benchmarks/content_mind.py --users 5000 --items 2000 --out /tmp/content_mind

One seeded run per variant: a difference of a few thousandths is noise; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from content_tower import ID_DROPOUT, TITLE_DIM, figures, holdout, oracle_scores, print_table, score

from feedrank.config import load_yaml
from feedrank.data.ingest import ingest
from feedrank.data.log import list_days
from feedrank.data.readers import read_many
from feedrank.data.collate import pad_list
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.evaluate.metrics import auc
from feedrank.features.text import title_word_vectors
from feedrank.features.vocab import FIRST_ID, OOV, Vocabularies
from feedrank.train.ranking import load_ranking_config, train_ranking
from feedrank.train.retrieval import load_run_config, train_retrieval

ROOT = Path(__file__).resolve().parents[1]
#: (variant, content fields or None for ID-only)
VARIANTS = (("id_only", None), ("title", ["title"]), ("title+abstract", ["title", "abstract"]), ("abstract", ["abstract"]))


def mind_fixture(world_log: Path, out: Path, abstract_words: int) -> tuple[Path, str]:
    """The world's log as MIND files, ingested into ``out``; returns (log dir, split_at)."""
    spec = importlib.util.spec_from_file_location("fixtures_readers", ROOT / "tests/data/fixtures_readers.py")
    writers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writers)
    split_day = dt.date.fromisoformat(list_days(world_log)[-1])
    mind = writers.write_world_as_mind(world_log, out / "mind", split_day, abstract_words=abstract_words)
    ingest(read_many("mind", [mind / "MINDsmall_train", mind / "MINDsmall_dev"]), out / "log")
    return out / "log", f"{split_day.isoformat()}T00:00:00+00:00"


def untrained_match_auc(run: Path, dim: int = 32) -> float:
    """New-item AUC of cos(mean word vector of the history's items, of the candidate), with the words'
    starting vectors from the run's catalogue (nothing trained): the content signal itself."""
    tokens = pad_list(pq.read_table(run / "ranker" / "catalogue.parquet")["title_tokens"], "title_tokens")
    rows = holdout(run / "features")
    rows = rows.filter(pc.and_(pc.equal(rows["item_idx"], OOV), pc.invert(pc.starts_with(rows["request_id"], "hist-"))))
    words = title_word_vectors(tokens, Vocabularies.load(run / "features" / "vocab").n_tokens, dim)

    def bags(t: np.ndarray) -> np.ndarray:
        keep = t >= FIRST_ID
        return (words[t] * keep[..., None]).sum(1) / np.maximum(keep.sum(1, keepdims=True), 1)

    history = pad_list(rows["history"], "history")
    mask = (history > 0)[..., None]
    user = (bags(tokens)[history] * mask).sum(1) / np.maximum(mask.sum(1), 1)
    item = bags(pad_list(rows["item_tokens"], "item_tokens"))
    cosine = (user * item).sum(1) / (np.linalg.norm(user, axis=1) * np.linalg.norm(item, axis=1) + 1e-12)
    return auc(rows["clicked"].to_numpy(zero_copy_only=False), cosine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default=str(ROOT / "configs/world_demo.yaml"))
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--abstract-words", type=int, default=18)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed")
    parser.add_argument("--no-two-tower", action="store_true", help="rankers only")
    parser.add_argument("--out", default="/tmp/feedrank_content_mind")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()

    world = dataclasses.replace(load_yaml(WorldConfig, args.world), users=args.users, items=args.items, seed=args.seed)
    simulate(world, out / "world")
    log, split_at = mind_fixture(out / "world", out, args.abstract_words)
    mind = load_ranking_config(ROOT / "configs/mind.yaml")
    ranking = load_ranking_config(ROOT / "configs/ranking_demo.yaml")
    ranking = dataclasses.replace(ranking, features=dataclasses.replace(mind.features, split_at=split_at),
                                  labels=mind.labels, exclude_requests=mind.exclude_requests,
                                  train=dataclasses.replace(ranking.train, epochs=args.epochs, progress=False))  # fmt: skip
    retrieval = load_run_config(ROOT / "configs/demo.yaml")
    retrieval = dataclasses.replace(retrieval, features=ranking.features,
                                    train=dataclasses.replace(retrieval.train, epochs=args.epochs, progress=False))  # fmt: skip

    results: dict = {"world": {"users": world.users, "items": world.items, "days": world.days, "seed": world.seed},
                     "abstract_words": args.abstract_words, "models": {}}  # fmt: skip
    rows = oracle = None
    for variant, fields in VARIANTS:
        content = fields is not None
        features = dataclasses.replace(ranking.features, content_fields=fields or ["title"])
        rk = dataclasses.replace(ranking.ranker, title_tokens=content, history_match=content and ranking.ranker.history_match,
                                 item_id_dropout=ID_DROPOUT if content else 0.0)  # fmt: skip
        bundle = train_ranking(log, out / variant, dataclasses.replace(ranking, features=features, ranker=rk),
                               progress=False, evaluate=False)  # fmt: skip
        if rows is None:
            rows = holdout(out / variant / "features")
            rows = rows.filter(pc.invert(pc.starts_with(rows["request_id"], "hist-")))  # MIND history rows
            oracle = oracle_scores(out / "world", rows)
        results["models"][f"ranker/{variant}"] = figures(score(bundle, rows, rk.max_history_len), rows, oracle)
        if content:
            results.setdefault("untrained_match_new_auc", {})[variant] = untrained_match_auc(out / variant)
        if not args.no_two_tower:
            tt = dataclasses.replace(retrieval.two_tower, title_dim=TITLE_DIM if content else 0,
                                     item_id_dropout=ID_DROPOUT if content else 0.0)  # fmt: skip
            bundle = train_retrieval(log, out / f"tt_{variant}", dataclasses.replace(retrieval, features=features, two_tower=tt),
                                     progress=False)  # fmt: skip
            results["models"][f"two_tower/{variant}"] = figures(score(bundle, rows, tt.max_history_len), rows, oracle)
        print(variant, {k: round(v["new_items"]["auc"], 4) for k, v in results["models"].items()}, flush=True)
    results["seconds"] = time.perf_counter() - t0

    print(f"world: {results['world']}, MIND files, abstracts of {args.abstract_words} words; held-out impressions "
          f"{rows.num_rows}, new items {results['models']['ranker/id_only']['new_item_share']:.1%} of them")  # fmt: skip
    print_table(results["models"], width=26)
    print("untrained match (cosine of starting word vectors), new-item AUC:",
          {k: round(v, 3) for k, v in results["untrained_match_new_auc"].items()})
    print(f"{results['seconds']:.0f} s")
    (out / "content_mind.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
