"""``Ranker.score_candidates`` computes the user's share of the work once (the first cross layer's
user half, the user side of the match cosines): it must equal ``predict`` on the batch that
repeats the user for every candidate, for every interaction, cross rank, match field and the int8
model (whose Linear layers hold no weight matrix to split)."""

from __future__ import annotations

import pytest
import torch

from feedrank.data.batch import Batch
from feedrank.models.interactions import CrossNetwork
from feedrank.models.quantize import quantize_ranker
from feedrank.models.ranker import HEADS, ItemInputs, Ranker, RankerConfig, UserInputs

N_USERS, N_ITEMS, N_TOKENS, T, TT_DIM = 20, 40, 30, 4, 6
USER_CAT_SIZES, ITEM_CAT_SIZES = [4, 5], [6, 3, 7]


def build(**overrides) -> Ranker:
    torch.manual_seed(0)
    cfg = RankerConfig(**{"dim": 8, "hidden": [32, 16], "dropout": 0.0, "two_tower_dim": TT_DIM, **overrides})
    model = Ranker(cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, n_user_counters=2, n_item_counters=3,
                   n_tokens=N_TOKENS)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    titles = torch.randint(2, N_TOKENS, (N_ITEMS, T), generator=g)
    titles[:2] = 0
    model.attach_titles(titles)
    model.attach_item_cats(torch.stack([torch.randint(2, s, (N_ITEMS,), generator=g) for s in ITEM_CAT_SIZES], dim=1))
    for p in model.parameters():  # away from the zero-initialised defaults, so every term matters
        p.data += 0.1 * torch.randn(p.shape, generator=g)
    return model.eval()


def inputs(n: int, seed: int = 0) -> tuple[UserInputs, ItemInputs]:
    g = torch.Generator().manual_seed(seed)
    user = UserInputs(user=torch.tensor(5), user_cats=torch.tensor([1, 3]), history=torch.tensor([7, 9, 11, 30, 0]),
                      counters=torch.rand(2, generator=g), vector=torch.randn(TT_DIM, generator=g),
                      history_mask=torch.tensor([True, True, True, True, False]))  # fmt: skip
    items = ItemInputs(
        item=torch.randint(2, N_ITEMS, (n,), generator=g),
        item_cats=torch.stack([torch.randint(0, s, (n,), generator=g) for s in ITEM_CAT_SIZES], dim=1),
        item_age_h=torch.rand(n, generator=g) * 48, counters=torch.rand(n, 3, generator=g),
        vectors=torch.randn(n, TT_DIM, generator=g), tokens=torch.randint(0, N_TOKENS, (n, T), generator=g),
    )  # fmt: skip
    return user, items


def expanded(user: UserInputs, items: ItemInputs) -> Batch:
    """The batch that repeats ``user`` for every candidate."""
    n = items.item.shape[0]
    zeros = torch.zeros(n)
    return Batch(
        user=user.user.expand(n), user_cats=user.user_cats.expand(n, -1), history=user.history.expand(n, -1),
        history_mask=user.history_mask.expand(n, -1), item=items.item, item_cats=items.item_cats,
        item_age_h=items.item_age_h, counters=torch.cat([user.counters.expand(n, -1), items.counters], dim=1),
        position=torch.arange(n), clicked=zeros, dwell_s=zeros, shared=zeros, hidden=zeros, weight=torch.ones(n),
        item_logq=zeros, request=torch.zeros(n, dtype=torch.long), item_tokens=items.tokens,
    )  # fmt: skip


@pytest.mark.parametrize("overrides", [
    {"interaction": "dcn"},
    {"interaction": "dcn", "cross_rank": 5, "cross_layers": 3},
    {"interaction": "dcn", "title_tokens": True, "history_match": True},
    {"interaction": "dcn", "cross_layers": 1, "title_tokens": True},
    {"interaction": "dot", "title_tokens": True, "history_match": True},
], ids=["dcn", "dcn_low_rank_3_layers", "dcn_match", "dcn_1_layer_titles", "dot_match"])  # fmt: skip
@pytest.mark.parametrize("quantize", ["none", "int8_linear"])
def test_score_candidates_equals_predict_on_the_expanded_batch(overrides, quantize):
    model = build(**overrides)
    if quantize != "none":
        model = quantize_ranker(model, quantize, min_linear_params=1)
    user, items = inputs(37)
    with torch.inference_mode():
        got = model.score_candidates(user, items)
        want = model.predict(expanded(user, items), user.vector.expand(37, -1), items.vectors)
    assert set(got) == {*HEADS, "value"}
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    assert got["value"].std() > 0  # the candidates differ: the comparison is not between constants


def test_the_first_cross_layer_splits_its_projection_exactly():
    torch.manual_seed(0)
    net = CrossNetwork(12, n_layers=2, rank=0)
    user, items = torch.randn(5), torch.randn(9, 7)
    full = net(torch.cat([user.expand(9, -1), items], dim=1))
    torch.testing.assert_close(net.forward_one_user(user, items), full, atol=1e-6, rtol=1e-6)
    assert net.forward_one_user(user, items[:0]).shape == (0, 12)
