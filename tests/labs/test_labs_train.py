"""The precision and quantize labs: their measurements on hand-built inputs, quantize_ranker, and each
lab's result.json in quick mode on a tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.labs import precision, quantize
from feedrank.labs.base import LabContext, read_result, write_result
from feedrank.models.quantize import DEFAULT_MIN_LINEAR_PARAMS, QUANTIZE_MODES, model_bytes, quantize_ranker
from feedrank.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_world")
    simulate(WorldConfig(users=300, items=150, days=4, seed=1), path)
    return path


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("labs")


def tiny_ctx(root: Path, log: Path, name: str) -> LabContext:
    return LabContext(root=root, name=name, log=log, quick=True)


# ------------------------------------------------------------------------------------------------ precision


def test_underflow_stats_counts_values_below_the_fp16_subnormal():
    # 1100 non-zero values: 250 far below 2^-24 (round to 0), 100 just below it (round up to 2^-24,
    # not to 0), 250 fp16 subnormals, 500 normal; the 100 zeros are not counted.
    g = torch.cat([torch.full((250,), 1e-9), torch.full((100,), 4e-8), torch.full((250,), -1e-6),
                   torch.full((500,), 1e-2), torch.zeros(100)])  # fmt: skip
    stats = precision.underflow_stats([g[:600].reshape(20, 30), g[600:]])
    assert stats["nonzero"] == 1100
    assert stats["below_subnormal"] == pytest.approx(350 / 1100)
    assert stats["subnormal_or_below"] == pytest.approx(600 / 1100)
    assert stats["zeroed_fp16"] == pytest.approx(250 / 1100)
    assert stats["zeroed_bf16"] == 0.0  # bf16 has fp32's exponent range


def test_zeroed_share_and_lost_updates():
    ref = [torch.tensor([1e-9, 1e-3, 0.0, 2.0])]
    assert precision.zeroed_share(ref, [torch.tensor([0.0, 1e-3, 0.0, 2.0])]) == pytest.approx(1 / 3)
    before = [torch.ones(4)]
    after = [torch.tensor([1.0 + 1e-4, 1.0 + 1e-2, 1.0, 1.0 + 3e-3])]  # bf16 ulp at 1: 2^-7; fp16: 2^-10
    assert precision.lost_updates(before, after, torch.bfloat16) == pytest.approx(2 / 3)
    assert precision.lost_updates(before, after, torch.float16) == pytest.approx(1 / 3)
    assert precision.lost_updates(before, after, torch.float32) == 0.0


def test_scale_trace_reports_the_step_a_forced_inf_skipped(tmp_path):
    model = nn.Linear(4, 1)
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 3 else grad

    model.weight.register_hook(poison)
    # Small inputs: the scaled gradients (x 65536) stay inside fp16's range, so only the forced inf skips.
    x, y = 1e-3 * torch.randn(8, 4), 1e-3 * torch.randn(8, 1)
    loss_fn = lambda m, batch: (((m(batch[0]).float() - batch[1]) ** 2).mean(), {})  # noqa: E731
    cfg = TrainConfig(steps=6, lr=1e-2, precision="fp16", device="cpu", progress=False, log_every=1,
                      out_dir=str(tmp_path))  # fmt: skip
    trainer = Trainer(model, loss_fn, cfg)
    trace, stamps = precision.ScaleTrace(), []
    trainer.fit(precision.traced([(x, y)] * 6, trainer, trace, stamps))
    trace.observe(trainer)
    assert trace.skipped_steps == [3]
    assert trace.scales == [65536.0] * 3 + [32768.0] * 4  # backoff 0.5; growth only after 2000 good steps
    assert len(stamps) == 6
    # The skipped step really skipped: AdamW took 5 steps, not 6.
    assert int(trainer.optimizer.state[model.weight]["step"]) == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------ quantize


@pytest.fixture(scope="module")
def ranker_and_batch(tiny_log, tiny_root):
    ctx = tiny_ctx(tiny_root, tiny_log, "quantize_unit")
    model = precision.build_lab_ranker(ctx).eval()
    return model, ctx.batches(1, 256)[0]


def tensor_bytes(model: nn.Module) -> int:
    """Storage bytes of the tensors in ``model``'s state dict."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))


@pytest.mark.parametrize("mode,tol", [("none", 0.0), ("fp16_embeddings", 1e-3), ("int8_embeddings", 1e-2),
                                      ("int8_linear", 5e-2), ("int8", 5e-2),
                                      ("bf16_linear", 2e-2)])  # fmt: skip
def test_quantize_ranker_keeps_outputs_close_and_shrinks_bytes(ranker_and_batch, mode, tol):
    model, batch = ranker_and_batch
    q = quantize_ranker(model, mode)
    ref, out = model.predict(batch), q.predict(batch)
    assert (out["click"] - ref["click"]).abs().max() <= tol
    assert torch.corrcoef(torch.stack([out["value"], ref["value"]]))[0, 1] >= 0.99
    # Bytes. Embedding modes, exactly, in tensor storage: fp16 keeps 2 of 4 bytes a value; int8 keeps
    # 1 byte a value plus an fp32 scale and offset a row. (The serialised size would add torch.save's
    # fixed cost per tensor, which outweighs a tiny test table's saving.) Linear modes: int8 weights
    # live in packed params, so the serialised size, which shrinks by at least half.
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    if mode in ("fp16_embeddings", "int8_embeddings"):
        per_table = (lambda w: 2 * w.numel()) if mode == "fp16_embeddings" else (lambda w: 3 * w.numel() - 8 * w.shape[0])
        assert tensor_bytes(model) - tensor_bytes(q) == sum(per_table(w) for w in tables)
    else:
        linears = sum(4 * m.weight.numel() for m in model.modules()
                      if isinstance(m, nn.Linear) and m.weight.numel() >= DEFAULT_MIN_LINEAR_PARAMS)  # fmt: skip
        converted = {"none": 0, "int8_linear": linears, "int8": 4 * sum(w.numel() for w in tables) + linears,
                     "bf16_linear": linears / 2}[mode]  # bf16 keeps 2 of a weight's 4 bytes  # fmt: skip
        saved = model_bytes(model) - model_bytes(q)
        assert saved >= 0.45 * converted if mode != "none" else saved == 0
    # The input model is left as it was (serving may keep it for comparison).
    assert isinstance(model.item_id, nn.Embedding)


