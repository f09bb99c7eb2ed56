"""RecBole's side of the MovieLens-100K quality benchmark: one split, exported, and tuned baselines.

Runs INSIDE .venv-recbole (see setup_venv.sh), never in feedrank's venv: RecBole 1.2.1
needs an older scientific stack. The lead's benchmarks/movielens_vs_recbole.py calls it
through a subprocess and trains feedrank on the split this script exports, so both
systems see exactly the same train/valid/test rows.

Why build the split here rather than in feedrank: the published ml-100k numbers come
from RecBole's own protocol (every rating an implicit positive, per-user random 8:1:1
split, full ranking over all items, metrics @10). Letting RecBole make the split and
exporting it is the only way to be sure the comparison uses that protocol and not a
re-implementation of it.

Why tune: LightGCN's defaults are not tuned for ml-100k (they stop early well below
BPR). Each model gets the same small budget of trials, chosen on the VALIDATION split
only; the test numbers reported are those of the best-by-validation trial. Trial 1 is
always RecBole's default configuration, so tuning never reports less than the defaults
would on validation, and the BPR default run doubles as a check against RecBole's
published and previously measured figures.

Usage:
    .venv-recbole/bin/python benchmarks/recbole/run_recbole.py \
        --models BPR,LightGCN --out runs/recbole --seed 2020 --budget-trials 4
"""

from __future__ import annotations

import os

# RecBole reloads its own best checkpoint with torch.load, which is weights-only by
# default since torch 2.6 and rejects RecBole's pickled config. Set before torch loads.
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"

import argparse
import contextlib
import itertools
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DATASET = "ml-100k"
SPLITS = ("train", "valid", "test")
METRICS = ("recall@10", "ndcg@10", "mrr@10", "hit@10", "precision@10")
TOP_K = 10  # the length of the exported test lists (test_top)

# The hyperparameters searched per model: 8 points each, both containing RecBole's
# defaults (BPR: lr 1e-3, 64 dims; LightGCN: 2 layers, lr 1e-3, 64 dims, reg 1e-5).
# LightGCN's reg_weight is not searched: 1e-4 and 1e-5 gave identical metrics to 4
# decimals (RecBole's EmbLoss divides the batch embedding norm by the batch size, so
# the term is ~1e-6 of the loss), so varying it would only waste trials.
SEARCH_SPACES: dict[str, dict[str, list[Any]]] = {
    "BPR": {
        "learning_rate": [5e-4, 1e-3, 2e-3, 5e-3],
        "embedding_size": [64, 128],
    },
    "LightGCN": {
        "n_layers": [2, 3],
        "learning_rate": [1e-3, 2e-3, 5e-3, 1e-2],
        "embedding_size": [64],
    },
    # The item-item models the lead's issue 16 found strongest on this split. Each grid holds
    # RecBole's defaults (EASE reg 250; SLIMElastic alpha 0.2, l1_ratio 0.02; ItemKNN k 100,
    # shrink 0; MultiVAE lr 1e-3, dropout 0.5, latent 128) and spreads around them.
    "EASE": {
        "reg_weight": [250.0, 50.0, 100.0, 500.0, 1000.0, 2000.0],
    },
    "SLIMElastic": {
        "alpha": [0.2, 0.05, 0.5],
        "l1_ratio": [0.02, 0.005, 0.1],
    },
    "ItemKNN": {
        "k": [100, 50, 200, 400],
        "shrink": [0.0, 10.0],
    },
    "MultiVAE": {
        "learning_rate": [1e-3, 5e-3],
        "dropout_prob": [0.5, 0.3],
        "latent_dimension": [128, 64],
    },
}

# Settings a model needs whatever the trial: MultiVAE reads a user's whole row of the
# interaction matrix and RecBole's docs require no negative sampling for it; the closed-form
# and neighbourhood models ignore negatives, so sampling them would only cost time.
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    name: {"train_neg_sample_args": None} for name in ("EASE", "SLIMElastic", "ItemKNN", "MultiVAE")
}

# Effective settings recorded beside each result so the lead can state (and match)
# what the peer was run with; the searched keys are added per model.
RECORDED_SETTINGS = (
    "epochs",
    "stopping_step",
    "eval_step",
    "train_batch_size",
    "learner",
    "weight_decay",
    "train_neg_sample_args",
    "valid_metric",
    "eval_args",
    "seed",
    "reproducibility",
)

