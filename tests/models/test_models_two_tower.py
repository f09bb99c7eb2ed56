"""TwoTower: config, shapes, normalisation, shared table, temperature, losses end to end, overfitting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from feedrank.config import ConfigError, from_dict
from feedrank.models.losses import select_rows, two_tower_loss
from feedrank.models.two_tower import TwoTower, TwoTowerConfig

LOG_UNIFORM = -math.log(38)  # the 'all' sampler's log q over the fixture's 38 real items
ENCODERS = [
    {"history_encoder": "mean"},
    {"history_encoder": "attention", "attention_query": "user"},
    {"history_encoder": "transformer", "n_layers": 2, "pooling": "last"},
]


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key.*'dimm'"):
        from_dict(TwoTowerConfig, {"dimm": 3})
    with pytest.raises(ConfigError, match="loss: expected one of"):
        from_dict(TwoTowerConfig, {"loss": "hinge"})
    with pytest.raises(ConfigError, match="item_id_dim 64 must be divisible by n_heads 5"):
        from_dict(TwoTowerConfig, {"history_encoder": "attention", "n_heads": 5})
    with pytest.raises(ConfigError, match="grad_checkpointing needs"):
        from_dict(TwoTowerConfig, {"grad_checkpointing": True})
    with pytest.raises(ConfigError, match=r"temperature 2.0 must be in \(0.01, 1.0\)"):
        from_dict(TwoTowerConfig, {"learn_temperature": True, "temperature": 2.0})
    cfg = from_dict(TwoTowerConfig, {"history_encoder": "transformer", "hidden": [64, 32], "temperature": "5e-2"})
    assert cfg.hidden == [64, 32] and cfg.temperature == 0.05


@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: o["history_encoder"])
def test_vectors_are_unit_norm_and_finite_with_empty_histories(make_model, batch, overrides):
    model = make_model(**overrides).eval()
    assert not batch.history_mask[0].any()  # the fixture's first user has no history
    u = model.user_vectors(batch)
    v = model.item_vectors(batch.item, batch.item_cats, batch.item_age_h)
    assert u.shape == v.shape == (len(batch), 16)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(len(batch)))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(len(batch)))
    torch.testing.assert_close(model.score(batch), (u * v).sum(-1) / 0.05)


@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: o["history_encoder"])
def test_user_vector_padding_invariance(make_model, batch, overrides):
    model = make_model(**overrides).eval()
    padded = dataclasses.replace(
        batch,
        history=torch.cat([batch.history, torch.zeros(len(batch), 4, dtype=torch.long)], dim=1),
        history_mask=torch.cat([batch.history_mask, torch.zeros(len(batch), 4, dtype=torch.bool)], dim=1),
    )
    torch.testing.assert_close(model.user_vectors(padded), model.user_vectors(batch), atol=1e-6, rtol=1e-5)


def test_history_shares_the_item_id_table(make_model, batch):
    model = make_model(history_encoder="mean")
    table = model.item_tower.id_embedding.weight
    assert not any(p is table for p in model.user_tower.parameters())  # one table, owned by the item tower
    model.user_vectors(batch).sum().backward()
    touched = table.grad.abs().sum(dim=1) > 0
    expected = torch.zeros(table.shape[0], dtype=torch.bool)
    expected[batch.history[batch.history_mask]] = True
    assert torch.equal(touched, expected)  # the user side trains exactly the history items' rows


def test_user_tower_reads_only_the_leading_user_counters(make_model, batch):
    model = make_model().eval()  # n_counters=2
    extra = torch.cat([batch.counters, torch.rand(len(batch), 3)], dim=1)  # e.g. item counters after them
    torch.testing.assert_close(model.user_vectors(dataclasses.replace(batch, counters=extra)), model.user_vectors(batch))
    changed = batch.counters.clone()
    changed[:, 1] += 1.0
    assert (model.user_vectors(dataclasses.replace(batch, counters=changed)) - model.user_vectors(batch)).abs().max() > 1e-4


def test_freshness_dim_zero_drops_the_item_age_input(make_model, batch):
    items = lambda m, ages: m.item_vectors(batch.item, batch.item_cats, ages)  # noqa: E731
    with_age = make_model(freshness_dim=4).eval()
    assert (items(with_age, batch.item_age_h + 1000.0) - items(with_age, batch.item_age_h)).abs().max() > 1e-4
    without = make_model(freshness_dim=0).eval()
    assert without.item_tower.freshness is None
    assert without.item_tower.mlp[0].in_features == 16 + 4 * len(batch.item_cats[0])  # id + categoricals only
    torch.testing.assert_close(items(without, batch.item_age_h + 1000.0), items(without, batch.item_age_h))
    # the input contract (ages finite, >= 0) is unchanged: collate checks it for every model
    # (tests/data/test_collate_checks.py::test_bad_ages_counters_and_positions_are_named)
    with pytest.raises(ValueError, match="freshness_dim must be >= 0"):
        make_model(freshness_dim=-1)


def test_user_id_dim_zero_drops_the_user_id_embedding(make_model, batch):
    with_id = make_model(user_id_dim=8).eval()
    other_users = dataclasses.replace(batch, user=(batch.user + 1) % 20)
    assert (with_id.user_vectors(other_users) - with_id.user_vectors(batch)).abs().max() > 1e-4
    without = make_model(user_id_dim=0).eval()
    assert without.user_tower.id_embedding is None
    # categoricals + the 2 user counters + the history (item_id_dim 16); no user-ID columns
    assert without.user_tower.mlp[0].in_features == 4 * len(batch.user_cats[0]) + 2 + 16
    torch.testing.assert_close(without.user_vectors(other_users), without.user_vectors(batch))
    # the input contract is unchanged: collate range-checks user indices whatever the model reads
    # (tests/data/test_collate_checks.py::test_out_of_vocabulary_indices_are_named)
    with pytest.raises(ValueError, match="user_id_dim must be >= 0"):
        make_model(user_id_dim=-1)


def test_user_counters_off_ignores_every_counter(make_model, batch):
    model = make_model(user_counters=False).eval()
    assert model.n_counters == 0
    changed = dataclasses.replace(batch, counters=batch.counters + 5.0)
    torch.testing.assert_close(model.user_vectors(changed), model.user_vectors(batch))


def test_learned_temperature_stays_in_bounds(make_model):
    model = make_model(learn_temperature=True, temperature=0.1, temperature_min=0.02, temperature_max=0.5)
    assert model.temperature().item() == pytest.approx(0.1, rel=1e-5)
    for raw in (-1e4, 1e4):
        model.temperature.raw.data.fill_(raw)
        assert 0.02 - 1e-6 <= model.temperature().item() <= 0.5 + 1e-6  # float32 rounding of the bounds
    assert any(p is model.temperature.raw for p in model.parameters())


def test_bad_input_shapes_name_the_field(make_model, batch):
    """Shapes are checked in forward (free); values (indices, ages) where the Batch is made
    (tests/data/test_collate_checks.py)."""
    model = make_model()
    with pytest.raises(ValueError, match=r"item_cats must be \[2, 3\].*got \(2, 2\)"):
        model.item_vectors(batch.item[:2], batch.item_cats[:2, :2], batch.item_age_h[:2])
    with pytest.raises(ValueError, match=r"history \(8, 6\) and history_mask \(8, 5\)"):
        model.user_vectors(dataclasses.replace(batch, history_mask=batch.history_mask[:, :5]))
    with pytest.raises(ValueError, match=r"counters must be \[8, >= 2\].*got \(8, 1\)"):
        model.user_vectors(dataclasses.replace(batch, counters=torch.zeros(8, 1)))


@pytest.mark.parametrize("loss", ["in_batch", "sampled", "bce"])
def test_two_tower_loss_end_to_end(make_model, batch, loss):
    model = make_model(loss=loss, history_encoder="transformer", num_negatives=5, negative_sampler="popularity")
    model.attach_catalogue(torch.zeros(40, 3, dtype=torch.long), item_counts=torch.arange(40))
    value, logs = two_tower_loss(model, batch)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert model.item_tower.id_embedding.weight.grad is not None
    assert logs["pairs"].item() == (8 if loss == "bce" else 4)  # softmax losses train on clicked rows
    assert logs["loss"].item() == value.item() and not logs["loss"].requires_grad


def test_in_batch_loss_matches_the_pure_function(make_model, batch):
    """Pins the adapter's wiring: clicked rows only, logits u.v/T, logQ from the batch."""
    from feedrank.models.losses import in_batch_softmax_loss

    model = make_model().eval()
    value, _ = two_tower_loss(model, batch)
    pos = select_rows(batch, batch.clicked > 0)
    u, v = model.user_vectors(pos), model.item_vectors(pos.item, pos.item_cats, pos.item_age_h)
    expected = in_batch_softmax_loss(u @ v.T / 0.05, pos.item, pos.user, pos.item_logq, pos.weight)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("mask", [False, True], ids=["plain", "mask_known_positives"])
