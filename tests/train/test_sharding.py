"""TorchRec-sharded ID tables (``train.embeddings: torchrec``) train the same model as plain
``nn.Embedding``s, and their sharded checkpoints resume exactly, on another plan and world size.

The two-tower of ``sharding_worker.py`` trains on a per-row loss over a fixed global batch, so one
process on the union of the ranks' rows is the reference: same losses (1e-5), same weights."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchrec", reason="TorchRec is the optional `torchrec` extra (make test installs it)")

from feedrank.config import ConfigError, from_dict  # noqa: E402
from feedrank.train import Trainer, TrainConfig  # noqa: E402
from feedrank.train.checkpoint import checkpoint_path, load_model_state  # noqa: E402
from feedrank.train.distributed import run_torchrun  # noqa: E402
from feedrank.train.sharding import PLAN_FILE, TorchRecEmbedding, _kinds_for, swap_id_tables  # noqa: E402

WORKER = Path(__file__).with_name("sharding_worker.py")
_spec = importlib.util.spec_from_file_location("sharding_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

STEPS, HALF = 6, 3
DEADLINE_S = 300  # bounds a hang only: workers importing torch + torchrec on a loaded machine are slow


def _torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(WORKER), "--steps", str(STEPS), "--shards", "2", *args]
    returncode, stderr = run_torchrun(cmd, timeout_s=DEADLINE_S)
    assert returncode == 0, stderr[-4000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def _copy_until(src: Path, dst: Path, step: int) -> None:
    """A run directory as it was after checkpoint ``step``: that checkpoint (and its shards) only."""
    ckpt = checkpoint_path(src / "checkpoints", step)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, dst / "checkpoints" / ckpt.name)
    shutil.copytree(ckpt.with_suffix(".dcp"), dst / "checkpoints" / ckpt.with_suffix(".dcp").name)
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")  # the resume truncates it to `step`


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, plain nn.Embedding tables, on the union of both ranks' rows."""
    out = tmp_path_factory.mktemp("plain")
    model = worker.build_model()
    with Trainer(model, worker.pointwise_loss, worker.train_config(out, STEPS)) as trainer:
        trainer.fit(worker.make_data(8, shards=2))
    return _losses(out), model.state_dict()


@pytest.fixture(scope="module")
def column_wise_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cw")
    _torchrun(2, "--out", str(out), "--embeddings", "torchrec", "--sharding", "column_wise",
              "--checkpoint-every", str(HALF))
    return out


@pytest.mark.slow  # one torchrun launch of 2 workers (~20 s on 2 loaded cores)
def test_column_wise_on_two_ranks_trains_the_plain_model(reference, column_wise_run):
    want_losses, want_weights = reference
    out = column_wise_run
    assert _losses(out) == pytest.approx(want_losses, abs=1e-5)
    _assert_same_weights(torch.load(out / "final.pt"), want_weights)
    plan = json.loads((out / "checkpoints" / PLAN_FILE).read_text())
    assert plan["world_size"] == 2
    for table in plan["tables"].values():  # each table split in two column blocks, one per rank
        assert table["sharding_type"] == "column_wise" and table["compute_kernel"] == "dense"
        assert sorted(s["rank"] for s in table["shards"]) == [0, 1]
        assert {s["sizes"][1] for s in table["shards"]} == {8}
    # The checkpoint's model state is the plain model's keys, read back without a process group.
    assert set(load_model_state(checkpoint_path(out / "checkpoints", STEPS))) == set(want_weights)


@pytest.mark.slow  # one torchrun launch
def test_resume_on_another_plan_is_exact(tmp_path, reference, column_wise_run):
    """Column-wise shards written at step 3, resumed table-wise on 2 ranks: the same steps 4-6."""
    want_losses, want_weights = reference
    out = tmp_path / "tw"
    _copy_until(column_wise_run, out, HALF)
    _torchrun(2, "--out", str(out), "--embeddings", "torchrec", "--sharding", "table_wise", "--resume")
    assert _losses(out) == pytest.approx(want_losses, abs=1e-5)
    _assert_same_weights(torch.load(out / "final.pt"), want_weights)
    plan = json.loads((out / "checkpoints" / PLAN_FILE).read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"table_wise"}


