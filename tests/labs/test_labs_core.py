"""The labs framework and the attention and checkpointing labs.

Equivalences that can fail: the three attention kernels (forward and gradients, 1e-5 fp32); the
from-scratch checkpoint against ``torch.utils.checkpoint`` and no checkpointing (every parameter,
the input, dropout on). The registry's errors, the page builder, the CLI's clean errors, and the
``result.json`` schema of both labs run for real on the tiny world (slow), whose page is then
loaded in headless Chromium (no console messages; every section and plot present). No timing is
asserted anywhere: timings are the labs' output, not their correctness.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import feedrank.labs as labs
from feedrank.labs import attention as attention_lab
from feedrank.labs import checkpointing as ckpt
from feedrank.labs.base import RESULT_FILE, LabContext, LabResult, SavedTensors, Table, read_result, write_result
from feedrank.labs.page import PAGE_FILE, build_page
from feedrank.models.attention import ATTENTION_IMPLS, MultiHeadAttention
from feedrank.models.towers import TransformerHistoryEncoder


# ------------------------------------------------------------------------------------------------
# equivalences


def test_three_attention_kernels_agree_forward_and_gradients():
    attn = MultiHeadAttention(dim=16, n_heads=2)
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # a user with no history: finite, not NaN, in every kernel
    grad_out = torch.randn(3, 7, 16)
    ref_out, ref_grads = attention_lab.forward_backward(attn, "einsum", x, mask, grad_out)
    assert torch.isfinite(ref_out).all()
    for impl in ATTENTION_IMPLS:
        out, grads = attention_lab.forward_backward(attn, impl, x, mask, grad_out)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert len(grads) == 1 + len(list(attn.parameters()))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    diffs = attention_lab.agreement(attn, x, mask)
    assert set(diffs) == set(ATTENTION_IMPLS) and all(d["ratio"] <= 1.0 for d in diffs.values())


def test_tolerance_ratio_fails_a_wrong_result():
    a = torch.randn(4, 8)
    assert attention_lab.tolerance_ratio(a, a) == 0.0
    assert attention_lab.tolerance_ratio(a + 1e-3, a) > 1.0


def _encoder(policy: str, method: str, dropout: float = 0.1) -> TransformerHistoryEncoder:
    torch.manual_seed(3)
    encoder = TransformerHistoryEncoder(dim=8, n_heads=2, n_layers=4, max_len=6, dropout=dropout).train()
    return ckpt.apply_policy(encoder, policy, method)


@pytest.mark.parametrize("policy", ["every other layer", "every layer"])
def test_from_scratch_checkpoint_gradients_equal_torch_checkpoint_and_none(policy):
    emb = torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 3:] = False
    none = ckpt.step_grads(_encoder("none", "from scratch"), emb, mask, seed=11)
    ours = ckpt.step_grads(_encoder(policy, "from scratch"), emb, mask, seed=11)
    theirs = ckpt.step_grads(_encoder(policy, "torch.utils.checkpoint"), emb, mask, seed=11)
    assert none.keys() == ours.keys() == theirs.keys() and len(none) > 10
    for name in none:
        torch.testing.assert_close(ours[name], none[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)
    # without replaying the RNG, dropout would draw other masks in the recomputation: the check can fail
    assert ckpt.max_grad_diff(none, ckpt.step_grads(_encoder("none", "from scratch"), emb, mask, seed=12)) > 1e-4


def test_from_scratch_checkpoint_input_gradient_rng_and_saved_bytes():
    layer = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 5))
    x = torch.randn(4, 5, requires_grad=True)

    def run(wrap):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        with SavedTensors(exclude=[*layer.parameters(), x]) as saved:
            y = wrap(layer, x)
        y.square().sum().backward()
        return x.grad.clone(), [p.grad.clone() for p in layer.parameters()], torch.get_rng_state(), saved.bytes

    plain_x, plain_p, plain_rng, plain_bytes = run(lambda f, a: f(a))
    ours_x, ours_p, ours_rng, ours_bytes = run(ckpt.checkpoint)
    torch.testing.assert_close(ours_x, plain_x, atol=1e-6, rtol=0)
    for a, b in zip(ours_p, plain_p):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(ours_rng, plain_rng)  # the caller's RNG advanced exactly as without checkpointing
    assert plain_bytes > 0 and ours_bytes == 0  # only the input is kept, and the input is excluded
    with torch.no_grad():
        assert not ckpt.checkpoint(layer, x).requires_grad


def test_checkpoint_policies_choose_layers():
    assert ckpt.checkpointed_layers("none", 4) == []
    assert ckpt.checkpointed_layers("every other layer", 4) == [0, 2]
    assert ckpt.checkpointed_layers("every layer", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown checkpointing policy"):
        ckpt.checkpointed_layers("some", 4)


def test_saved_tensors_counts_unique_storages_once():
    w = torch.randn(6, 6, requires_grad=True)
    with SavedTensors(exclude=[w]) as saved:
        h = w.exp()  # exp saves its output h
        y = (h[:, :3] * h[:, 3:]).sum()  # two views of h saved by mul: the same storage again
    assert [shapes for _, shapes in saved.storages] == [[(6, 6), (6, 3), (6, 3)]]
    assert saved.bytes == saved.largest == 6 * 6 * 4
    y.backward()
    with SavedTensors(exclude=[w]) as saved:
        (w * 2).sum()  # mul by a scalar saves nothing; w itself is excluded
    assert saved.bytes == 0


# ------------------------------------------------------------------------------------------------
# registry, page, CLI


def test_registry_order_and_clear_errors(monkeypatch):
    assert labs.LABS == ("attention", "checkpointing", "precision", "compile", "ddp", "profile", "quantize")
    assert labs.resolve(["all"]) == list(labs.LABS)
    assert labs.resolve(["checkpointing", "attention", "checkpointing"]) == ["checkpointing", "attention"]
    with pytest.raises(labs.UnknownLabError, match=r"unknown lab 'nope'; known: attention, checkpointing, precision"):
        labs.load_lab("nope")
    monkeypatch.setattr(labs, "LABS", (*labs.LABS, "not_written_yet"))
    with pytest.raises(labs.UnknownLabError, match="feedrank.labs.not_written_yet does not exist"):
        labs.run_all(Path("/nonexistent"), ["not_written_yet"])
    assert labs.load_lab("attention") is attention_lab


def _png(path: Path, color: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0], color=color)
    fig.savefig(path)
    plt.close(fig)


def _fake_results(root: Path) -> None:
    for name, plots in (("checkpointing", ["curve.png"]), ("attention", ["a.png", "b.png"]), ("extra_lab", [])):
        ctx = LabContext(root=root, name=name)
        for plot in plots:
            _png(ctx.out / plot, "C1")
        write_result(ctx, LabResult(name=name, title=f"Title of <{name}>", summary="First & one.\n\nSecond.",
                                    tables=[Table("t", ["k", "v"], [["x", 0.123456], ["y", None]])], plots=plots,
                                    elapsed_s=1.5))  # fmt: skip


def test_page_has_a_section_per_result_in_registry_order(tmp_path):
    _fake_results(tmp_path)
    html = build_page(tmp_path).read_text()
    sections = re.findall(r'<section id="lab-(\w+)">', html)
    assert sections == ["attention", "checkpointing", "extra_lab"]  # registered first, in order; others after
    assert html.count("data:image/png;base64,") == 3 and 'data-plot="curve.png"' in html
    assert "Title of &lt;attention&gt;" in html and "<p>First &amp; one.</p><p>Second.</p>" in html
    assert "<td>0.1235</td>" in html and "http" not in html.replace("http-equiv", "")  # nothing to fetch
    (tmp_path / "attention" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="a.png"):
        build_page(tmp_path)


def test_result_json_round_trips(tmp_path):
    ctx = LabContext(root=tmp_path, name="attention", quick=True)
    result = LabResult(name="attention", title="T", summary="S", tables=[Table("t", ["a"], [[1]])],
                       figures={"x": {"y": [1, 2]}}, quick=True, elapsed_s=2.0)  # fmt: skip
    assert read_result(write_result(ctx, result)) == result


def test_cli_errors_are_one_line(tmp_path):
    from feedrank.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["lab", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown lab 'nope'; known: attention" in result.output
    result = runner.invoke(app, ["lab", "attention", "--out", str(tmp_path), "--log", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such log directory" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["lab", "attention", "--out", str(tmp_path), "--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA GPU is available" in result.output
    assert not any(tmp_path.iterdir())  # nothing ran


def test_command_module_is_cheap_to_import():
    code = "import sys, feedrank.commands.lab; print(sorted(m for m in ('torch', 'feedrank.labs') if m in sys.modules))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# both labs for real, on the tiny world


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("labs")
    results = labs.run_all(root, ["attention", "checkpointing"], tiny=True)
    return root, {r.name: r for r in results}


def _check_schema(root: Path, result: LabResult, name: str) -> LabResult:
    stored = read_result(root / name / RESULT_FILE)
    assert stored == result and stored.name == name and stored.quick and stored.device == "cpu"
    assert stored.title and stored.summary and stored.elapsed_s is not None and stored.elapsed_s >= 0
    assert stored.tables and all(len(row) == len(t.columns) for t in stored.tables for row in t.rows)
    assert stored.plots and all((root / name / p).is_file() for p in stored.plots)
    return stored


@pytest.mark.slow
def test_attention_result_schema(lab_run):
    root, results = lab_run
    r = _check_schema(root, results["attention"], "attention")
    f = r.figures
    assert f["agree"] is True and f["tolerance"] == 1e-5
    assert {k["impl"] for k in f["kernels"]} == set(ATTENTION_IMPLS)
    assert {(k["length"], k["batch"]) for k in f["kernels"]} == {(n, b) for n in (8, 16) for b in (2, 3)}
    for k in f["kernels"]:
        assert k["ms"] > 0 and k["saved_bytes"] > 0 and k["largest_bytes"] > 0
    sdpa = [k for k in f["kernels"] if k["impl"] == "sdpa"]
    assert all(k["copies"] == 0 for k in sdpa)  # measured, and the summary's argument depends on it
    assert all(k["copies"] > 0 for k in f["kernels"] if k["impl"] != "sdpa")
    product = f["product"]
    assert set(product["ndcg@10"]) == {"mean", "transformer"} == set(product["latency"])
    for lat in product["latency"].values():
        assert lat["requests"] == 10 and lat["tower_share"] == 1.0 and lat["p99_ms"] >= lat["p50_ms"] > 0
    assert product["decision"].startswith("A transformer pays for itself only if") and product["decision"] in r.summary
    assert sorted(r.plots) == ["saved_bytes_vs_length.png", "time_vs_length.png"]


@pytest.mark.slow
def test_checkpointing_result_schema(lab_run):
    root, results = lab_run
    r = _check_schema(root, results["checkpointing"], "checkpointing")
    f = r.figures
    assert f["agree"] is True and f["builtin_grad_diff"] <= f["grad_tolerance"]
    runs = f["runs"]
    assert {(x["policy"], x["method"]) for x in runs} == {("none", "-")} | {
        (p, m) for p in ckpt.POLICIES[1:] for m in ckpt.METHODS}
    for length in (8, 16):
        saved = {(x["policy"], x["method"]): x["saved_bytes"] for x in runs if x["length"] == length}
        # fewer layers keep their activations: strictly less saved, and both implementations keep the same
        assert saved[("none", "-")] > saved[("every other layer", "from scratch")] > saved[("every layer", "from scratch")]
        for p in ckpt.POLICIES[1:]:
            assert saved[(p, "from scratch")] == saved[(p, "torch.utils.checkpoint")]
    assert r.plots == ["saved_bytes_vs_step_time.png"]


@pytest.mark.slow
def test_labs_page_in_headless_chromium(lab_run, tmp_path, browser):
    root, results = lab_run
    page = root / PAGE_FILE
    result = browser.chromium(page, tmp_path / "profile", "--dump-dom")
    assert browser.console_lines(result.stderr) == []
    dom = result.stdout
    for name, r in results.items():
        section = re.search(rf'<section id="lab-{name}">.*?</section>', dom, flags=re.S)
        assert section is not None and "<table>" in section.group(0)
        for plot in r.plots:
            assert f'data-plot="{plot}"' in section.group(0)
    assert dom.count("data:image/png;base64,") == sum(len(r.plots) for r in results.values())
