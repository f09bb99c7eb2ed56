"""Ranker feature interactions, DCN-v2 cross network vs DLRM dot products, on the synthetic world.

What is measured, on CPU: a small world is simulated (``feedrank.data.simulate``), turned into
point-in-time examples with a time split (``feedrank.features.build_features``: the last day is the
test set), and packed into ``Batch`` (``feedrank.data.collate``). Each variant of the ranker is
trained for the same budget (``--epochs`` passes over the same training rows, same batch size,
same seeds) with ``ranker_loss``, then evaluated on the held-out day:

- click AUC and GAUC (per request, impression-weighted; ``feedrank.evaluate.metrics``) of the
  served click probability (no position term), plus its log loss;
- hide AUC (the value formula's negative term);
- training throughput (examples/s of forward + backward + AdamW step, median over steps) and
  serving throughput (examples/s of ``predict`` on the test set in 4096-row chunks).

- serving latency of one request (``--candidates`` items for one user, transformer history
  encoder, where the user side is the expensive part): ``score_candidates`` (user side computed
  once, broadcast) against ``predict`` on the equivalent batch that repeats the user per candidate.

Variants: ``dcn`` (full-rank cross layers), ``dcn_r8`` (low-rank U V^T, r = 8) and ``dot``. Quality
is the mean (and spread) over ``--seeds`` model seeds; the data is the same for all.

Run: ``.venv/bin/python benchmarks/ranker_interactions.py [--epochs 3] [--seeds 3] [--threads 1] [--out runs/bench/ranker_interactions.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from feedrank.config import to_dict
from feedrank.data.batch import Batch
from feedrank.data.collate import BATCH_COLUMNS, collate
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.evaluate.metrics import auc, group_auc, log_loss
from feedrank.features import COUNTER_COLUMNS, FeatureConfig, Vocabularies, build_features, split_files
from feedrank.features.build import VOCAB_DIR
from feedrank.models.losses import select_rows
from feedrank.models.ranker import ItemInputs, Ranker, RankerConfig, UserInputs, ranker_loss

WORLD = WorldConfig(users=3000, items=1500, days=6, seed=0)
SPLIT_AT = "2024-01-06T00:00:00"  # days 1-5 train, day 6 test
BATCH_SIZE = 512
VARIANTS = {
    "dcn": {"interaction": "dcn", "cross_layers": 2},
    "dcn_r8": {"interaction": "dcn", "cross_layers": 2, "cross_rank": 8},
    "dot": {"interaction": "dot"},
}
N_USER_COUNTERS = sum(c.startswith("user_") for c in COUNTER_COLUMNS)


def load_split(features: Path, split: str) -> Batch:
    table = pq.ParquetDataset(split_files(features, split)).read(columns=list(BATCH_COLUMNS))
    return collate(table)


def build(variant: str, vocabs: Vocabularies, seed: int, **overrides) -> Ranker:
    torch.manual_seed(seed)
    cfg = RankerConfig(**VARIANTS[variant], **overrides)
    return Ranker(cfg, vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes,
                  N_USER_COUNTERS, len(COUNTER_COLUMNS) - N_USER_COUNTERS)  # fmt: skip


def train(model: Ranker, data: Batch, epochs: int, seed: int) -> float:
    """Train in place; returns the median training throughput in examples/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-5)
    g = torch.Generator().manual_seed(seed)
    times = []
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(data), generator=g).split(BATCH_SIZE):
            batch = select_rows(data, rows)
            start = time.perf_counter()
            loss, _ = ranker_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append((time.perf_counter() - start) / len(rows))
    return 1.0 / statistics.median(times)


def evaluate(model: Ranker, data: Batch) -> dict[str, float]:
    model.eval()
    start = time.perf_counter()
    chunks = [model.predict(select_rows(data, rows)) for rows in torch.arange(len(data)).split(4096)]
    seconds = time.perf_counter() - start
    preds = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    return {
        "click_auc": auc(data.clicked, preds["click"]),
        "click_gauc": group_auc(data.clicked, preds["click"], data.request),
        "click_logloss": log_loss(data.clicked, preds["click"]),
        "hide_auc": auc(data.hidden, preds["hide"]),
        "serve_ex_per_s": len(data) / seconds,
    }