@pytest.mark.slow  # one torchrun launch
def test_resume_on_another_world_size_is_exact(tmp_path, reference, column_wise_run):
    """Shards of 2 ranks resumed by 1 (which reads the union of the rows): the same steps 4-6."""
    want_losses, want_weights = reference
    out = tmp_path / "one"
    _copy_until(column_wise_run, out, HALF)
    _torchrun(1, "--out", str(out), "--embeddings", "torchrec", "--resume")
    assert _losses(out) == pytest.approx(want_losses, abs=1e-5)
    _assert_same_weights(torch.load(out / "final.pt"), want_weights)


@pytest.mark.slow  # one torchrun launch
def test_ranker_tables_table_wise_on_two_ranks_train_the_plain_ranker(tmp_path):
    steps = 4
    plain = tmp_path / "plain"
    model = worker.build_model("ranker")
    with Trainer(model, worker.pointwise_loss, worker.train_config(plain, steps)) as trainer:
        trainer.fit(worker.make_data(8, shards=2))
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--steps", str(steps), "--shards", "2", "--model", "ranker", "--out", str(out),
           "--embeddings", "torchrec", "--sharding", "table_wise"]
    returncode, stderr = run_torchrun(cmd, timeout_s=DEADLINE_S)
    assert returncode == 0, stderr[-4000:]
    assert _losses(out) == pytest.approx(_losses(plain), abs=1e-5)
    # 1e-4: plain DDP on 2 ranks is 1.8e-5 off the union here too (the DCN cross weights, where Adam
    # scales up float-level gradient differences); the sharded run is as close as DDP is.
    _assert_same_weights(torch.load(out / "final.pt"), model.state_dict(), atol=1e-4)
    plan = json.loads((out / "checkpoints" / PLAN_FILE).read_text())
    assert sorted(plan["tables"]) == ["item_id.collection.item_id", "user_id.collection.user_id"]


def test_swap_keeps_the_plain_state_dict_keys():
    model = worker.build_model()
    plain_keys = set(model.state_dict())
    weights = swap_id_tables(model)
    assert set(weights) == {"item_tower.id_embedding", "user_tower.id_embedding"}
    assert isinstance(model.item_tower.id_embedding, TorchRecEmbedding)
    assert model.item_tower.id_embedding.name == "item_tower__id_embedding"  # never items/keys/values
    assert set(model.state_dict()) == plain_keys


def test_row_wise_needs_cuda_and_unknown_devices_are_refused():
    with pytest.raises(ValueError, match="row_wise.*needs CUDA"):
        _kinds_for(torch.device("cpu"), "row_wise")
    assert "row_wise" in _kinds_for(torch.device("cuda"), "auto")
    assert _kinds_for(torch.device("cpu"), "auto") == ["table_wise", "column_wise", "table_column_wise"]


def test_config_refuses_torchrec_with_fsdp_or_compile_and_runs_only_under_torchrun(tmp_path):
    for bad in ({"strategy": "fsdp"}, {"compile": True}):
        with pytest.raises(ValueError, match="needs strategy 'ddp' and compile false"):
            from_dict(TrainConfig, {"embeddings": "torchrec", **bad}).validate()
    with pytest.raises(ConfigError):
        from_dict(TrainConfig, {"embeddings": "sharded"})
    cfg = worker.train_config(tmp_path, 1, embeddings="torchrec")
    with pytest.raises(RuntimeError, match="runs under torchrun"):
        Trainer(worker.build_model(), worker.pointwise_loss, cfg)


def test_a_model_without_known_id_tables_is_refused():
    with pytest.raises(ValueError, match="knows the ID tables of"):
        swap_id_tables(torch.nn.Linear(2, 2))

