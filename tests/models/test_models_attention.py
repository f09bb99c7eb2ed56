"""The three attention kernels compute one function, mask correctly and never produce NaN."""

from __future__ import annotations

import math

import pytest
import torch

from feedrank.models.attention import ATTENTION_IMPLS, MultiHeadAttention, attend


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_attend_matches_hand_computed_example_and_ignores_masked_key(impl):
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]).view(1, 1, 3, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]).view(1, 1, 3, 2)
    out = attend(q, k, v, _mask([2], 3), impl)
    w = 1.0 / (1.0 + math.exp(-1.0 / math.sqrt(2.0)))  # softmax([1/sqrt(2), 0])[0]
    expected = torch.tensor([w * 1 + (1 - w) * 3, w * 2 + (1 - w) * 4])
    torch.testing.assert_close(out.view(2), expected)


def test_all_kernels_agree_with_padding_and_fully_masked_rows():
    torch.manual_seed(0)
    b, h, lq, lk, d = 4, 3, 5, 7, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (lq, lk, lk))
    mask = _mask([7, 3, 0, 1], lk)
    outs, grads = {}, {}
    for impl in ATTENTION_IMPLS:
        out = attend(q, k, v, mask, impl)
        (out * torch.linspace(-1, 1, d)).sum().backward()
        outs[impl] = out.detach()
        grads[impl] = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
    for impl in ATTENTION_IMPLS:
        assert torch.isfinite(outs[impl]).all() and all(torch.isfinite(g).all() for g in grads[impl])
        torch.testing.assert_close(outs[impl], outs["einsum"], atol=1e-5, rtol=1e-5)
        for g, g_ref in zip(grads[impl], grads["einsum"]):
            torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs["sdpa"][2], torch.zeros(h, lq, d))  # the user with no keys


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_module_padding_invariance(impl):
    torch.manual_seed(1)
    mha = MultiHeadAttention(dim=8, n_heads=2, impl=impl).eval()
    x = torch.randn(3, 4, 8)
    mask = _mask([4, 2, 0], 4)
    padded = torch.cat([x, torch.randn(3, 3, 8)], dim=1)  # garbage in the new padded slots
    out = mha(x, x, mask)
    out_padded = mha(padded, padded, torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(out_padded[:, :4][mask], out[mask], atol=1e-6, rtol=1e-5)


def test_module_kernels_agree_with_same_weights():
    torch.manual_seed(2)
    modules = {impl: MultiHeadAttention(dim=12, n_heads=3, impl=impl).eval() for impl in ATTENTION_IMPLS}
    for m in modules.values():
        m.load_state_dict(modules["einsum"].state_dict())
    x = torch.randn(4, 6, 12)
    query = torch.randn(4, 1, 12)
    mask = _mask([6, 1, 0, 4], 6)
    for impl, m in modules.items():
        torch.testing.assert_close(m(x, x, mask), modules["einsum"](x, x, mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(query, x, mask), modules["einsum"](query, x, mask), atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    q = torch.zeros(2, 1, 3, 4)
    k = torch.zeros(2, 1, 5, 4)
    with pytest.raises(ValueError, match=r"key_mask must be bool \[B, Lk\] = \[2, 5\].*\(2, 4\)"):
        attend(q, k, k, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attend(q, k, k, torch.ones(2, 5, dtype=torch.bool), impl="flash")
    with pytest.raises(ValueError, match="not divisible by n_heads 3"):
        MultiHeadAttention(dim=8, n_heads=3)
