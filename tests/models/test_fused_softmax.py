"""The fused sampled softmax equals the plain one: values and gradients, every option, and in the adapter."""

from __future__ import annotations

import pytest
import torch

from feedrank.models import losses
from feedrank.models.losses import fused_sampled_softmax_loss, sampled_softmax_loss, two_tower_loss

B, K, D = 7, 11, 5


def _inputs(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "user": torch.randn(B, D, generator=g, dtype=dtype) * 2,
        "vectors": torch.randn(K, D, generator=g, dtype=dtype),
        "pos": torch.randn(B, generator=g, dtype=dtype) * 2,
        "pos_ids": torch.tensor([5, 1, 9, 12, 3, 5, 0]),  # OOV (1) and padding (0) positives have no column
        "neg_ids": torch.tensor([3, 5, 5, 8, 2, 9, 10, 4, 6, 7, 11]),  # drawn with replacement: 5 twice
        "pos_logq": torch.randn(B, generator=g, dtype=dtype),
        "neg_logq": torch.randn(K, generator=g, dtype=dtype),
        "weight": torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 3.0, 1.0], dtype=dtype),
        "known": torch.rand(B, K, generator=g) < 0.3,
    }


def _both(x: dict[str, torch.Tensor], ids: torch.Tensor | int, logq: bool, weight: bool, known: bool, total: bool):
    """(fused, plain) loss and the gradient of each with respect to user, vectors and pos."""
    out = []
    for fused in (True, False):
        user, vectors, pos = (x[n].clone().requires_grad_() for n in ("user", "vectors", "pos"))
        args = dict(pos_logq=x["pos_logq"] if logq else None, neg_logq=x["neg_logq"] if logq else None,
                    weight=x["weight"] if weight else None, known_hits=x["known"] if known else None,
                    total_weight=torch.tensor(9.0, dtype=user.dtype) if total else None)  # fmt: skip
        if fused:
            loss = fused_sampled_softmax_loss(user, vectors, pos, x["pos_ids"], ids, **args)
        else:
            plain_ids = torch.arange(ids, ids + K) if isinstance(ids, int) else ids
            loss = sampled_softmax_loss(pos, user @ vectors.T, x["pos_ids"], plain_ids, **args)
        out.append((loss, *torch.autograd.grad(loss, [user, vectors, pos])))
    return out


@pytest.mark.parametrize("logq", [False, True], ids=["no_logq", "logq"])
@pytest.mark.parametrize("weight", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("known", [False, True], ids=["no_mask", "known_mask"])
@pytest.mark.parametrize("ids", ["sampled", "catalogue"])
@pytest.mark.parametrize("total", [False, True], ids=["own_total", "global_total"])
def test_fused_equals_plain_values_and_gradients(logq, weight, known, ids, total):
    x = _inputs(0)
    neg_ids = x["neg_ids"] if ids == "sampled" else 2  # catalogue: columns are items 2 .. 12
    (fused, *fused_grads), (plain, *plain_grads) = _both(x, neg_ids, logq, weight, known, total)
    # the plain path computes its cross-entropy in float32; the fused one in the inputs' float64
    torch.testing.assert_close(fused, plain.to(fused.dtype), rtol=1e-6, atol=1e-6)
    for f, p in zip(fused_grads, plain_grads):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)