def serving_latency(vocabs: Vocabularies, data: Batch, n_candidates: int, repeats: int = 30) -> dict[str, float]:
    """Median ms per request: ``score_candidates`` vs ``predict`` on the user-repeated batch."""
    model = build("dcn", vocabs, 0, history_encoder="transformer", n_layers=2).eval()
    u = int(data.history_mask.sum(dim=1).argmax())  # the user with the longest history
    items = select_rows(data, torch.arange(n_candidates))
    user_inputs = UserInputs(user=data.user[u], user_cats=data.user_cats[u], history=data.history[u],
                             history_mask=data.history_mask[u], counters=data.counters[u, :N_USER_COUNTERS])  # fmt: skip
    item_inputs = ItemInputs(items.item, items.item_cats, items.item_age_h, items.counters[:, N_USER_COUNTERS:])
    repeat = torch.full((n_candidates,), u)
    expanded = dataclasses.replace(
        items, user=data.user[repeat], user_cats=data.user_cats[repeat], history=data.history[repeat],
        history_mask=data.history_mask[repeat],
        counters=torch.cat([data.counters[repeat, :N_USER_COUNTERS], items.counters[:, N_USER_COUNTERS:]], dim=1),
    )  # fmt: skip

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats + 3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times[3:])

    gap = (model.score_candidates(user_inputs, item_inputs)["value"] - model.predict(expanded)["value"]).abs().max()
    once = median_ms(lambda: model.score_candidates(user_inputs, item_inputs))
    repeated = median_ms(lambda: model.predict(expanded))
    return {"candidates": n_candidates, "history_len": int(data.history_mask[u].sum()), "score_candidates_ms": once,
            "predict_repeated_ms": repeated, "speedup": repeated / once, "max_abs_diff": float(gap)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training rows per model")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per variant")
    parser.add_argument("--candidates", type=int, default=300, help="candidates per request for the latency test")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        summary = simulate(WORLD, Path(tmp) / "sim")
        features = Path(tmp) / "features"
        build_features(Path(tmp) / "sim", features, FeatureConfig(history_len=30, split_at=SPLIT_AT), progress=False)
        vocabs = Vocabularies.load(features / VOCAB_DIR)
        train_data, test_data = load_split(features, "train"), load_split(features, "test")
    print(f"world: {summary.users} users, {summary.items} items, {summary.days} days, CTR {summary.ctr:.3f}; "
          f"train {len(train_data)} rows, test {len(test_data)} rows; torch {torch.__version__}, {args.threads} thread(s)")  # fmt: skip
    print(f"budget per model: {args.epochs} epochs x batch {BATCH_SIZE}; {args.seeds} seeds\n")

    results = {}
    header = f"{'variant':<8} {'params':>8} {'click AUC':>14} {'click GAUC':>14} {'logloss':>8} {'hide AUC':>9} {'train ex/s':>11} {'serve ex/s':>11}"
    print(header)
    for variant in VARIANTS:
        runs = []
        for seed in range(args.seeds):
            model = build(variant, vocabs, seed)
            train_rate = train(model, train_data, args.epochs, seed)
            runs.append({**evaluate(model, test_data), "train_ex_per_s": train_rate})
        n_params = sum(p.numel() for p in model.parameters())
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        spread = {k: statistics.pstdev(r[k] for r in runs) for k in runs[0]}
        results[variant] = {"config": to_dict(model.cfg), "params": n_params, "runs": runs, "mean": mean, "std": spread}
        print(f"{variant:<8} {n_params:>8} {mean['click_auc']:>8.4f}±{spread['click_auc']:.4f} "
              f"{mean['click_gauc']:>8.4f}±{spread['click_gauc']:.4f} {mean['click_logloss']:>8.4f} "
              f"{mean['hide_auc']:>9.4f} {mean['train_ex_per_s']:>11.0f} {mean['serve_ex_per_s']:>11.0f}")  # fmt: skip

    best = max(results, key=lambda v: results[v]["mean"]["click_gauc"])
    fastest = max(results, key=lambda v: results[v]["mean"]["train_ex_per_s"])
    ratio = results["dcn"]["mean"]["train_ex_per_s"] / results["dot"]["mean"]["train_ex_per_s"]
    print(f"\nbest click GAUC: {best}; fastest training: {fastest}; dcn/dot training speed ratio {ratio:.2f}")

    latency = serving_latency(vocabs, test_data, args.candidates)
    print(f"\none request, {latency['candidates']} candidates, user history {latency['history_len']}, transformer encoder: "
          f"score_candidates {latency['score_candidates_ms']:.2f} ms, predict on the repeated batch "
          f"{latency['predict_repeated_ms']:.2f} ms ({latency['speedup']:.1f}x); max |value diff| {latency['max_abs_diff']:.1e}")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"world": to_dict(WORLD), "epochs": args.epochs, "results": results, "latency": latency}, indent=2) + "\n")


if __name__ == "__main__":
    main()
