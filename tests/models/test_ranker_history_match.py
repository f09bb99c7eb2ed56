"""The ranker's history match (``ranker.history_match``): the history's categorical bags and the
history/candidate cosines, which let a new item be matched to a user's past reading by its content."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from feedrank.models.ranker import ItemInputs, Ranker, RankerConfig, UserInputs

from .conftest import ITEM_CAT_SIZES, N_ITEMS, N_USERS, USER_CAT_SIZES, random_batch

N_TOKENS, T = 30, 4


def catalogue_cats(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(2, s, (N_ITEMS,), generator=g) for s in ITEM_CAT_SIZES], dim=1)


def titles(seed: int = 1) -> torch.Tensor:
    return torch.randint(2, N_TOKENS, (N_ITEMS, T), generator=torch.Generator().manual_seed(seed))


def ranker(history_match: bool = True, title_tokens: bool = True, **cfg) -> Ranker:
    torch.manual_seed(0)
    model = Ranker(RankerConfig(dim=8, hidden=[16], dropout=0.0, title_tokens=title_tokens, history_match=history_match,
                                **cfg),
                   N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES, n_user_counters=1, n_item_counters=1,
                   n_tokens=N_TOKENS)  # fmt: skip
    if title_tokens:
        model.attach_titles(titles())
    if history_match:
        model.attach_item_cats(catalogue_cats())
    return model.eval()


def with_catalogue(batch, cats: torch.Tensor):
    """The batch's candidates with the catalogue's categoricals and titles (as the feature build writes them)."""
    return dataclasses.replace(batch, item_cats=cats[batch.item], item_tokens=titles()[batch.item])


def match_inputs(model: Ranker, batch) -> torch.Tensor:
    """The cosines [B, n_pairs] the match field reads, captured on their way in."""
    seen = []
    handle = model.match.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        model.predict(batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("title_tokens", [True, False])
def test_every_pair_matches_a_history_of_the_candidate_itself(title_tokens):
    model = ranker(title_tokens=title_tokens)
    batch = with_catalogue(random_batch(b=6, empty_rows=0), catalogue_cats())
    own = dataclasses.replace(batch, history=batch.item[:, None].repeat(1, 3), history_mask=torch.ones(6, 3, dtype=torch.bool))
    cosines = match_inputs(model, own)
    assert cosines.shape == (6, title_tokens + 1 + len(ITEM_CAT_SIZES))  # title, id, one per item categorical
    # the history's mean of the candidate's own title, ID and values is the candidate's: cosine 1
    # for every pair, which a pair pointing at the wrong field would not give
    torch.testing.assert_close(cosines, torch.ones_like(cosines))
    other = match_inputs(model, batch)
    assert (other[:, 1:] < 0.999).any()  # other histories: other cosines


def test_the_history_bags_read_the_catalogue_categoricals_of_the_history_items():
    model = ranker()
    batch = with_catalogue(random_batch(b=8, empty_rows=2), catalogue_cats())
    before = model.predict(batch)["value"]
    changed = catalogue_cats(seed=5)
    changed[batch.item] = catalogue_cats()[batch.item]  # the candidates keep their values
    model.attach_item_cats(changed)
    after = model.predict(batch)["value"]
    has_history = batch.history_mask.any(dim=1)
    assert not torch.allclose(before[has_history], after[has_history])
    torch.testing.assert_close(before[~has_history], after[~has_history])  # nothing to pool: no change


def test_without_history_match_the_catalogue_categoricals_are_not_read():
    model = ranker(history_match=False)
    assert not model.reads_history_cats
    batch = with_catalogue(random_batch(b=4), catalogue_cats())
    assert match_inputs(model, batch).shape == (4, 1)  # the title match only
    model.predict(batch)  # no attach_item_cats needed


def test_serving_scores_equal_batch_scores_with_history_match():
    model = ranker(two_tower_dim=0)
    batch = with_catalogue(random_batch(b=7, empty_rows=0), catalogue_cats())
    row = 2
    user = UserInputs(user=batch.user[row], user_cats=batch.user_cats[row], history=batch.history[row],
                      counters=batch.counters[row, :1], history_mask=batch.history_mask[row])  # fmt: skip
    items = ItemInputs(item=batch.item, item_cats=batch.item_cats, item_age_h=batch.item_age_h,
                       counters=batch.counters[:, 1:], tokens=batch.item_tokens)  # fmt: skip
    same_user = dataclasses.replace(batch, **{f: getattr(batch, f)[row].expand_as(getattr(batch, f)).clone()
                                              for f in ("user", "user_cats", "history", "history_mask")},
                                    counters=torch.cat([batch.counters[row, :1].expand(7, 1), batch.counters[:, 1:]], 1))  # fmt: skip
    torch.testing.assert_close(model.score_candidates(user, items)["value"], model.predict(same_user)["value"],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_history_match_needs_the_catalogue_categoricals():
    model = Ranker(RankerConfig(dim=8, hidden=[16], history_match=True), N_USERS, N_ITEMS, USER_CAT_SIZES, ITEM_CAT_SIZES)
    assert model.reads_history_cats
    batch = dataclasses.replace(random_batch(b=4), counters=torch.zeros(4, 0))
    with pytest.raises(RuntimeError, match="attach_item_cats"):
        model.predict(batch)
    with pytest.raises(ValueError, match=r"\[n_items, n_item_cats\]"):
        model.attach_item_cats(torch.zeros(N_ITEMS, 1, dtype=torch.long))


def test_weights_saved_under_the_old_title_match_name_still_load():
    model = ranker(history_match=False)
    old = {(k.replace("match.", "title_match.", 1) if k.startswith("match.") else k): v for k, v in model.state_dict().items()}
    assert any(k.startswith("title_match.") for k in old)
    fresh = ranker(history_match=False)
    torch.nn.init.zeros_(fresh.match[0].weight)
    fresh.load_state_dict(old, strict=True)
    torch.testing.assert_close(fresh.match[0].weight, model.match[0].weight)