def test_full_catalogue_softmax_matches_the_pure_function(make_model, batch, mask):
    """Pins the sampled adapter with the ``all`` sampler: every real item a negative, and the
    user's known positives (attach_known_positives) masked from them only when configured."""
    from feedrank.models.losses import sampled_softmax_loss

    model = make_model(loss="sampled", negative_sampler="all", freshness_dim=0, mask_known_positives=mask).eval()
    model.attach_catalogue(torch.zeros(40, 3, dtype=torch.long))
    pos = select_rows(batch, batch.clicked > 0)
    catalogue = torch.arange(2, 40)
    u = model.user_vectors(pos)
    v = model.item_vectors(pos.item, pos.item_cats, pos.item_age_h)
    neg = model.item_vectors(catalogue, torch.zeros(38, 3, dtype=torch.long), torch.zeros(38))
    logits = u @ neg.T / 0.05
    # the known positive to mask: row 0's hardest negative, so masking it moves the loss well
    # beyond float noise (a weak negative's exp() can be below the sum's last bit)
    hardest = logits[0].masked_fill(catalogue == pos.item[0], float("-inf")).argmax()
    other_item = catalogue[hardest]
    model.attach_known_positives(pos.user[:1], other_item[None])
    value, _ = two_tower_loss(model, batch)

    known = (pos.user[:, None] == pos.user[0]) & (catalogue[None, :] == other_item) if mask else None
    expected = sampled_softmax_loss((u * v).sum(-1) / 0.05, logits, pos.item, catalogue,
                                    torch.full((len(pos),), LOG_UNIFORM), torch.full((38,), LOG_UNIFORM),
                                    pos.weight, known)
    torch.testing.assert_close(value, expected)
    unmasked = sampled_softmax_loss((u * v).sum(-1) / 0.05, logits, pos.item, catalogue, weight=pos.weight)
    if mask:  # masking a negative can only lower the loss; the hardest one lowers it measurably
        assert unmasked.item() - value.item() > 1e-3
    else:  # the same loss, summed in another order: equal up to float rounding
        torch.testing.assert_close(value, unmasked)