# How RecBole's full-ranking evaluation treats known items; written into the results
# so the feedrank side can reproduce the candidate set exactly.
PROTOCOL = {
    "positives": "every rating (1-5) is an implicit positive; no threshold",
    "split": "per user: random order (RO), then 80/10/10 by count (RS [0.8,0.1,0.1], group_by user); "
    "RecBole rounds valid/test counts down and gives the remainder to train",
    "candidates": "full ranking over all items of the dataset (1,682 for ml-100k)",
    "valid_ranking_excludes": "the user's train items",
    "test_ranking_excludes": "the user's train AND valid items",
    "users_evaluated": "users with at least one positive in the evaluated split; metrics averaged over users",
    "recall@k": "hits in top k / number of the user's positives in the split (not capped at k)",
    "ndcg@k": "binary gains, 1/log2(rank+1); ideal DCG uses min(#positives, k) positives",
    "mrr@k": "1 / rank of the first positive in the top k, 0 if none",
    "hit@k": "1 if any positive is in the top k",
    "precision@k": "hits in top k / k",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="BPR,LightGCN", help="comma-separated, from: " + ", ".join(SEARCH_SPACES))
    parser.add_argument("--out", required=True, type=Path, help="directory for the split CSVs and recbole_results.json")
    parser.add_argument("--seed", type=int, default=2020, help="seed for the split, sampling, training and trial order")
    parser.add_argument("--budget-trials", type=int, default=4, help="trials per model (trial 1 = RecBole defaults)")
    parser.add_argument("--max-epochs", type=int, default=300, help="epoch cap per trial; early stopping usually ends sooner")
    parser.add_argument("--valid-metric", default="MRR@10", help="early stopping and trial selection metric (RecBole's default)")
    # One thread by default: on a shared 2-core box two OpenMP threads made LightGCN
    # ~10x slower (68.6 s vs 6.6 s for 5 epochs at load ~7), with the same numbers.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--verbose", action="store_true", help="show RecBole's own per-epoch log")
    parser.add_argument("--split-only", action="store_true",
                        help="export the split and stop (the caller trains its side while this runner tunes)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in SEARCH_SPACES]
    if unknown or not args.models:
        parser.error(f"--models: unknown or empty {unknown or args.models!r}; this runner has search spaces for {', '.join(SEARCH_SPACES)}")
    if args.budget_trials < 1:
        parser.error(f"--budget-trials must be >= 1, got {args.budget_trials}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.max_epochs < 1:
        parser.error(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.valid_metric.lower() not in METRICS:
        parser.error(f"--valid-metric {args.valid_metric!r} is not one of {', '.join(METRICS)}")
    return args


def plan_trials(space: dict[str, list[Any]], defaults: dict[str, Any], budget: int, seed: int) -> list[dict[str, Any]]:
    """Defaults first, then a seeded random sample of the rest of the grid (RecBole's
    'random' search), so a fixed budget covers the grid evenly rather than its first corner."""
    keys = list(space)
    first = {k: defaults[k] for k in keys}
    rest = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    rest = [p for p in rest if p != first]
    random.Random(seed).shuffle(rest)
    return [first, *rest][:budget]


@contextlib.contextmanager
def recbole_workdir(recbole_root: Path) -> Iterator[Path]:
    """A throwaway working directory holding a copy of the shipped ml-100k atomic files.

    RecBole writes ./log, ./log_tensorboard and checkpoints relative to the current
    directory; running from here keeps all of that out of the repository."""
    source = recbole_root / "dataset_example" / DATASET
    if not (source / f"{DATASET}.inter").is_file():
        raise FileNotFoundError(f"{source / (DATASET + '.inter')} missing: is recbole==1.2.1 installed from its wheel?")
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="feedrank-recbole-") as tmp:
        work = Path(tmp)
        shutil.copytree(source, work / "data" / DATASET)
        os.chdir(work)
        try:
            yield work
        finally:
            os.chdir(previous)


def export_split(dataset: Any, built: Sequence[Any], raw_inter: Path, out: Path) -> dict[str, Any]:
    """Write train/valid/test.csv with the ORIGINAL ids and raw timestamps, and check them.

    RecBole remaps ids to ints and normalises float fields (timestamp included) in place,
    so ids go back through id2token and timestamps are joined from the raw .inter file
    on (user_id, item_id), which ml-100k guarantees unique (checked)."""
    import pandas as pd

    raw = pd.read_csv(raw_inter, sep="\t", dtype=str)
    raw.columns = [c.split(":")[0] for c in raw.columns]
    pair = ["user_id", "item_id"]
    if raw.duplicated(pair).any():
        dup = raw[raw.duplicated(pair, keep=False)].head(3).to_dict("records")
        raise ValueError(f"{raw_inter}: duplicate (user_id, item_id) pairs, e.g. {dup}; timestamps cannot be joined back")
    raw["timestamp"] = pd.to_numeric(raw["timestamp"], errors="raise").astype("int64")

    uid, iid = dataset.uid_field, dataset.iid_field
    frames = {}
    for name, part in zip(SPLITS, built):
        ids = pd.DataFrame(
            {
                "user_id": dataset.id2token(uid, part.inter_feat[uid].numpy()),
                "item_id": dataset.id2token(iid, part.inter_feat[iid].numpy()),
            }
        )
        frames[name] = ids.merge(raw[pair + ["timestamp"]], on=pair, how="left", validate="one_to_one")
        if frames[name]["timestamp"].isna().any():
            raise ValueError(f"{name} split has (user_id, item_id) pairs absent from {raw_inter}")

    together = pd.concat(frames.values(), ignore_index=True)
    if together.duplicated(pair).any():
        raise ValueError("train/valid/test overlap on (user_id, item_id): the split is not disjoint")
    if len(together) != len(raw):
        raise ValueError(f"split rows sum to {len(together)}, but {raw_inter} has {len(raw)}")

    out.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        tmp = out / f".{name}.csv.tmp"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, out / f"{name}.csv")  # never leave a half-written split behind

    return {
        "source": f"recbole/dataset_example/{DATASET}/{DATASET}.inter",
        "files": {name: f"{name}.csv" for name in SPLITS},
        "columns": ["user_id", "item_id", "timestamp"],
        "rows": {name: len(f) for name, f in frames.items()} | {"total": len(together)},
        "users": {name: int(f["user_id"].nunique()) for name, f in frames.items()} | {"total": int(together["user_id"].nunique())},
        "items": {name: int(f["item_id"].nunique()) for name, f in frames.items()} | {"total": int(together["item_id"].nunique())},
        "disjoint": True,
    }


def make_loaders(config: Any, dataset: Any, built: Sequence[Any]) -> tuple[Any, Any, Any]:
    """The second half of recbole.data.data_preparation, on an already built split, so
    every trial of every model trains and evaluates on the exact rows exported."""
    from recbole.data.utils import create_samplers, get_dataloader

    train_set, valid_set, test_set = built
    train_sampler, valid_sampler, test_sampler = create_samplers(config, dataset, built)
    return (
        get_dataloader(config, "train")(config, train_set, train_sampler, shuffle=config["shuffle"]),
        get_dataloader(config, "valid")(config, valid_set, valid_sampler, shuffle=False),
        get_dataloader(config, "test")(config, test_set, test_sampler, shuffle=False),
    )


def run_trial(model_name: str, params: dict[str, Any], base: dict[str, Any], dataset: Any, built: Sequence[Any]) -> dict[str, Any]:
    """Train one configuration with early stopping on valid, then test its best epoch;
    the seed order mirrors recbole.quick_start.run_recbole."""
    from recbole.config import Config
    from recbole.utils import get_model, get_trainer, init_seed

    config = Config(model=model_name, dataset=DATASET, config_dict={**base, **MODEL_SETTINGS.get(model_name, {}), **params})
    init_seed(config["seed"], config["reproducibility"])
    train_data, valid_data, test_data = make_loaders(config, dataset, built)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)

    start = time.perf_counter()
    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    train_seconds = time.perf_counter() - start
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    trainer.tensorboard.close()
    top = test_top_lists(model, dataset, built[2], test_data)

    epochs_run = len(trainer.train_loss_dict)
    return {
        "params": params,
        "valid": {m: float(best_valid[m]) for m in METRICS},
        "test": {m: float(test[m]) for m in METRICS},
        "train_seconds": round(train_seconds, 2),
        "epochs_run": epochs_run,
        "best_epoch": epochs_run - 1 - trainer.cur_step * config["eval_step"],
        "settings": {k: config[k] for k in (*RECORDED_SETTINGS, *SEARCH_SPACES[model_name])},
        "test_top": top,
    }


