"""Host syncs per training step, graph breaks, recompiles and ``torch.export`` of the demo models.

On the demo world's real batches (``feedrank.labs.base.LabContext``: simulated once under
``--root``), collated as the training tasks collate them (vocabulary checks; the softmax losses'
batches keep only clicked rows, ``feedrank.train.retrieval.clicked_rows``), with the demo configs'
two-tower (``configs/demo.yaml``, in-batch, sampled and BCE losses) and ranker
(``configs/ranking_demo.yaml``, fed by a frozen two-tower). ``two_tower/in_batch_masked`` is the
in-batch two-tower on whole batches (the loss masks the non-clicked rows): what keeping only the
clicked rows on the host saves.

- syncs: ``feedrank.train.syncs.SyncCounter`` over ``--steps`` steps of the real ``Trainer``
  (``log_every`` = steps, so only the last step logs), per step and by op;
- graph breaks: ``torch._dynamo.explain`` of the user tower, the item tower and the ranker forward;
- recompiles: ``torch.compile(backend="eager")`` (dynamo only, no code generation, so it takes
  seconds) of each model run over every batch, forward and backward: frames compiled after the
  first step;
- export: whether ``torch.export.export`` succeeds on each tower (the first line of the error if not);
- ms/step of the two-tower (in-batch) and the ranker through the Trainer, best of ``--repeats``.

    python benchmarks/host_syncs.py --root runs/labs --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from feedrank.bundle import build_ranker
from feedrank.config import from_dict, load_yaml, to_dict
from feedrank.data.collate import Collator
from feedrank.labs.base import LabContext
from feedrank.models.losses import two_tower_loss
from feedrank.models.ranker import ranker_loss
from feedrank.train.ranking import RankingRunConfig
from feedrank.train.retrieval import clicked_rows
from feedrank.train.syncs import SyncCounter
from feedrank.train.task import batch_limits
from feedrank.train.trainer import Trainer, TrainConfig

RANKING_CONFIG = Path(__file__).parents[1] / "configs" / "ranking_demo.yaml"


def models(ctx: LabContext) -> dict:
    """name -> (fresh model factory, loss_fn): the demo two-tower under each loss, and the ranker."""
    frozen = ctx.two_tower().eval()
    rcfg = load_yaml(RankingRunConfig, RANKING_CONFIG)
    rcfg = dataclasses.replace(rcfg, ranker=dataclasses.replace(rcfg.ranker, two_tower_dim=frozen.cfg.dim))

    def two_tower(loss: str):
        model = ctx.two_tower(loss=loss, num_negatives=256)
        if loss == "sampled":
            model.attach_catalogue(torch.zeros(ctx.vocabs.n_items, len(ctx.vocabs.item_cat_sizes), dtype=torch.long))
        return model

    def ranker():
        torch.manual_seed(0)
        return build_ranker(to_dict(rcfg), ctx.vocabs)

    return {  # name -> (model factory, loss_fn, batches of clicked rows only)
        "two_tower/in_batch": (functools.partial(two_tower, "in_batch"), two_tower_loss, True),
        "two_tower/in_batch_masked": (functools.partial(two_tower, "in_batch"), two_tower_loss, False),
        "two_tower/sampled": (functools.partial(two_tower, "sampled"), two_tower_loss, True),
        "two_tower/bce": (functools.partial(two_tower, "bce"), two_tower_loss, False),
        "ranker": (ranker, functools.partial(ranker_loss, two_tower=frozen), False),
    }


def fit(model, loss_fn, batches: list, count: bool) -> tuple[float, SyncCounter | None]:
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(TrainConfig, {"steps": len(batches), "log_every": len(batches), "device": "cpu",
                                      "progress": False, "out_dir": out, "clip_grad_norm": 1.0})
        with Trainer(model, loss_fn, cfg) as trainer:
            counter = SyncCounter() if count else None
            start = time.perf_counter()
            if counter is not None:
                with counter:
                    trainer.fit(lambda epoch: batches)
            else:
                trainer.fit(lambda epoch: batches)
            return (time.perf_counter() - start) / len(batches), counter


def graph_breaks(ctx: LabContext, batch) -> dict:
    tt = ctx.two_tower().train()
    history_emb = tt.item_tower.id_embedding(batch.history).detach()
    frozen = ctx.two_tower().eval()
    ranker = models(ctx)["ranker"][0]().train()
    with torch.no_grad():
        uv, iv = frozen.user_vectors(batch), frozen.item_vectors(batch.item, batch.item_cats, batch.item_age_h)
    cases = {
        "user_tower": (tt.user_tower, (batch.user, batch.user_cats, batch.counters, history_emb, batch.history_mask)),
        "item_tower": (tt.item_tower, (batch.item, batch.item_cats, batch.item_age_h)),
        "ranker": (ranker, (batch, uv, iv)),
    }
    out = {}
    for name, (module, args) in cases.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(module)(*args)
        out[name] = {"graph_breaks": explained.graph_break_count,
                     "reasons": sorted({str(b.reason).splitlines()[0][:120] for b in explained.break_reasons})}
    torch._dynamo.reset()
    exported = {}
    for name in ("user_tower", "item_tower"):
        module, args = cases[name]
        try:
            torch.export.export(module.eval(), args)
            exported[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - the failure is the figure
            exported[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return {"graph_breaks": out, "export": exported}


def recompiles(factory, loss_fn, batches: list) -> dict:
    torch._dynamo.reset()
    counters.clear()
    model = factory().train()
    compiled = torch.compile(model, backend="eager")
    first = None
    for batch in batches:
        loss, _ = loss_fn(compiled, batch)
        loss.backward()
        first = counters["frames"]["total"] if first is None else first
    # A recompile is a frame compiled again after the first step compiled them all.
    return {"graphs": counters["stats"]["unique_graphs"], "recompiles": counters["frames"]["total"] - first,
            "graph_breaks": sum(counters["graph_break"].values())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="runs/labs", help="labs output folder: the demo world is simulated under it once")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = LabContext(root=Path(args.root), name="host_syncs")
    rows = ctx.rows(args.steps * args.batch)
    limits = batch_limits(ctx.vocabs)
    collated = {clicked: [Collator(max_history=30, limits=limits, keep=clicked_rows if clicked else None)(
        rows.slice(i, args.batch)) for i in range(0, rows.num_rows - args.batch + 1, args.batch)]
        for clicked in (False, True)}  # fmt: skip
    batches = collated[False]
    result: dict = {"steps": len(batches), "batch": args.batch, "threads": torch.get_num_threads(), "models": {}}
    for name, (factory, loss_fn, clicked) in models(ctx).items():
        batches = collated[clicked]
        _, counter = fit(factory(), loss_fn, batches, count=True)
        ms = min(fit(factory(), loss_fn, batches, count=False)[0] for _ in range(args.repeats)) * 1e3
        result["models"][name] = {"syncs": counter.total, "syncs_per_step": counter.total / len(batches),
                                  "by_op": dict(counter.by_op), "ms_per_step": ms,
                                  "compile_eager": recompiles(factory, loss_fn, batches)}
        print(f"{name:20s} syncs {counter.total:4d} ({counter.total / len(batches):5.2f}/step) {dict(counter.by_op)}"
              f"  {ms:7.1f} ms/step  compile(eager): {result['models'][name]['compile_eager']}")
    result |= graph_breaks(ctx, collated[False][0])
    for name, figures in result["graph_breaks"].items():
        print(f"graph breaks {name:11s}: {figures['graph_breaks']}  {figures['reasons']}")
    for name, status in result["export"].items():
        print(f"torch.export {name:11s}: {status}")
    Path(ctx.out / "host_syncs.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
