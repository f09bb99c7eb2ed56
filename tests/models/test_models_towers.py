"""History encoders: empty histories, padding invariance, order sensitivity, checkpointing, bad input."""

from __future__ import annotations

import pytest
import torch

from feedrank.models.towers import build_history_encoder, check_history, masked_mean

DIM = 8


def _encoder(kind: str, **kw):
    torch.manual_seed(0)
    defaults = {"n_heads": 2, "n_layers": 2, "max_len": 12, "dropout": 0.0}
    if kind == "attention" and kw.get("query") == "user":
        defaults["context_dim"] = 5
    return build_history_encoder(kind, DIM, **{**defaults, **kw})


ENCODERS = [
    ("mean", {}),
    ("attention", {"query": "learned"}),
    ("attention", {"query": "user"}),
    ("transformer", {"pooling": "mean"}),
    ("transformer", {"pooling": "last"}),
]
IDS = ["mean", "attn-learned", "attn-user", "tf-mean", "tf-last"]


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, DIM, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 0, 1])[:, None]
    context = torch.randn(4, 5, generator=g)
    return x, mask, context


def test_masked_mean_by_hand():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[7.0], [7.0], [7.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[2.0], [0.0]]))


@pytest.mark.parametrize("kind,kw", ENCODERS, ids=IDS)
def test_shapes_empty_history_is_zero_and_padding_is_invisible(kind, kw):
    enc = _encoder(kind, **kw).eval()
    x, mask, context = _inputs()
    out = enc(x, mask, context)
    assert out.shape == (4, DIM) and torch.isfinite(out).all()
    assert torch.equal(out[2], torch.zeros(DIM))  # the user with no history
    # Longer right padding filled with garbage must not change anything.
    x_pad = torch.cat([x, torch.randn(4, 3, DIM)], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(enc(x_pad, mask_pad, context), out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,kw,order_matters", [
    ("mean", {}, False),
    ("attention", {"query": "learned"}, False),
    ("transformer", {"pooling": "mean"}, True),
    ("transformer", {"pooling": "last"}, True),
])
def test_history_order(kind, kw, order_matters):
    enc = _encoder(kind, **kw).eval()
    x, mask, context = _inputs()
    reversed_x = x.clone()
    reversed_x[0] = x[0].flip(0)  # row 0 has a full history of 5
    a, b = enc(x, mask, context)[0], enc(reversed_x, mask, context)[0]
    if order_matters:
        assert (a - b).abs().max() > 1e-3
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind,kw", [("attention", {"query": "user"}), ("transformer", {"pooling": "last"})])
def test_grad_checkpointing_same_outputs_and_gradients(kind, kw):
    x, mask, context = _inputs()
    results = []
    for ckpt in (False, True):
        enc = _encoder(kind, grad_checkpointing=ckpt, **{**kw, "dropout": 0.2}).train()
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(123)  # dropout draws must match: non-reentrant checkpoint replays the RNG
        out = enc(xi, mask, context)
        out.pow(2).sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in enc.named_parameters()}))
    (out0, gx0, gp0), (out1, gx1, gp1) = results
    torch.testing.assert_close(out1, out0)
    torch.testing.assert_close(gx1, gx0)
    assert gp0.keys() == gp1.keys()
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], msg=name)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match=r"history \(2, 5\) and history_mask \(2, 4\)"):
        check_history(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="history_mask must be bool"):
        check_history(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))
    enc = _encoder("transformer")
    with pytest.raises(ValueError, match="history length 13 exceeds the transformer's max_history_len 12"):
        enc(torch.zeros(1, 13, DIM), torch.ones(1, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="nothing to checkpoint"):
        build_history_encoder("mean", DIM, grad_checkpointing=True)
    with pytest.raises(ValueError, match="unknown history encoder 'gru'"):
        build_history_encoder("gru", DIM)
    with pytest.raises(ValueError, match="needs the user context"):
        _encoder("attention", query="user")(torch.zeros(1, 2, DIM), torch.ones(1, 2, dtype=torch.bool))
