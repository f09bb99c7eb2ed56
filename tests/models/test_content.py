"""The content-aware item side: title bags in the item tower and the ranker, ID dropout, the checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from feedrank.features.text import WORD_NORM, title_word_vectors
from feedrank.features.vocab import OOV
from feedrank.models.losses import two_tower_loss
from feedrank.models.ranker import ItemInputs, Ranker, RankerConfig, UserInputs, ranker_loss
from feedrank.models.towers import TitleBag, drop_ids
from feedrank.models.two_tower import TwoTower, TwoTowerConfig

from .conftest import ITEM_CAT_SIZES, N_ITEMS, N_USERS, USER_CAT_SIZES, random_batch

N_TOKENS, T = 30, 4


def titled(batch, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, N_TOKENS, (len(batch), T), generator=g)
    tokens[0] = 0  # an item without a title
    return dataclasses.replace(batch, item_tokens=tokens)


def item_titles(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    titles = torch.randint(2, N_TOKENS, (N_ITEMS, T), generator=g)
    titles[:2] = 0  # padding and OOV rows have no title
    return titles


def two_tower(**cfg) -> TwoTower:
    model = TwoTower(TwoTowerConfig(dim=8, user_id_dim=4, item_id_dim=8, cat_dim=4, hidden=[16], title_dim=6, **cfg),
                     N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, n_counters=2, n_tokens=N_TOKENS)  # fmt: skip
    model.attach_catalogue(torch.zeros(N_ITEMS, len(ITEM_CAT_SIZES), dtype=torch.long), item_tokens=item_titles())
    return model


def test_the_item_vector_depends_on_the_title_and_trains_end_to_end():
    model, batch = two_tower(), titled(random_batch())
    v = model.batch_item_vectors(batch)
    other = model.batch_item_vectors(dataclasses.replace(batch, item_tokens=batch.item_tokens.flip(0)))
    assert v.shape == (len(batch), 8) and torch.allclose(v.norm(dim=-1), torch.ones(len(batch)), atol=1e-5)
    assert not torch.allclose(v[1:], other[1:])
    loss, _ = two_tower_loss(model, batch)
    loss.backward()
    assert model.item_tower.title.bag.weight.grad.abs().sum() > 0
    assert model.item_tower.title.bag.weight.grad[0].abs().sum() == 0  # padding never trains


def test_the_user_history_reads_the_titles_of_its_items():
    model, batch = two_tower(), titled(random_batch())
    u = model.user_vectors(batch)
    model.item_tower.attach_titles(item_titles(seed=7))
    assert not torch.allclose(u[1:], model.user_vectors(batch)[1:])  # other titles, other history vectors


def test_a_tower_that_reads_titles_refuses_a_batch_without_them():
    model = two_tower()
    with pytest.raises(ValueError, match="reads titles"):
        model.batch_item_vectors(random_batch())
    with pytest.raises(ValueError, match=r"item_tokens must be \[8, T\]"):
        model.item_vectors(torch.arange(2, 10), torch.zeros(8, 3, dtype=torch.long), torch.zeros(8), torch.zeros(8, dtype=torch.long))
    fresh = TwoTower(model.cfg, N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, n_counters=2, n_tokens=N_TOKENS)
    with pytest.raises(RuntimeError, match="attach_titles"):
        fresh.user_vectors(titled(random_batch()))


def test_an_id_only_tower_ignores_titles():
    model = TwoTower(TwoTowerConfig(dim=8, item_id_dim=8, hidden=[16]), N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES).eval()
    batch = titled(random_batch())
    assert not model.reads_titles
    torch.testing.assert_close(model.batch_item_vectors(batch), model.batch_item_vectors(dataclasses.replace(batch, item_tokens=None)))


def test_id_dropout_reads_a_share_of_ids_as_oov_in_training_only():
    ids = torch.arange(2, 10002)
    dropped = drop_ids(ids, 0.3, training=True)
    share = (dropped == OOV).float().mean().item()
    assert 0.27 < share < 0.33 and torch.equal(dropped[dropped != OOV], ids[dropped != OOV])
    assert torch.equal(drop_ids(ids, 0.3, training=False), ids)


def test_config_checks_name_the_setting():
    with pytest.raises(ValueError, match="title_dim"):
        TwoTowerConfig(title_dim=-1).validate()
    with pytest.raises(ValueError, match="item_id_dropout"):
        TwoTowerConfig(item_id_dropout=1.0).validate()
    with pytest.raises(ValueError, match="item_id_dropout"):
        RankerConfig(item_id_dropout=-0.1).validate()
    with pytest.raises(ValueError, match="token vocabulary"):
        TitleBag(0, 4)


def ranker(**cfg) -> Ranker:
    model = Ranker(RankerConfig(dim=8, hidden=[16], title_tokens=True, item_id_dropout=0.2, **cfg), N_USERS, N_ITEMS,
                   USER_CAT_SIZES, ITEM_CAT_SIZES, n_user_counters=2, n_item_counters=0, n_tokens=N_TOKENS)  # fmt: skip
    model.attach_titles(item_titles())
    return model


def test_the_ranker_scores_candidates_from_their_titles_and_matches_batch_scoring():
    model, batch = ranker(), titled(random_batch())
    loss, _ = ranker_loss(model, batch)
    loss.backward()
    assert model.title.bag.weight.grad.abs().sum() > 0
    model.eval()
    row = 3
    user = UserInputs(user=batch.user[row], user_cats=batch.user_cats[row], history=batch.history[row],
                      counters=batch.counters[row], history_mask=batch.history_mask[row])  # fmt: skip
    items = ItemInputs(item=batch.item, item_cats=batch.item_cats, item_age_h=batch.item_age_h,
                       counters=torch.zeros(len(batch), 0), tokens=batch.item_tokens)  # fmt: skip
    same_user = dataclasses.replace(batch, **{f: getattr(batch, f)[row].expand_as(getattr(batch, f)).clone()
                                              for f in ("user", "user_cats", "history", "history_mask", "counters")})  # fmt: skip
    torch.testing.assert_close(model.score_candidates(user, items)["value"], model.predict(same_user)["value"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reads titles"):
        model.score_candidates(user, dataclasses.replace(items, tokens=None))
    empty = dataclasses.replace(user, history=torch.zeros(0, dtype=torch.long), history_mask=None)
    assert model.score_candidates(empty, items)["value"].shape == (len(batch),)  # a cold user: no history at all


def test_a_two_tower_reading_titles_embeds_a_user_without_history():
    model = two_tower().eval()
    batch = titled(random_batch())
    cold = dataclasses.replace(batch, history=torch.zeros(len(batch), 0, dtype=torch.long),
                               history_mask=torch.zeros(len(batch), 0, dtype=torch.bool))  # fmt: skip
    assert model.user_vectors(cold).shape == (len(batch), 8)


def test_word_vectors_put_words_that_share_titles_together():
    # two topics: words 2-5 always appear together, words 6-9 together
    rng = np.random.default_rng(0)
    titles = np.array([rng.choice([2, 3, 4, 5], 3, replace=False) if i % 2 else rng.choice([6, 7, 8, 9], 3, replace=False)
                       for i in range(200)])  # fmt: skip
    vectors = title_word_vectors(titles, n_tokens=12, dim=4)
    assert vectors.shape == (12, 4) and not vectors[:2].any() and not vectors[10:].any()  # pad, OOV, unused words
    np.testing.assert_allclose(np.linalg.norm(vectors[2:10], axis=1), WORD_NORM, rtol=1e-5)
    unit = vectors[2:10] / WORD_NORM
    cos = unit @ unit.T
    assert cos[:4, :4].mean() > cos[:4, 4:].mean() + 0.5
    np.testing.assert_array_equal(vectors, title_word_vectors(titles, n_tokens=12, dim=4))  # deterministic


def test_evaluation_scores_a_two_tower_that_reads_titles_with_its_titles():
    from feedrank.evaluate.ranking import TWO_TOWER, RankerScorer

    tower, batch = two_tower().eval(), titled(random_batch())
    out = RankerScorer(ranker(two_tower_dim=8).eval(), tower)(batch)
    expected = (tower.user_vectors(batch) * tower.batch_item_vectors(batch)).sum(-1) / tower.temperature()
    torch.testing.assert_close(out[TWO_TOWER], expected)