def test_sampled_loss_needs_a_catalogue(make_model, batch):
    model = make_model(loss="sampled")
    with pytest.raises(RuntimeError, match="attach_catalogue"):
        two_tower_loss(model, batch)
    with pytest.raises(ValueError, match=r"item_cats must be \[n_items, n_item_cats\] = \[40, 3\]"):
        model.attach_catalogue(torch.zeros(40, 2, dtype=torch.long))


def test_batch_without_clicks_gives_zero_loss_and_backward_works(make_model, batch):
    model = make_model(history_encoder="attention")
    value, _ = two_tower_loss(model, dataclasses.replace(batch, clicked=torch.zeros(len(batch))))
    assert value.item() == 0.0
    value.backward()


def test_loss_sees_through_wrappers(make_model, batch):
    class Wrapper(nn.Module):  # stands in for DDP / FSDP: the model lives in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    model = make_model()
    torch.testing.assert_close(two_tower_loss(Wrapper(model), batch)[0], two_tower_loss(model, batch)[0])


@pytest.mark.parametrize("user", [{}, {"user_id_dim": 0, "user_counters": False}], ids=["with_user_id", "history_only"])
@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: o["history_encoder"])
def test_each_encoder_overfits_a_tiny_task(make_model, make_batch, fit, overrides, user):
    """Each user's positive is a fixed function of its history: every encoder must learn it, also
    with no user ID, where the user vector comes from categoricals and history alone (attention's
    user query then uses the categoricals)."""
    torch.manual_seed(0)
    batch = make_batch(b=16, length=4, seed=3, empty_rows=0)
    batch = dataclasses.replace(batch, item=2 + batch.history[:, 0] % 12, clicked=torch.ones(16))
    model = make_model(**overrides, **user, learn_temperature=True, temperature=0.1)
    losses = fit(model, two_tower_loss, batch, steps=40)
    assert losses[-1] < 0.3 * losses[0], losses


def test_bf16_autocast_forward_is_finite(make_model, batch):
    model = make_model(history_encoder="transformer")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = two_tower_loss(model, batch)
    assert torch.isfinite(loss)
    loss.backward()


def test_known_positive_mask_marks_training_pairs_and_ignores_the_oov_user():
    cfg = TwoTowerConfig(dim=8, user_id_dim=4, item_id_dim=8, cat_dim=2, freshness_dim=2, hidden=[8],
                         history_encoder="mean", mask_known_positives=True)
    model = TwoTower(cfg, n_users=6, n_items=9, user_cat_sizes=[3], item_cat_sizes=[3])
    assert model.known_positive_mask(torch.tensor([2]), torch.tensor([3])) is None  # nothing attached yet
    model.attach_known_positives(torch.tensor([2, 2, 3, 1]), torch.tensor([4, 5, 4, 7]))  # user 1 = OOV
    mask = model.known_positive_mask(torch.tensor([2, 3, 1]), torch.tensor([5, 4, 7]))
    assert mask.tolist() == [[True, True, False], [False, True, False], [False, False, False]]
    off = TwoTower(TwoTowerConfig(dim=8, user_id_dim=4, item_id_dim=8, cat_dim=2, freshness_dim=2, hidden=[8]),
                   n_users=6, n_items=9, user_cat_sizes=[3], item_cat_sizes=[3])
    off.attach_known_positives(torch.tensor([2]), torch.tensor([4]))
    assert off.known_positive_mask(torch.tensor([2]), torch.tensor([4])) is None  # the flag is off


def test_draw_rows_draws_only_true_rows_uniformly():
    from feedrank.models.two_tower import draw_rows

    mask = torch.tensor([False, True, False, True, True, False])
    drawn = draw_rows(mask, 6000)
    counts = torch.bincount(drawn, minlength=6)
    assert counts[~mask].sum() == 0
    assert (counts[mask] - 2000).abs().max() < 200  # 6000 draws over 3 rows: sd ~37
    assert draw_rows(torch.zeros(4, dtype=torch.bool), 3).tolist() == [3, 3, 3]  # no positives: any row (weight 0)
    assert draw_rows(torch.tensor([True]), 2).tolist() == [0, 0]