def test_fused_equals_a_float64_logsumexp_reference():
    """Against the definition in float64 throughout (the plain path rounds to float32), logQ on both sides."""
    x = _inputs(1)
    tensors = {n: x[n].clone().requires_grad_() for n in ("user", "vectors", "pos", "neg_logq")}
    fused = fused_sampled_softmax_loss(tensors["user"], tensors["vectors"], tensors["pos"], x["pos_ids"], x["neg_ids"],
                                       x["pos_logq"], tensors["neg_logq"], x["weight"], x["known"])  # fmt: skip
    grads = torch.autograd.grad(fused, list(tensors.values()))
    ref_inputs = {n: x[n].clone().requires_grad_() for n in tensors}
    neg = ref_inputs["user"] @ ref_inputs["vectors"].T - ref_inputs["neg_logq"]
    neg = neg.masked_fill(x["known"] | (x["pos_ids"][:, None] == x["neg_ids"][None, :]), float("-inf"))
    pos = ref_inputs["pos"] - x["pos_logq"]
    per_row = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
    reference = (per_row * x["weight"]).sum() / x["weight"].sum()
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(reference, list(ref_inputs.values()))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_loss_refuses_a_second_backward():
    x = _inputs(2)
    user = x["user"].clone().requires_grad_()
    loss = fused_sampled_softmax_loss(user, x["vectors"], x["pos"], x["pos_ids"], 2)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # its saved probabilities became the gradient
        loss.backward()


def test_fused_loss_under_bf16_autocast_is_the_plain_path():
    x = _inputs(3, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_sampled_softmax_loss(x["user"], x["vectors"], x["pos"], x["pos_ids"], x["neg_ids"],
                                           weight=x["weight"], known_hits=x["known"])  # fmt: skip
        plain = sampled_softmax_loss(x["pos"], x["user"] @ x["vectors"].T, x["pos_ids"], x["neg_ids"],
                                     weight=x["weight"], known_hits=x["known"])  # fmt: skip
    assert torch.equal(fused, plain)


def test_fused_loss_rejects_mismatched_shapes():
    x = _inputs(4)
    with pytest.raises(ValueError, match="known_hits"):
        fused_sampled_softmax_loss(x["user"], x["vectors"], x["pos"], x["pos_ids"], 2, known_hits=x["known"][:, :3])
    with pytest.raises(ValueError, match="share D"):
        fused_sampled_softmax_loss(x["user"], x["vectors"][:, :2], x["pos"], x["pos_ids"], 2)


@pytest.mark.parametrize("sampler", ["all", "uniform"])
@pytest.mark.parametrize("mask", [False, True], ids=["plain", "mask_known_positives"])
def test_adapter_fused_equals_plain(make_model, batch, monkeypatch, sampler, mask):
    """two_tower_loss through the fused loss (and, for ``all``, the row slice of the dense known grid)
    equals it through the plain loss and per-cell mask: loss and every parameter's gradient."""
    results = []
    for fused in (True, False):
        monkeypatch.setattr(losses, "FUSED_SOFTMAX", fused)
        torch.manual_seed(0)
        model = make_model(loss="sampled", negative_sampler=sampler, num_negatives=16, mask_known_positives=mask)
        model.attach_catalogue(torch.zeros(40, 3, dtype=torch.long))
        g = torch.Generator().manual_seed(5)
        model.attach_known_positives(torch.randint(2, 20, (150,), generator=g), torch.randint(2, 40, (150,), generator=g))
        torch.manual_seed(1)  # the same negatives drawn by both
        loss, _ = two_tower_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_known_positive_rows_slice_the_catalogue_mask(make_model, monkeypatch):
    from feedrank.models import two_tower

    g = torch.Generator().manual_seed(6)
    users, items = torch.randint(0, 20, (120,), generator=g), torch.randint(0, 40, (120,), generator=g)
    queries = torch.randint(0, 20, (9,), generator=g)
    rows = []
    for cells in (two_tower.DENSE_KNOWN_MAX_CELLS, 0):
        monkeypatch.setattr(two_tower, "DENSE_KNOWN_MAX_CELLS", cells)
        model = make_model(mask_known_positives=True)
        model.attach_known_positives(users, items)
        rows.append(model.known_positive_rows(queries))
        assert torch.equal(rows[-1], model.known_positive_mask(queries, torch.arange(40)))
    assert torch.equal(rows[0], rows[1])
    assert make_model().known_positive_rows(queries) is None  # not configured