def test_quantize_ranker_int8_shrinks_most_and_rejects_bad_input(ranker_and_batch):
    model, _ = ranker_and_batch
    sizes = {mode: model_bytes(quantize_ranker(model, mode)) for mode in QUANTIZE_MODES}
    assert sizes["int8"] == min(sizes.values())
    with pytest.raises(ValueError, match="unknown quantize mode"):
        quantize_ranker(model, "int4")  # type: ignore[arg-type]


def test_bf16_cross_layer_splits_the_user_columns_like_the_whole_layer():
    """``first_one_user`` projects a bf16 layer's user columns once; the result equals the layer
    applied to every row up to bf16's rounding of each GEMM's output (2^-8 relative, two partial
    products instead of one); a wrong column slice or a dropped or doubled bias is off by ~0.1-1."""
    from feedrank.models.interactions import CrossLayer
    from feedrank.models.quantize import BF16Linear

    torch.manual_seed(0)
    for rank in (0, 4):
        layer = CrossLayer(24, rank).eval()
        layer.project = (nn.Sequential(BF16Linear(layer.project[0]), layer.project[1]) if rank
                         else BF16Linear(layer.project))  # fmt: skip
        user, items = torch.randn(10), torch.randn(7, 14)
        x0 = torch.cat([user.expand(7, -1), items], dim=1)
        torch.testing.assert_close(layer.first_one_user(x0, user, items), layer(x0, x0), rtol=2e-2, atol=2e-2)


def test_bf16_linear_pads_rows_to_a_bucket_and_each_row_keeps_its_own_output():
    """The GEMM sees row counts rounded up to ``ROW_BUCKET`` (a few kernel shapes, not one per
    candidate count); the output has the input's rows, each the plain bf16 product of its own row
    (padding rows cannot leak in: they are zeros, and a row's dot products are its own)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from feedrank.models.quantize import ROW_BUCKET, BF16Linear

    class GemmRows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.rows.append(args[-2].shape[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    layer = BF16Linear(linear)
    x = torch.randn(3 * ROW_BUCKET + 5, 24)
    for rows in (1, ROW_BUCKET - 1, ROW_BUCKET, ROW_BUCKET + 1, len(x)):
        with GemmRows() as seen:
            out = layer(x[:rows])
        assert seen.rows == [-(-rows // ROW_BUCKET) * ROW_BUCKET]
        assert out.shape == (rows, 16) and out.dtype == torch.float32
        plain = (x[:rows].bfloat16() @ linear.weight.detach().bfloat16().t()).float() + linear.bias.detach()
        torch.testing.assert_close(out, plain, rtol=1e-2, atol=1e-2)  # GEMM kernels may block rows differently
        torch.testing.assert_close(out, linear(x[:rows]).detach(), rtol=5e-2, atol=5e-2)



def test_int8_embedding_keeps_the_padding_row_zero():
    from feedrank.models.quantize import Int8Embedding

    table = nn.Embedding(10, 8, padding_idx=0)
    q = Int8Embedding(table)
    idx = torch.tensor([[0, 3], [9, 0]])[:, 1]  # a non-contiguous index column, as item_cats[:, j] is
    assert torch.equal(q(torch.tensor([0])), torch.zeros(1, 8))
    span = (table.weight.max(1).values - table.weight.min(1).values)[idx]
    assert ((q(idx) - table(idx)).abs().max(1).values <= span / 510 + 1e-6).all()


# ------------------------------------------------------------------------------------------------ the labs


@pytest.mark.slow
@pytest.mark.parametrize("lab", [precision, quantize], ids=["precision", "quantize"])
def test_lab_result_schema_in_quick_mode(tiny_log, tiny_root, lab):
    ctx = tiny_ctx(tiny_root, tiny_log, lab.NAME)
    path = write_result(ctx, lab.run(ctx))
    result = read_result(path)
    assert (result.name, result.title, result.quick, result.device) == (lab.NAME, lab.TITLE, True, "cpu")
    assert result.summary and result.plots and result.tables
    for plot in result.plots:
        assert (ctx.out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for table in result.tables:
        assert table.rows and all(len(row) == len(table.columns) for row in table.rows)
    raw = json.loads(path.read_text())
    if lab is precision:
        assert set(raw["figures"]["runs"]) == {f"{m}/{p}" for m in ("two_tower", "ranker") for p in precision.PRECISIONS}
        for run in raw["figures"]["runs"].values():
            assert len(run["scales"]) == raw["figures"]["steps"] + 1 and 0 < run["step_ms_min"] <= run["step_ms_median"]
        for stats in raw["figures"]["fp16_losses"].values():
            assert 0.0 <= stats["below_subnormal"] <= stats["subnormal_or_below"] <= 1.0
    else:
        assert set(raw["figures"]["variants"]) == set(quantize.VARIANTS)
        for v in raw["figures"]["variants"].values():
            assert v["bytes"] > 0 and 0 < v["latency_ms"]["min"] <= v["latency_ms"]["p50"] and 0.0 <= v["auc"] <= 1.0
            assert isinstance(v["passes"], bool)
        assert raw["figures"]["tolerance"] == quantize.TOLERANCE
