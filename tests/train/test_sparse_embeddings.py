"""``train.sparse_embeddings``: sparse table gradients + SparseAdam, AdamW for the rest, in the one trainer.

Checked against hand-computed updates (SparseAdam's formula on the looked-up rows, fused AdamW on the
dense parameters, both after the global-norm clip over a step of accumulated micro-batches), exact
resume, mixed precision, the real two-tower, and the combinations the config refuses.
"""

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from feedrank.config import ConfigError, from_dict
from feedrank.train import Trainer, TrainConfig, load_checkpoint
from feedrank.train.distributed import run_torchrun
from feedrank.train.sparse import SplitAdam

WORKER = Path(__file__).with_name("sparse_worker.py")
_spec = importlib.util.spec_from_file_location("sparse_toy", WORKER)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)
TableModel, mse, make_data, N_IDS = toy.TableModel, toy.mse, toy.make_data, toy.N_IDS
LR, BETAS, EPS = 0.01, (0.9, 0.999), 1e-8


def _cfg(out: Path, **overrides) -> TrainConfig:
    return toy.train_config(str(out), **overrides)


def _train(out: Path, model: nn.Module, data=None, **overrides) -> nn.Module:
    with Trainer(model, mse, _cfg(out, **overrides)) as trainer:
        trainer.resume()
        trainer.fit(data or make_data())
    return model


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides", [{"embeddings": "torchrec"}, {"strategy": "fsdp"}, {"compile": True}])
def test_config_refuses_what_sparse_tables_cannot_run_under(overrides):
    with pytest.raises(ConfigError, match="sparse_embeddings needs embeddings 'torch', strategy 'ddp' and compile false"):
        from_dict(TrainConfig, {"sparse_embeddings": True, **overrides}, "train")


