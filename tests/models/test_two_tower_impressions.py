"""The two-tower's impression term (``TwoTowerConfig.impression_weight``): its head, its loss, the
rows it trains on, and what it teaches that the softmax losses cannot (freshness)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from feedrank.evaluate.metrics import auc
from feedrank.models.losses import ImpressionRows, bce_loss, in_batch_softmax_loss, select_rows, two_tower_loss
from feedrank.models.two_tower import ImpressionHead, TwoTowerConfig


def test_config_checks_the_impression_settings():
    for bad in ({"impression_weight": -1.0}, {"impression_weight": float("nan")}, {"impression_rate": 0.0},
                {"impression_rate": 1.5}, {"max_positions": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TwoTowerConfig(**bad).validate()


def test_head_is_increasing_in_the_cosine_and_the_top_slot_is_the_reference():
    head = ImpressionHead(max_positions=4)
    with torch.no_grad():
        head.log_scale.fill_(-3.0)  # even a tiny scale stays positive
        head.position_bias.weight.normal_()
        head.position_bias.weight[0].zero_()
    cos = torch.linspace(-1, 1, 9)
    logits = head(cos, torch.zeros(9, dtype=torch.long))
    assert bool((logits.diff() > 0).all())
    torch.testing.assert_close(logits, torch.exp(torch.tensor(-3.0)) * cos + head.bias)
    far = head(torch.zeros(2), torch.tensor([3, 99]))  # positions past the table share its last row
    assert far[0].item() == pytest.approx(far[1].item())
    with pytest.raises(ValueError, match=r"position must be \[9\]"):
        head(cos, torch.zeros(3, dtype=torch.long))


def test_impression_weight_adds_the_bce_of_the_heads_logits_to_the_softmax_loss(make_model, batch):
    model = make_model(impression_weight=0.5).eval()
    value, _ = two_tower_loss(model, batch)
    pos = select_rows(batch, batch.clicked > 0)
    u, v = model.user_vectors(pos), model.item_vectors(pos.item, pos.item_cats, pos.item_age_h)
    softmax = in_batch_softmax_loss(u @ v.T / 0.05, pos.item, pos.user, pos.item_logq, pos.weight)
    cos = (model.user_vectors(batch) * model.batch_item_vectors(batch)).sum(-1)
    impressions = bce_loss(model.impression_head(cos, batch.position), batch.clicked, batch.weight)
    torch.testing.assert_close(value, softmax + 0.5 * impressions)
    assert make_model().impression_head is None and make_model(loss="bce", impression_weight=1.0).impression_head is None


def test_score_and_vectors_do_not_read_the_position(make_model, batch):
    model = make_model(impression_weight=1.0).eval()
    moved = dataclasses.replace(batch, position=batch.position.flip(0))
    torch.testing.assert_close(model.score(batch), model.score(moved))


def rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"clicked": rng.random(n) < 0.1, "request": rng.integers(0, 10**6, n),
                     "item_idx": rng.integers(2, 5000, n)})


def test_impression_rows_keep_every_click_and_a_share_of_the_rest_the_same_way_each_time():
    table = rows(20_000)
    clicked = table["clicked"].to_numpy()
    keep = ImpressionRows(0.25)(table)
    assert keep.dtype == bool and bool(keep[clicked].all())
    assert (~clicked & keep).sum() / (~clicked).sum() == pytest.approx(0.25, abs=0.02)
    np.testing.assert_array_equal(ImpressionRows(0.25)(table.slice(100, 500)), keep[100:600])  # a row's pick is its own
    assert bool(ImpressionRows(1.0)(table).all())
    assert (ImpressionRows(0.05)(table) <= keep).all()  # a smaller share keeps a subset


def with_ages(batch, seed: int):
    """``batch`` with new item ages and clicks that depend on the age alone (fresh: clicked)."""
    age = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed)) * 100
    return dataclasses.replace(batch, item_age_h=age, clicked=(age < 30).float(), position=torch.zeros_like(batch.position))


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_only_the_impression_term_teaches_that_fresh_items_get_the_clicks(make_model, make_batch, weight):
    """In-batch negatives are other clicked rows, at their own ages: fresh positives against fresh
    negatives, so the softmax alone never learns freshness and its score ranks impressions of the
    same users and items at new ages no better than chance; the impression term does. Ages are
    drawn anew every step, so IDs cannot memorise which rows were clicked."""
    torch.manual_seed(0)
    model = make_model(impression_weight=weight, logq_correction=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    base = make_batch(64, seed=1)
    for step in range(150):
        loss, _ = two_tower_loss(model, with_ages(base, 100 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out = with_ages(base, 2)
    with torch.no_grad():
        value = auc(held_out.clicked.numpy(), model.eval().score(held_out).numpy())
    if weight:
        assert value > 0.8
    else:
        assert value < 0.65
