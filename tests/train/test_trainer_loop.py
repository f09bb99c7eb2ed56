"""The training loop on CPU with a tiny MLP: schedule, accumulation, exact resume, logs, bad input."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from feedrank.config import ConfigError, from_dict
from feedrank.data.batch import Batch
from feedrank.train import CheckpointError, Trainer, TrainConfig, latest_checkpoint, load_checkpoint, lr_at

_spec = importlib.util.spec_from_file_location("train_toy", Path(__file__).with_name("ddp_worker.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _cfg(out: Path, **overrides) -> TrainConfig:
    base = {"steps": 10, "lr": 0.05, "warmup_steps": 2, "log_every": 1, "device": "cpu",
            "progress": False, "out_dir": str(out)}
    return from_dict(TrainConfig, base | overrides)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, model=None, data=None, evaluate=None, **overrides):
    model = model or toy.TinyMLP()
    with Trainer(model, toy.mse_loss, _cfg(out, **overrides)) as trainer:
        trainer.resume()
        result = trainer.fit(data or toy.make_data(micro=4), evaluate=evaluate)
    return model, result


# ----------------------------------------------------------------------------- config and schedule

def test_lr_schedule_hand_computed():
    cfg = from_dict(TrainConfig, {"steps": 10, "lr": 1.0, "warmup_steps": 2, "min_lr_ratio": 0.1})
    got = [lr_at(s, cfg, 10) for s in (0, 1, 2, 6, 10)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])
    const = from_dict(TrainConfig, {"steps": 10, "lr": 1.0, "schedule": "constant"})
    assert [lr_at(s, const, None) for s in (0, 9)] == [1.0, 1.0]


@pytest.mark.parametrize("data, message", [
    ({"stepz": 3}, "unknown key(s) 'stepz'"),
    ({"steps": 3, "epochs": 1}, "exactly one of 'steps' and 'epochs'"),
    ({"grad_accum_steps": 0}, "grad_accum_steps: must be > 0"),
    ({"betas": [0.9]}, "betas: expected two values"),
    ({"precision": "fp8"}, "precision: expected one of"),
    ({"strategy": "fsdp", "precision": "fp16"}, "'fp16' is not supported with strategy 'fsdp'"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(TrainConfig, data, "train")


# ----------------------------------------------------------------------------- the loop

def test_fit_logs_every_step_and_learns(tmp_path):
    _, result = _train(tmp_path, steps=30)
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "lr", "grad_norm", "examples_per_s", "pred_mean", "epoch"} <= set(records[0])
    cfg = _cfg(tmp_path, steps=30)
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, cfg, 30) for s in range(30)])
    # 24 batches of 4 rows make one epoch of 96 rows.
    assert [r["epoch"] for r in records[22:26]] == [0, 0, 1, 1]
    first, last = sum(r["loss"] for r in records[:4]), sum(r["loss"] for r in records[-4:])
    assert last < 0.5 * first
    assert result.status == "completed" and result.step == 30
    assert result.checkpoint == latest_checkpoint(tmp_path / "checkpoints")
    assert result.metrics["step"] == 30


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    small, _ = _train(tmp_path / "a", data=toy.make_data(micro=4), grad_accum_steps=2, steps=8)
    big, _ = _train(tmp_path / "b", data=toy.make_data(micro=8), grad_accum_steps=1, steps=8)
    for (name, a), b in zip(small.state_dict().items(), big.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # The logged loss is the mean over the step's micro-batches, i.e. the big batch's loss.
    la = [r["loss"] for r in _metrics(tmp_path / "a")]
    lb = [r["loss"] for r in _metrics(tmp_path / "b")]
    assert la == pytest.approx(lb, abs=1e-6)


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    """Dropout (RNG), accumulation across epoch boundaries (7 micro-batches per epoch, accum 2)."""
    overrides = {"steps": 20, "grad_accum_steps": 2, "checkpoint_every": 4, "keep_checkpoints": 2}
    data = toy.make_data(micro=12, shards=1)  # 96 / 12 = 8 batches per epoch
    data7 = lambda epoch: (b for i, b in enumerate(data(epoch)) if i < 7)  # noqa: E731
    straight, _ = _train(tmp_path / "straight", model=toy.TinyMLP(dropout=0.3), data=data7, **overrides)

    out = tmp_path / "stopped"
    model = toy.TinyMLP(dropout=0.3)
    with Trainer(model, toy.mse_loss, _cfg(out, **overrides)) as trainer:
        def stopping(epoch):
            for i, batch in enumerate(data7(epoch)):
                if epoch == 2 and i == 5:  # micro-batch 20 overall: the 2nd one of step 10
                    trainer.request_stop()
                yield batch
        first = trainer.fit(stopping)
    assert (first.status, first.step) == ("preempted", 10)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_000000008.pt", "ckpt_000000010.pt"]
    state = load_checkpoint(first.checkpoint)["state"]
    assert (state["epoch"], state["batches_in_epoch"]) == (2, 6)

    resumed, second = _train(out, model=toy.TinyMLP(dropout=0.3, seed=99), data=data7, **overrides)
    assert (second.status, second.step) == ("completed", 20)
    losses = [r["loss"] for r in _metrics(out)]
    assert losses == [r["loss"] for r in _metrics(tmp_path / "straight")]  # bit-for-bit, no duplicates
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_of_a_finished_run_is_a_no_op(tmp_path):
    model, _ = _train(tmp_path, steps=3)
    again, result = _train(tmp_path, model=toy.TinyMLP(seed=5), steps=3)
    assert result.status == "completed" and result.step == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert len(_metrics(tmp_path)) == 3


def test_epochs_mode_counts_steps_from_len(tmp_path):
    data = toy.make_data(micro=8, shards=2)  # 6 batches of 16 rows per epoch
    sized = lambda epoch: list(data(epoch))  # noqa: E731
    _, result = _train(tmp_path, data=sized, steps=None, epochs=2, grad_accum_steps=4)
    assert result.step == 3  # 2 epochs * 6 micro-batches / 4 per step
    assert _metrics(tmp_path)[-1]["lr"] == pytest.approx(lr_at(2, _cfg(tmp_path, steps=None, epochs=2), 3))


def test_epochs_mode_with_unsized_data(tmp_path, caplog):
    with pytest.raises(ValueError, match="schedule 'cosine' with 'epochs' needs data"):
        _train(tmp_path / "a", data=toy.make_data(micro=8, shards=2), steps=None, epochs=1)
    _, result = _train(tmp_path / "b", data=toy.make_data(micro=8, shards=2), steps=None, epochs=1,
                       schedule="constant", grad_accum_steps=4)
    assert result.step == 1  # 6 micro-batches: one step of 4, 2 dropped with a warning
    assert "dropping 2 trailing micro-batches" in caplog.text


def test_evaluate_hook_and_tensorboard(tmp_path):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"mse": 1.5}

    _train(tmp_path, steps=4, eval_every=2, tensorboard=True, evaluate=evaluate)
    assert calls == [False, False]  # steps 2 and 4, in eval mode
    evals = [r for r in _metrics(tmp_path) if "eval/mse" in r]
    assert [(r["step"], r["eval/mse"]) for r in evals] == [(2, 1.5), (4, 1.5)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    _, result = _train(tmp_path, steps=6, precision=precision)
    losses = [r["loss"] for r in _metrics(tmp_path)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    scaler = load_checkpoint(result.checkpoint)["scaler"]
    assert (scaler.get("scale") is not None) == (precision == "fp16")


def test_fp16_skipped_steps_and_the_loss_scale_are_reported(tmp_path, caplog):
    """A loss whose fp16 gradients overflow at the GradScaler's initial scale (65536): each such step
    is skipped and halves the scale. Before, nothing said so; now every record carries the scale and
    the skipped steps (window and total), the result metrics too, and a warning names them."""
    def big_loss(model, batch):
        loss, logs = toy.mse_loss(model, batch)
        return loss * 10.0, logs

    with caplog.at_level("WARNING", logger="feedrank.train.trainer"):
        with Trainer(toy.TinyMLP(), big_loss, _cfg(tmp_path, steps=12, log_every=4, precision="fp16")) as trainer:
            result = trainer.fit(toy.make_data(micro=4))
    records = [r for r in _metrics(tmp_path) if "loss" in r]
    skipped = [r["skipped_steps"] for r in records]
    total = result.metrics["skipped_steps_total"]
    assert 0 < total == sum(skipped) < 12 and skipped[0] > 0  # overflowed at first, then trained
    assert [r["skipped_steps_total"] for r in records] == [sum(skipped[: i + 1]) for i in range(len(skipped))]
    assert result.metrics["loss_scale"] == 65536.0 / 2**total  # halved per skip; no growth within 2000 steps
    assert load_checkpoint(result.checkpoint)["state"]["skipped_steps"] == total  # survives a resume
    assert "GradScaler skipped" in caplog.text and f"{total} in all" in caplog.text
    _train(tmp_path / "fp32", steps=2)
    assert not {"loss_scale", "skipped_steps"} & set(_metrics(tmp_path / "fp32")[-1])


def test_feedrank_batch_objects_are_moved_and_counted(tmp_path):
    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(3):
            b, z = 5, torch.zeros(5, dtype=torch.long)
            f = torch.rand(b, generator=g)
            yield Batch(user=z, user_cats=z[:, None], history=z[:, None], history_mask=z[:, None].bool(),
                        item=z, item_cats=z[:, None], item_age_h=f, counters=torch.rand(b, 8, generator=g),
                        position=z, clicked=(f > 0.5).float(), dwell_s=f, shared=f, hidden=f, weight=f + 1,
                        item_logq=f, request=z)

    def loss_fn(model, batch):
        logits = model(batch.counters)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.clicked, batch.weight), {}

    with Trainer(toy.TinyMLP(), loss_fn, _cfg(tmp_path, steps=3, schedule="constant")) as trainer:
        trainer.fit(batches)
    assert trainer.state.examples == 15
    assert _metrics(tmp_path)[-1]["examples_per_s"] > 0


# ----------------------------------------------------------------------------- bad input

def test_nan_loss_fails_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss, logs = toy.mse_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 4 else loss), logs

    with Trainer(toy.TinyMLP(), sometimes_nan, _cfg(tmp_path, checkpoint_every=2)) as trainer:
        with pytest.raises(FloatingPointError, match=r"non-finite loss at or before step 4 .*ckpt_000000002\.pt"):
            trainer.fit(toy.make_data(micro=4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_000000002.pt"]
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("loss_fn, error, message", [
    (lambda m, b: m(b["x"]).mean(), TypeError, "must return \\(loss: scalar Tensor"),
    (lambda m, b: (m(b["x"]), {}), TypeError, "must return \\(loss: scalar Tensor"),
    (lambda m, b: (m(b["x"]).mean().detach(), {}), ValueError, "does not require grad"),
])
def test_bad_loss_fn_output(tmp_path, loss_fn, error, message):
    with Trainer(toy.TinyMLP(), loss_fn, _cfg(tmp_path)) as trainer:
        with pytest.raises(error, match=message):
            trainer.fit(toy.make_data(micro=4))


def test_empty_epoch_and_unmovable_batch(tmp_path):
    with Trainer(toy.TinyMLP(), toy.mse_loss, _cfg(tmp_path)) as trainer:
        with pytest.raises(ValueError, match=r"data\(epoch=0\) yielded no batches"):
            trainer.fit(lambda epoch: iter(()))
        with pytest.raises(TypeError, match="cannot move a batch of type str"):
            trainer.fit(lambda epoch: iter(["not a batch"]))


def test_resume_from_truncated_checkpoint_is_a_clear_error(tmp_path):
    _, result = _train(tmp_path, steps=2)
    result.checkpoint.write_bytes(result.checkpoint.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _train(tmp_path, steps=4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
def test_compiled_model_trains_like_eager(tmp_path):
    eager, _ = _train(tmp_path / "eager", steps=3)
    compiled, _ = _train(tmp_path / "compiled", steps=3, compile=True)
    for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