def test_one_step_matches_hand_computed_sparse_adam_and_adamw(tmp_path):
    """Two accumulated micro-batches, clip at 0.05 (it binds): the looked-up rows move by SparseAdam's
    first step on the clipped gradient, the other rows not at all, dense parameters by fused AdamW."""
    model = TableModel()
    ref, before = copy.deepcopy(model), model.ids.weight.detach().clone()
    data = make_data()
    _train(tmp_path, model, data, grad_accum_steps=2, clip_grad_norm=0.05)

    batches = list(data(0))[:2]
    loss = sum(mse(ref, b)[0] / 2 for b in batches)
    loss.backward()
    params = list(ref.parameters())
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert _metrics(tmp_path)[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    coef = min(1.0, 0.05 / (float(norm) + 1e-6))
    assert coef < 1.0
    tables = {id(ref.ids.weight), id(ref.cat.weight)}
    dense = [p for p in params if id(p) not in tables]
    for p in params:
        p.grad.mul_(coef)
    for table in (ref.ids.weight, ref.cat.weight):  # SparseAdam, step 1, written out
        g = table.grad
        m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
        step_size = LR * math.sqrt(1 - BETAS[1]) / (1 - BETAS[0])
        table.data -= step_size * m / (v.sqrt() + EPS)
    decay = [{"params": [p for p in dense if p.dim() >= 2], "weight_decay": 0.01},
             {"params": [p for p in dense if p.dim() < 2], "weight_decay": 0.0}]
    torch.optim.AdamW(decay, lr=LR, betas=BETAS, fused=True).step()

    for (name, got), want in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    looked_up = torch.unique(torch.cat([b["ids"].flatten() for b in batches]))
    untouched = torch.ones(N_IDS, dtype=torch.bool)
    untouched[looked_up] = False
    untouched[0] = True  # the padding row has no gradient
    assert torch.equal(model.ids.weight[untouched], before[untouched])  # bit for bit: no decay, no update
    assert not torch.equal(model.ids.weight[looked_up[looked_up > 0]], before[looked_up[looked_up > 0]])


def test_the_dense_parameters_see_the_same_clipped_gradient_as_in_dense_mode(tmp_path):
    """One step, accumulation 2, binding clip: the head's update and the gradient norm are those of a
    dense-gradient run (only the tables' optimizer differs)."""
    sparse = _train(tmp_path / "sparse", TableModel(), grad_accum_steps=2, clip_grad_norm=0.05)
    dense = _train(tmp_path / "dense", TableModel(), grad_accum_steps=2, clip_grad_norm=0.05, sparse_embeddings=False)
    assert _metrics(tmp_path / "sparse")[0]["grad_norm"] == pytest.approx(_metrics(tmp_path / "dense")[0]["grad_norm"], rel=1e-6)
    for a, b in zip(sparse.head.parameters(), dense.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    """Dropout, accumulation 2, SparseAdam and AdamW state through a checkpoint: bit for bit."""
    overrides = {"steps": 6, "grad_accum_steps": 2, "checkpoint_every": 2}
    straight = _train(tmp_path / "straight", TableModel(dropout=0.3), **overrides)

    out = tmp_path / "stopped"
    data = make_data()
    with Trainer(TableModel(dropout=0.3), mse, _cfg(out, **overrides)) as trainer:
        assert isinstance(trainer.optimizer, SplitAdam)

        def stopping(epoch):
            for i, batch in enumerate(data(epoch)):
                if epoch == 1 and i == 1:  # micro-batch 8: the 2nd of step 4
                    trainer.request_stop()
                yield batch
        first = trainer.fit(stopping)
    assert first.step == 4
    payload = load_checkpoint(first.checkpoint)
    assert payload["sparse_embeddings"] and set(payload["optimizer"]) == {"dense", "sparse"}
    assert len(payload["optimizer"]["sparse"]["state"]) == 2  # both tables' moments are saved

    resumed = _train(out, TableModel(dropout=0.3, seed=99), **overrides)
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(tmp_path / "straight")]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match="written with sparse_embeddings True: resume it with the same setting"):
        _train(out, TableModel(), **overrides, sparse_embeddings=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_sparse_tables(tmp_path, precision):
    before = TableModel().ids.weight.detach().clone()
    model = _train(tmp_path, TableModel(), steps=12, lr=0.05, precision=precision)
    losses = [r["loss"] for r in _metrics(tmp_path)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert torch.equal(model.ids.weight[60:], before[60:])  # never looked up, never moved


def test_two_tower_sampled_softmax_trains_with_sparse_tables(tmp_path):
    """The real model: its ID tables (item, user, categorical) all get sparse gradients, none a dense one."""
    from feedrank.data.batch import Batch
    from feedrank.models import TwoTower, TwoTowerConfig, two_tower_loss

    n_items, b = 500, 16
    cfg = TwoTowerConfig(loss="sampled", negative_sampler="popularity", num_negatives=32, logq_correction=True, dropout=0.0)
    torch.manual_seed(0)
    model = TwoTower(cfg, 50, n_items, (4,), (6, 3), n_counters=2)
    model.attach_catalogue(torch.randint(2, 3, (n_items, 2)), torch.arange(n_items, 0, -1, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(b)
    batch = Batch(
        user=torch.randint(2, 50, (b,), generator=g), user_cats=torch.randint(2, 4, (b, 1), generator=g),
        history=torch.randint(2, n_items, (b, 5), generator=g), history_mask=torch.ones(b, 5, dtype=torch.bool),
        item=torch.randint(2, n_items, (b,), generator=g), item_cats=torch.randint(2, 3, (b, 2), generator=g),
        item_age_h=torch.rand(b, generator=g), counters=torch.rand(b, 5, generator=g),
        position=torch.zeros(b, dtype=torch.long), clicked=ones, dwell_s=ones, shared=ones * 0, hidden=ones * 0,
        weight=ones, item_logq=torch.full((b,), -5.0), request=torch.arange(b),
    )  # fmt: skip
    train = from_dict(TrainConfig, {"steps": 3, "log_every": 1, "device": "cpu", "progress": False,
                                    "sparse_embeddings": True, "out_dir": str(tmp_path)})
    with Trainer(model, two_tower_loss, train) as trainer:
        tables = [p for group in trainer.optimizer.sparse.param_groups for p in group["params"]]
        assert any(p is model.item_tower.id_embedding.weight for p in tables)
        trainer.fit(lambda epoch: iter([batch]))
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path))


@pytest.mark.slow  # two torchrun workers start in ~5-10 s
def test_two_ddp_ranks_with_sparse_tables_match_one_process_on_the_union(tmp_path):
    """DDP all-reduces the sparse table gradients (gloo): 2 ranks x half batches, accumulation 2 and a
    binding clip give one process's parameters on the whole batches."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(out), "--steps", "4", "--accum", "2"]
    returncode, stderr = run_torchrun(cmd, timeout_s=300)
    assert returncode == 0, stderr[-3000:]
    single, threads = tmp_path / "single", torch.get_num_threads()
    try:
        toy.main(["--out", str(single), "--steps", "4", "--accum", "2"])  # one thread, as each worker
    finally:
        torch.set_num_threads(threads)
    want = torch.load(single / "final_rank0.pt")
    rank0, rank1 = torch.load(out / "final_rank0.pt"), torch.load(out / "final_rank1.pt")
    for name in want:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(rank0[name], want[name], rtol=0, atol=1e-6, msg=name)
