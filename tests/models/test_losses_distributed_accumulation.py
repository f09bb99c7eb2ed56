"""Gradient accumulation and the retrieval objective: where k accumulated micro-batches equal one
batch of k times the rows, where they do not (and by how much), and the warning that says so.

The trainer averages the micro-batch losses (``loss / grad_accum_steps``), so accumulation is exact
for a per-row loss whose micro-batches have equal weight sums; each micro-batch normalises by its
own weight otherwise, and an in-batch softmax only ever sees its own micro-batch's negatives
(``accumulation_note``; docs/scaling.md measures both on the demo world).
"""

from __future__ import annotations

import pytest
import torch

from feedrank.models.losses import accumulation_note, select_rows, two_tower_loss

K = 2  # micro-batches


def gradient(model, parts) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    for part in parts:
        (two_tower_loss(model, part)[0] / len(parts)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def relative_error(model, batch) -> float:
    full = gradient(model, [batch])
    n = len(batch) // K
    micro = gradient(model, [select_rows(batch, torch.arange(j * n, (j + 1) * n)) for j in range(K)])
    return float((micro - full).norm() / full.norm())


def prepared(make_model, make_batch, overrides, weight):
    model = make_model(**overrides)
    if model.cfg.loss == "sampled":
        model.attach_catalogue(torch.zeros(40, 3, dtype=torch.long))
    batch = make_batch(16, seed=5)
    batch.clicked = torch.ones(16)
    batch.weight = weight
    return model, batch


EQUAL = torch.tensor([1.0, 2.0] * 8)  # both halves weigh 12
UNEQUAL = torch.cat([torch.full((8,), 0.5), torch.full((8,), 2.0)])
PER_ROW = {"bce": {"loss": "bce"},
           "sampled_exact": {"loss": "sampled", "negative_sampler": "all", "freshness_dim": 0}}


@pytest.mark.parametrize("overrides", PER_ROW.values(), ids=PER_ROW.keys())
def test_accumulation_is_exact_for_per_row_losses_with_equal_weight_sums(make_model, make_batch, overrides):
    model, batch = prepared(make_model, make_batch, overrides, EQUAL)
    assert relative_error(model, batch) < 1e-5


@pytest.mark.parametrize("overrides", PER_ROW.values(), ids=PER_ROW.keys())
def test_unequal_weight_sums_make_accumulation_inexact(make_model, make_batch, overrides):
    """Each micro-batch normalises by its own weight sum (0.5 vs 2 a row here): a measurable error."""
    model, batch = prepared(make_model, make_batch, overrides, UNEQUAL)
    assert relative_error(model, batch) > 1e-2


def test_in_batch_accumulation_sees_a_smaller_pool_even_at_equal_weights(make_model, make_batch):
    model, batch = prepared(make_model, make_batch, {"loss": "in_batch"}, EQUAL)
    assert relative_error(model, batch) > 5e-2


def test_accumulation_note_states_the_pool_and_the_normalisation():
    assert accumulation_note("in_batch", 1, 4, pooled=True) is None
    pooled = accumulation_note("in_batch", 4, 2, pooled=True)
    assert "2 of the step's 8 micro-batches (1/4 of the pool" in pooled and "own weight sum" in pooled
    local = accumulation_note("in_batch", 4, 2, pooled=False)
    assert "1 of the step's 8 micro-batches (1/8 of the pool" in local
    bce = accumulation_note("bce", 2, 1, pooled=False)
    assert "own weight sum" in bce and "negatives" not in bce