def test_top_lists(model: Any, dataset: Any, test_set: Any, test_data: Any, k: int = TOP_K) -> dict[str, list[str]]:
    """Each test user's top ``k`` item ids (original tokens), best first, by RecBole's own full-sort
    scoring with its test-time exclusion of the user's train and valid items: the lists behind the
    test metrics, so the caller can pair users across systems (bootstrap)."""
    import torch
    from recbole.utils.case_study import full_sort_topk

    uid, iid = dataset.uid_field, dataset.iid_field
    users = torch.unique(test_set.inter_feat[uid]).numpy()
    with torch.no_grad():
        _, index = full_sort_topk(users, model, test_data, k)
    tokens = dataset.id2token(iid, index.numpy().reshape(-1)).reshape(index.shape)
    return {str(u): [str(t) for t in row] for u, row in zip(dataset.id2token(uid, users), tokens)}


def tune_model(model_name: str, args: argparse.Namespace, base: dict[str, Any], dataset: Any, built: Sequence[Any]) -> dict[str, Any]:
    """Run the model's trial plan; pick the best trial by the validation metric only."""
    from recbole.config import Config

    defaults = Config(model=model_name, dataset=DATASET, config_dict={**base, **MODEL_SETTINGS.get(model_name, {})})
    space = SEARCH_SPACES[model_name]
    plan = plan_trials(space, {k: defaults[k] for k in space}, args.budget_trials, args.seed)
    metric = args.valid_metric.lower()
    trials = []
    for number, params in enumerate(plan, start=1):
        trial = run_trial(model_name, params, base, dataset, built)
        trials.append(trial)
        shown = " ".join(f"{k}={v}" for k, v in params.items())
        print(
            f"[{model_name} {number}/{len(plan)}] {shown}: valid {metric}={trial['valid'][metric]:.4f} "
            f"(epochs {trial['epochs_run']}, best {trial['best_epoch']}, {trial['train_seconds']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    best = max(trials, key=lambda t: t["valid"][metric])  # first wins ties: defaults preferred
    test_top = best["test_top"]
    for trial in trials:
        del trial["test_top"]
    return {
        "test": best["test"],
        "test_top": test_top,
        "valid": best["valid"],
        "train_seconds": best["train_seconds"],
        "config": best["settings"],
        "selected_by": f"valid {metric}",
        "selected_trial": trials.index(best) + 1,
        "search_space": space,
        "tuning_seconds": round(sum(t["train_seconds"] for t in trials), 2),
        "trials": trials,
    }


def format_table(models: dict[str, dict[str, Any]]) -> str:
    header = f"{'model':<10}" + "".join(f"{m:>14}" for m in METRICS) + f"{'train s':>9}  config"
    rows = [header, "-" * len(header)]
    for name, result in models.items():
        shown = " ".join(f"{k}={result['config'][k]}" for k in result["search_space"])
        rows.append(
            f"{name:<10}" + "".join(f"{result['test'][m]:>14.4f}" for m in METRICS) + f"{result['train_seconds']:>9.1f}  {shown}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out.resolve()  # resolved before the runner changes directory
    # RecBole's Config also parses sys.argv ("--key=value" would override its settings);
    # everything it needs is passed explicitly, so it gets an empty command line.
    sys.argv = sys.argv[:1]
    # A caller's timeout sends SIGTERM; exiting through SystemExit lets the temporary
    # working directory (data copy, checkpoints) clean itself up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if not args.verbose:
        # RecBole 1.2.1 on this stack warns on every run (pandas inplace fillna, amp,
        # torch.load, pkg_resources); none of it changes the results. --verbose shows it.
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    try:
        import recbole
        import torch
        from recbole.config import Config
        from recbole.data import create_dataset
        from recbole.utils import init_logger, init_seed
    except ImportError as exc:
        sys.exit(
            f"cannot import RecBole from {sys.executable} ({exc}); create its venv with "
            "benchmarks/recbole/setup_venv.sh and run this script with .venv-recbole/bin/python"
        )

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with recbole_workdir(Path(recbole.__file__).parent) as work:
        base = {
            "data_path": str(work / "data"),
            "checkpoint_dir": str(work / "saved"),
            "use_gpu": False,
            "show_progress": False,
            "seed": args.seed,
            "reproducibility": True,
            "epochs": args.max_epochs,
            "valid_metric": args.valid_metric,
        }
        # The split needs no model settings; any general model's config builds the same one.
        split_config = Config(model=args.models[0], dataset=DATASET, config_dict=base)
        if args.verbose:
            init_logger(split_config)
        init_seed(split_config["seed"], split_config["reproducibility"])
        dataset = create_dataset(split_config)
        built = dataset.build()
        split = export_split(dataset, built, work / "data" / DATASET / f"{DATASET}.inter", out)
        print(f"split exported to {out}: {split['rows']}", file=sys.stderr, flush=True)
        if args.split_only:
            return

        models = {name: tune_model(name, args, base, dataset, built) for name in args.models}

    results = {
        "split": split,
        "protocol": PROTOCOL,
        "models": models,
        "environment": {
            "recbole": recbole.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
        "budget_trials": args.budget_trials,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    tmp = out / ".recbole_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out / "recbole_results.json")
    print(format_table(models))
    print(f"wall {results['wall_seconds']} s; results in {out / 'recbole_results.json'}")


if __name__ == "__main__":
    main()
