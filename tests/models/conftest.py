"""Shared fixtures for the model tests: small random Batches with the Batch index conventions."""

from __future__ import annotations

import pytest
import torch

from feedrank.data.batch import Batch

N_USERS, N_ITEMS = 20, 40
USER_CAT_SIZES, ITEM_CAT_SIZES = [4, 5], [6, 3, 7]
N_COUNTERS = 2


def random_batch(b: int = 8, length: int = 6, seed: int = 0, empty_rows: int = 1) -> Batch:
    """A Batch of ``b`` rows with right-padded histories; the first ``empty_rows`` users have none."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    lengths[:empty_rows] = 0
    mask = torch.arange(length)[None, :] < lengths[:, None]
    history = torch.randint(2, N_ITEMS, (b, length), generator=g) * mask
    return Batch(
        user=torch.randint(2, N_USERS, (b,), generator=g),
        user_cats=torch.stack([torch.randint(0, s, (b,), generator=g) for s in USER_CAT_SIZES], dim=1),
        history=history,
        history_mask=mask,
        item=torch.randint(2, N_ITEMS, (b,), generator=g),
        item_cats=torch.stack([torch.randint(0, s, (b,), generator=g) for s in ITEM_CAT_SIZES], dim=1),
        item_age_h=torch.rand(b, generator=g) * 48,
        counters=torch.rand(b, N_COUNTERS, generator=g),
        position=torch.arange(b),
        clicked=(torch.arange(b) % 2 == 0).float(),
        dwell_s=torch.zeros(b),
        shared=torch.zeros(b),
        hidden=torch.zeros(b),
        weight=torch.ones(b),
        item_logq=torch.full((b,), -3.0),
        request=torch.arange(b) // 4,
    )


@pytest.fixture
def batch() -> Batch:
    return random_batch()


@pytest.fixture
def make_batch():
    """The ``random_batch`` factory, for tests that need several batches or other sizes."""
    return random_batch


@pytest.fixture
def fit():
    """``fit(model, loss_fn, batch, steps, lr=1e-2)`` -> the loss of each of ``steps`` Adam steps on
    one batch (``loss_fn(model, batch) -> (loss, logs)``, as two_tower_loss and ranker_loss are)."""

    def run(model, loss_fn, batch, steps: int, lr: float = 1e-2) -> list[float]:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss, _ = loss_fn(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    return run


@pytest.fixture
def make_model():
    """Build a TwoTower over this file's vocabulary sizes from config overrides."""
    from feedrank.models.two_tower import TwoTower, TwoTowerConfig

    def build(**overrides) -> TwoTower:
        cfg = TwoTowerConfig(**{"dim": 16, "item_id_dim": 16, "user_id_dim": 8, "cat_dim": 4, "hidden": [32],
                                "dropout": 0.0, **overrides})
        return TwoTower(cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, N_COUNTERS)

    return build


@pytest.fixture
def make_ranker():
    """Build a Ranker over this file's vocabulary sizes from config overrides; the batches'
    2 counter columns are read as 1 user-side + 1 item-side counter."""
    from feedrank.models.ranker import Ranker, RankerConfig

    def build(**overrides) -> Ranker:
        torch.manual_seed(0)
        cfg = RankerConfig(**{"dim": 8, "hidden": [32, 16], "dropout": 0.0, "two_tower_dropout": 0.0, **overrides})
        return Ranker(cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, n_user_counters=1, n_item_counters=1)

    return build
