"""The multi-task ranker: shapes, serving invariants, value formula, losses, score_candidates, bad input."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feedrank.config import ConfigError, from_dict
from feedrank.data.batch import Batch
from feedrank.evaluate.metrics import expected_calibration_error
from feedrank.models.calibration import downsample_negatives
from feedrank.models.losses import select_rows
from feedrank.models.ranker import (
    HEADS,
    HeadWeights,
    ItemInputs,
    Ranker,
    RankerConfig,
    UserInputs,
    ranker_loss,
    value_score,
)

TT_DIM = 8  # the make_ranker fixture (conftest) reads the batches' 2 counters as 1 user + 1 item column


def with_labels(batch: Batch, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    clicked = batch.clicked
    return dataclasses.replace(
        batch,
        dwell_s=clicked * torch.rand(len(batch), generator=g) * 100,
        shared=clicked * (torch.rand(len(batch), generator=g) < 0.3).float(),
        hidden=(1 - clicked) * (torch.rand(len(batch), generator=g) < 0.3).float(),
    )


@pytest.mark.parametrize("interaction", ["dcn", "dot"])
def test_forward_shapes_and_finite(make_batch, interaction, make_ranker):
    model = make_ranker(interaction=interaction, two_tower_dim=TT_DIM)
    batch = make_batch(b=6)
    out = model(batch, torch.randn(6, TT_DIM), torch.randn(6, TT_DIM))
    for name in (*HEADS, "position"):
        value = getattr(out, name)
        assert value.shape == (6,), name
        assert torch.isfinite(value).all(), name


@pytest.mark.parametrize("encoder", ["mean", "attention", "transformer"])
def test_no_nan_with_empty_histories_and_missing_two_tower_vectors(make_batch, encoder, make_ranker):
    model = make_ranker(history_encoder=encoder, attention_query="user", two_tower_dim=TT_DIM).eval()
    batch = make_batch(b=4, empty_rows=4)  # nobody has a history: mask all False
    assert not batch.history_mask.any()
    preds = model.predict(batch)  # no two-tower vectors: the learned "missing" input
    for name, value in preds.items():
        assert torch.isfinite(value).all(), name
    loss, _ = ranker_loss(model.train(), with_labels(batch))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_two_tower_vector_uses_the_learned_missing_embedding(batch, make_ranker):
    model = make_ranker(two_tower_dim=TT_DIM).eval()
    with torch.no_grad():
        model.user_vector.missing.fill_(0.5)
    fields_missing = model.user_vector(None, 3, "user_vec")
    fields_zero = model.user_vector(torch.zeros(3, TT_DIM), 3, "user_vec")
    torch.testing.assert_close(fields_missing, fields_zero + 0.5)


def test_two_tower_dropout_marks_rows_missing_only_in_training(make_ranker):
    model = make_ranker(two_tower_dim=TT_DIM, two_tower_dropout=0.5)
    vec = torch.randn(1000, TT_DIM)
    with torch.no_grad():
        model.user_vector.missing.fill_(100.0)  # makes a missing row easy to spot
        train_out = model.user_vector(vec, 1000, "user_vec")
        eval_out = model.eval().user_vector(vec, 1000, "user_vec")
    share_missing = (train_out[:, 0] > 50).float().mean().item()
    assert 0.4 < share_missing < 0.6
    assert not (eval_out[:, 0] > 50).any()


def test_serving_score_does_not_depend_on_position(batch, make_ranker):
    model = make_ranker()
    with torch.no_grad():
        model.position_bias.weight.copy_(torch.linspace(0, -3, model.cfg.max_positions)[:, None])
    model.eval()
    moved = dataclasses.replace(batch, position=torch.tensor([0, 19, 3, 500, 7, 1, 2, 12]))
    a, b = model.predict(batch), model.predict(moved)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    invalid = model.predict(dataclasses.replace(batch, position=torch.full((3, 3), -1)))  # not even read
    assert torch.equal(invalid["value"], a["value"])
    # ... while the training loss does use it
    labelled = with_labels(batch)
    assert ranker_loss(model, labelled)[0] != ranker_loss(model, dataclasses.replace(labelled, position=moved.position))[0]


def test_position_zero_is_the_reference_slot_and_stays_zero_after_training(batch, make_ranker, fit):
    model = make_ranker()
    fit(model, ranker_loss, with_labels(batch), steps=3, lr=0.05)
    bias = model.position_bias.weight.squeeze(-1)
    assert bias[0] == 0.0
    assert bias[1:8].abs().sum() > 0  # positions seen in training moved
    # positions beyond the table share the last slot
    assert torch.equal(model.position_logit(torch.tensor([19, 20, 1000])), bias[[19, 19, 19]].detach())


def test_value_formula_by_hand():
    preds = {"click": torch.tensor([0.5, 0.2]), "dwell": torch.tensor([2.0, 4.0]),
             "share": torch.tensor([0.25, 0.0]), "hide": torch.tensor([0.1, 0.5])}  # fmt: skip
    weights = HeadWeights(click=1.0, dwell=0.1, share=5.0, hide=-3.0)
    # row 0: 0.5 + 0.1*0.5*2 + 5*0.25 - 3*0.1 = 1.55; row 1: 0.2 + 0.1*0.2*4 + 0 - 1.5 = -1.22
    torch.testing.assert_close(value_score(preds, weights), torch.tensor([1.55, -1.22]))


def test_predictions_from_head_outputs_by_hand(make_ranker):
    model = make_ranker()  # default value weights {1, 0.1, 5, -3}
    heads = {"click": torch.tensor([0.0]), "dwell": torch.tensor([2.0]),
             "share": torch.tensor([math.log(1 / 3)]), "hide": torch.tensor([math.log(1 / 9)])}  # fmt: skip
    preds = model.predictions(heads)
    torch.testing.assert_close(preds["click"], torch.tensor([0.5]))
    torch.testing.assert_close(preds["share"], torch.tensor([0.25]))
    torch.testing.assert_close(preds["hide"], torch.tensor([0.1]))
    torch.testing.assert_close(preds["value"], torch.tensor([1.55]))
    # trained with half of the negatives: p' = 0.5 -> 0.5 / (0.5 + 0.5 / 0.5) = 1/3
    halved = make_ranker(negative_rate=0.5).predictions(heads)
    torch.testing.assert_close(halved["click"], torch.tensor([1 / 3]))
    torch.testing.assert_close(halved["value"], torch.tensor([1 / 3 + 0.1 * 2 / 3 + 1.25 - 0.3]))


def test_ranker_loss_components_by_hand(batch, make_ranker):
    model = make_ranker(loss_weights=HeadWeights(click=1.0, dwell=0.5, share=2.0, hide=3.0), dwell_loss="mse")
    labelled = dataclasses.replace(with_labels(batch), weight=torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 3.0, 1.0, 1.0]))
    loss, logs = ranker_loss(model, labelled)
    out = model(labelled)
    w, c = labelled.weight, labelled.clicked

    def bce(logit, y, weight):
        return (F.binary_cross_entropy_with_logits(logit, y, reduction="none") * weight).sum() / weight.sum()

    expected = {
        "click": bce(out.click + out.position, c, w),
        "dwell": ((out.dwell - torch.log1p(labelled.dwell_s)) ** 2 * w * c).sum() / (w * c).sum(),
        "share": bce(out.share, labelled.shared, w),
        "hide": bce(out.hide, labelled.hidden, w),
    }
    for name, value in expected.items():
        torch.testing.assert_close(logs[f"loss_{name}"], value.detach(), msg=name)
    torch.testing.assert_close(loss, expected["click"] + 0.5 * expected["dwell"] + 2 * expected["share"] + 3 * expected["hide"])


def test_dwell_loss_ignores_non_clicked_rows(batch, make_ranker):
    model = make_ranker()
    labelled = with_labels(batch)
    noisy = dataclasses.replace(labelled, dwell_s=labelled.dwell_s + (1 - labelled.clicked) * 1e4)
    assert ranker_loss(model, labelled)[1]["loss_dwell"] == ranker_loss(model, noisy)[1]["loss_dwell"]


def test_negative_rate_upweights_non_clicked_rows_for_share_and_hide(batch, make_ranker):
    labelled = with_labels(batch)
    _, full = ranker_loss(make_ranker(), labelled)
    _, sampled = ranker_loss(make_ranker(negative_rate=0.25), labelled)
    model = make_ranker()
    out = model(labelled)
    weight = torch.where(labelled.clicked > 0, 1.0, 4.0)
    expected_hide = (F.binary_cross_entropy_with_logits(out.hide, labelled.hidden, reduction="none") * weight).sum() / weight.sum()
    torch.testing.assert_close(sampled["loss_hide"], expected_hide.detach())
    assert sampled["loss_click"] == full["loss_click"]  # the click head is corrected at serving instead


@pytest.mark.parametrize("interaction", ["dcn", "dot"])
def test_both_interactions_train_on_a_tiny_task(make_batch, interaction, make_ranker, fit):
    """Clicks depend on user x item parity: an interaction the model must learn."""
    batch = make_batch(b=64, seed=1)
    batch = dataclasses.replace(batch, clicked=((batch.user + batch.item) % 2 == 0).float())
    model = make_ranker(interaction=interaction, loss_weights=HeadWeights(click=1.0, dwell=0.0, share=0.0, hide=0.0))
    losses = fit(model, ranker_loss, batch, steps=60)
    assert losses[-1] < 0.5 * losses[0]


def single_user_batch(user: UserInputs, items: ItemInputs) -> Batch:
    """The Batch that repeats ``user`` for every candidate: what score_candidates must equal."""
    n = items.item.shape[0]
    mask = user.history_mask if user.history_mask is not None else torch.ones_like(user.history, dtype=torch.bool)
    return Batch(
        user=user.user.expand(n), user_cats=user.user_cats.expand(n, -1),
        history=user.history.expand(n, -1), history_mask=mask.expand(n, -1),
        item=items.item, item_cats=items.item_cats, item_age_h=items.item_age_h,
        counters=torch.cat([user.counters.expand(n, -1), items.counters], dim=1),
        position=torch.arange(n), clicked=torch.zeros(n), dwell_s=torch.zeros(n), shared=torch.zeros(n),
        hidden=torch.zeros(n), weight=torch.ones(n), item_logq=torch.zeros(n), request=torch.zeros(n, dtype=torch.long),
    )  # fmt: skip


def serving_inputs(model: Ranker, n: int, with_vectors: bool, seed: int = 0) -> tuple[UserInputs, ItemInputs]:
    g = torch.Generator().manual_seed(seed)
    user = UserInputs(
        user=torch.tensor(5), user_cats=torch.tensor([1, 3]),
        history=torch.tensor([7, 9, 11, 0, 0]), history_mask=torch.tensor([True, True, True, False, False]),
        counters=torch.tensor([1.5]), vector=torch.randn(TT_DIM, generator=g) if with_vectors else None,
    )  # fmt: skip
    items = ItemInputs(
        item=torch.randint(2, model.n_items, (n,), generator=g),
        item_cats=torch.stack([torch.randint(0, s, (n,), generator=g) for s in model.item_cats.sizes], dim=1),
        item_age_h=torch.rand(n, generator=g) * 48,
        counters=torch.rand(n, model.n_item_counters, generator=g),
        vectors=torch.randn(n, TT_DIM, generator=g) if with_vectors else None,
    )
    return user, items


@pytest.mark.parametrize("interaction, encoder, with_vectors",
                         [("dcn", "mean", True), ("dot", "transformer", True), ("dcn", "attention", False)])  # fmt: skip
def test_score_candidates_equals_forward_on_the_expanded_batch(interaction, encoder, with_vectors, make_ranker):
    model = make_ranker(interaction=interaction, history_encoder=encoder, attention_query="user", two_tower_dim=TT_DIM).eval()
    user, items = serving_inputs(model, 30, with_vectors)
    scores = model.score_candidates(user, items)
    batch = single_user_batch(user, items)
    user_vec = user.vector.expand(30, -1) if with_vectors else None
    expected = model.predict(batch, user_vec, items.vectors)
    assert set(scores) == {*HEADS, "value"}
    for name in scores:
        assert scores[name].shape == (30,)
        torch.testing.assert_close(scores[name], expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_score_candidates_without_history_mask_means_all_real(make_ranker):
    model = make_ranker(two_tower_dim=TT_DIM).eval()
    user, items = serving_inputs(model, 4, with_vectors=True)
    short = dataclasses.replace(user, history=user.history[:3], history_mask=None)
    torch.testing.assert_close(model.score_candidates(short, items)["value"], model.score_candidates(user, items)["value"])


def test_score_candidates_with_no_candidates_returns_empty_tensors(make_ranker):
    model = make_ranker(two_tower_dim=TT_DIM).eval()
    user, items = serving_inputs(model, 0, with_vectors=True)
    scores = model.score_candidates(user, items)
    assert set(scores) == {*HEADS, "value"}
    assert all(v.shape == (0,) for v in scores.values())


def test_ranker_loss_with_a_frozen_two_tower(make_model, batch, make_ranker):
    two_tower = make_model().eval()
    model = make_ranker(two_tower_dim=16)
    labelled = with_labels(batch)
    loss, logs = functools.partial(ranker_loss, two_tower=two_tower)(model, labelled)
    loss.backward()
    assert all(p.grad is None for p in two_tower.parameters())
    out = model(labelled, two_tower.user_vectors(labelled), two_tower.item_vectors(labelled.item, labelled.item_cats, labelled.item_age_h))
    expected = F.binary_cross_entropy_with_logits(out.click + out.position, labelled.clicked)
    torch.testing.assert_close(logs["loss_click"], expected.detach())
    with pytest.raises(ValueError, match="eval mode"):
        ranker_loss(model, labelled, two_tower=two_tower.train())


def test_ranker_loss_unwraps_ddp_style_wrappers(batch, make_ranker):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = make_ranker(negative_rate=0.5)
    labelled = with_labels(batch)
    assert ranker_loss(Wrapper(model), labelled)[0] == ranker_loss(model, labelled)[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: dataclasses.replace(b, counters=torch.zeros(len(b), 5)), r"counters must be \[8, 2\] \(1 user \+ 1 item"),
        (lambda b: dataclasses.replace(b, position=torch.zeros(len(b), 2, dtype=torch.long)), r"position must be \[8\]"),
        (lambda b: dataclasses.replace(b, user_cats=b.user_cats[:, :1]), r"user_cats must be \[8, 2\]"),
        (lambda b: dataclasses.replace(b, history_mask=b.history_mask[:, :2]), "history .* and history_mask"),
    ],
)
def test_bad_batches_are_named(batch, change, message, make_ranker):
    """Shapes, checked in forward; bad values (NaN counters and ages, negative positions, indices
    outside the vocabulary) are named where the Batch is made: tests/data/test_collate_checks.py."""
    with pytest.raises(ValueError, match=message):
        make_ranker()(change(batch))


def test_bad_two_tower_vectors_are_named(batch, make_ranker):
    with pytest.raises(ValueError, match="user_vec was given but this ranker has no two-tower inputs"):
        make_ranker()(batch, user_vec=torch.zeros(8, TT_DIM))
    model = make_ranker(two_tower_dim=TT_DIM)
    with pytest.raises(ValueError, match=r"item_vec must be \[8, 8\].*got \(8, 4\)"):
        model(batch, item_vec=torch.zeros(8, 4))
    # A NaN vector is not checked in forward (a sync per step); it is not hidden either: every score
    # turns NaN, and so does the loss, which the Trainer names before it reaches a log line or a
    # checkpoint (tests/train/test_trainer_loop.py, non-finite loss).
    out = model(batch, user_vec=torch.full((8, TT_DIM), float("nan")))
    assert torch.isnan(out.click).all()


def test_bad_serving_inputs_are_named(make_ranker):
    model = make_ranker(two_tower_dim=TT_DIM).eval()
    user, items = serving_inputs(model, 5, with_vectors=True)
    with pytest.raises(ValueError, match="UserInputs.user must be a 0-d index"):
        model.score_candidates(dataclasses.replace(user, user=torch.tensor([5])), items)
    with pytest.raises(ValueError, match=r"item counters must be \[5, 1\]"):
        model.score_candidates(user, dataclasses.replace(items, counters=torch.zeros(5, 3)))
    with pytest.raises(ValueError, match=r"item_vec must be \[5, 8\]"):
        model.score_candidates(user, dataclasses.replace(items, vectors=torch.zeros(4, TT_DIM)))


def test_config_is_strict_and_value_weights_must_all_be_given():
    cfg = from_dict(RankerConfig, {"interaction": "dot", "value": {"click": 1, "dwell": 0.2, "share": 4, "hide": -2}})
    assert cfg.interaction == "dot" and cfg.value == HeadWeights(1.0, 0.2, 4.0, -2.0)
    assert from_dict(RankerConfig, {}).value == HeadWeights(click=1.0, dwell=0.1, share=5.0, hide=-3.0)
    with pytest.raises(ConfigError, match="unknown key.*'clicks'"):
        from_dict(RankerConfig, {"value": {"clicks": 1.0}})
    with pytest.raises(ConfigError, match="value.*hide"):
        from_dict(RankerConfig, {"value": {"click": 1, "dwell": 0.2, "share": 4}})
    with pytest.raises(ConfigError, match="interaction: expected one of"):
        from_dict(RankerConfig, {"interaction": "fm"})
    with pytest.raises(ConfigError, match="negative_rate must be in"):
        from_dict(RankerConfig, {"negative_rate": 0.0})


def test_ranker_trained_on_downsampled_negatives_is_calibrated(make_ranker):
    """Click rate depends on the item (known, 2%..22%); train on 1:5 down-sampled negatives with
    cfg.negative_rate = 0.2 and check the served click probability on un-sampled held-out rows."""
    rng = np.random.default_rng(0)
    n = 40_000
    items = rng.integers(2, 12, size=2 * n)
    true_p = 0.02 + 0.02 * (items - 2)
    clicked = (rng.random(2 * n) < true_p).astype(np.float32)

    def rows(idx: np.ndarray) -> Batch:
        m = len(idx)
        zeros = torch.zeros(m)
        return Batch(
            user=torch.full((m,), 2), user_cats=torch.ones(m, 2, dtype=torch.long),
            history=torch.zeros(m, 1, dtype=torch.long), history_mask=torch.zeros(m, 1, dtype=torch.bool),
            item=torch.from_numpy(items[idx]), item_cats=torch.ones(m, 3, dtype=torch.long), item_age_h=zeros,
            counters=torch.zeros(m, 2), position=torch.zeros(m, dtype=torch.long),
            clicked=torch.from_numpy(clicked[idx]), dwell_s=zeros, shared=zeros, hidden=zeros,
            weight=torch.ones(m), item_logq=zeros, request=torch.zeros(m, dtype=torch.long),
        )  # fmt: skip

    keep = np.flatnonzero(downsample_negatives(clicked[:n], rate=0.2, rng=1))
    train = rows(keep)
    model = make_ranker(negative_rate=0.2, loss_weights=HeadWeights(click=1.0, dwell=0.0, share=0.0, hide=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for step in torch.randperm(len(train), generator=gen).split(512):
            loss, _ = ranker_loss(model, select_rows(train, step))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = rows(np.arange(n, 2 * n))
    p_served = model.predict(test)["click"]
    p_uncorrected = torch.sigmoid(model(test).click.detach())
    assert expected_calibration_error(test.clicked, p_served) < 0.02
    assert expected_calibration_error(test.clicked, p_uncorrected) > 0.1


@pytest.mark.parametrize("encoder", ["mean", "attention", "transformer"])
def test_score_candidates_for_a_user_without_history(make_ranker, encoder):
    model = make_ranker(history_encoder=encoder).eval()
    user, items = serving_inputs(model, 3, with_vectors=False)
    empty = model.score_candidates(dataclasses.replace(user, history=torch.zeros(0, dtype=torch.long), history_mask=None), items)
    padded = model.score_candidates(dataclasses.replace(user, history_mask=torch.zeros(5, dtype=torch.bool)), items)
    torch.testing.assert_close(empty["value"], padded["value"])
    assert torch.isfinite(empty["value"]).all()
