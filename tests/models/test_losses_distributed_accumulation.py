"""Gradient accumulation and the retrieval objective: where k accumulated micro-batches equal one
batch of k times the rows, where they do not (and by how much), the warning that says so, and
``CachedStep``, the two-pass scheme that makes them equal for every loss.

The trainer averages the micro-batch losses (``loss / grad_accum_steps``), so accumulation is exact
for a per-row loss whose micro-batches have equal weight sums; each micro-batch normalises by its
own weight otherwise, and an in-batch softmax only ever sees its own micro-batch's negatives
(``accumulation_note``; docs/scaling.md measures both on the demo world).
"""

from __future__ import annotations

import pytest
import torch

from feedrank.models.losses import CachedStep, GlobalPool, accumulation_note, select_rows, step_loss, two_tower_loss

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


# ------------------------------------------------------------ CachedStep: the two-pass scheme

def cached_gradient(model, parts) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    CachedStep().backward_step(model, parts, lambda t, last: t.backward())
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


CACHED = {**PER_ROW,
          "in_batch": {"loss": "in_batch"},
          "in_batch_impressions": {"loss": "in_batch", "impression_weight": 0.5},
          "in_batch_full": {"loss": "in_batch", "mask_known_positives": True, "learn_temperature": True,
                            "temperature": 0.1, "history_encoder": "transformer"}}
SPLITS = {"halves": [8, 8], "unequal": [11, 2, 3], "with_empty": [0, 16]}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("overrides", CACHED.values(), ids=CACHED.keys())
def test_cached_step_equals_the_full_batch(make_model, make_batch, overrides, split):
    """Where plain accumulation is off (unequal weights, in-batch negatives), the two-pass step is exact."""
    model, batch = prepared(make_model, make_batch, overrides, UNEQUAL)
    if model.cfg.mask_known_positives:
        model.attach_known_positives(batch.user, torch.roll(batch.item, 1))
    bounds = torch.tensor([0, *split]).cumsum(0).tolist()
    parts = [select_rows(batch, torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    full = gradient(model, [batch])
    torch.testing.assert_close(cached_gradient(model, parts), full, rtol=1e-5, atol=1e-6)


def test_cached_step_replays_dropout_and_negative_draws(make_model, make_batch):
    """Pass 2 sees the same dropout masks and negatives as pass 1: the result equals one graph over
    the micro-batches' forwards from the same RNG state (the memory-hungry way to the same gradient)."""
    model, batch = prepared(make_model, make_batch, {"loss": "sampled", "dropout": 0.3}, UNEQUAL)
    parts = [select_rows(batch, torch.arange(0, 9)), select_rows(batch, torch.arange(9, 16))]
    torch.manual_seed(7)
    got = cached_gradient(model, parts)
    after = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    loss, _ = step_loss(model, [model(p) for p in parts], parts, GlobalPool())
    loss.backward()
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), after), "the step must leave the RNG where one pass would"


def test_trainer_with_cached_accumulation_trains_like_the_full_batch(make_model, make_batch, tmp_path):
    """End to end: 3 optimizer steps of 2 cached micro-batches give the weights of 3 steps of the
    union batches (in_batch, unequal weights); plain accumulation does not."""
    from feedrank.config import from_dict
    from feedrank.train import Trainer, TrainConfig

    model0, _ = prepared(make_model, make_batch, {"loss": "in_batch"}, UNEQUAL)
    full = []
    for seed in range(3):
        b = make_batch(16, seed=seed)
        b.clicked, b.weight = torch.ones(16), UNEQUAL
        full.append(b)
    halves = [select_rows(b, torch.arange(j * 8, (j + 1) * 8)) for b in full for j in range(2)]

    def train(loss_fn, batches, accum, name):
        model = make_model(loss="in_batch")
        model.load_state_dict(model0.state_dict())
        cfg = from_dict(TrainConfig, {"steps": 3, "lr": 0.01, "grad_accum_steps": accum, "log_every": 1,
                                      "device": "cpu", "progress": False, "out_dir": str(tmp_path / name)})
        with Trainer(model, loss_fn, cfg) as trainer:
            trainer.fit(lambda epoch: batches)
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    want = train(two_tower_loss, full, 1, "full")
    torch.testing.assert_close(train(CachedStep(), halves, 2, "cached"), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(train(two_tower_loss, halves, 2, "plain"), want, rtol=1e-5, atol=1e-6)
