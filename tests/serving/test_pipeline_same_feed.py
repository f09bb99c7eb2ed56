"""The serving shortcuts (issue #15) change no feed: a content-aware two-tower and a ranker with
titles and history-match fields, served as usual, against the same service computing the user
vector with ``TwoTower.user_vectors`` (no precomputed history rows) and the scores with
``Ranker.predict`` on the batch that repeats the user for every candidate (no user-side
shortcuts). Ids, order, sources and reasons must be identical; scores equal up to float rounding.
(``test_pipeline_golden.py`` pins the ID-only models' feeds to a recording made before the work.)"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from feedrank.bundle import build_two_tower, load_bundle, save_bundle
from feedrank.config import to_dict
from feedrank.data.batch import Batch
from feedrank.data.user_batch import user_batch
from feedrank.features.counters import user_counters
from feedrank.features.vocab import ITEM_CAT_COLUMNS, OOV, USER_CAT_COLUMNS
from feedrank.models.ranker import ItemInputs, Ranker, RankerConfig, UserInputs
from feedrank.serving.items import ItemIn
from feedrank.serving.pipeline import FeedService, history_rows
from feedrank.serving.rerank import RerankConfig

from .conftest import TT_CONFIG, TickingClock, serving_config

CONTENT = {"two_tower": {**TT_CONFIG["two_tower"], "title_dim": 8}}


@pytest.fixture(scope="module")
def bundles(serving_world, tmp_path_factory):
    """(content two-tower, ranker with titles + history match), untrained (seeded), over the world's vocabularies."""
    root, vocabs, catalogue = tmp_path_factory.mktemp("same_feed"), serving_world.two_tower.vocabs, serving_world.two_tower.catalogue
    torch.manual_seed(0)
    tt = build_two_tower(CONTENT, vocabs)
    cfg = RankerConfig(dim=8, hidden=[32], two_tower_dim=16, dropout=0.0, max_history_len=20, title_tokens=True,
                       history_match=True)  # fmt: skip
    ranker = Ranker(cfg, vocabs.n_users, vocabs.n_items, vocabs.user_cat_sizes, vocabs.item_cat_sizes, 2, 3,
                    n_tokens=len(vocabs.tokens))  # fmt: skip
    with torch.no_grad():  # away from the zero-initialised defaults, so every input moves the score
        for p in ranker.parameters():
            p += 0.1 * torch.randn(p.shape)
    return (load_bundle(save_bundle(root / "tt", kind="two_tower", model=tt, config=CONTENT, vocabs=vocabs, catalogue=catalogue)),
            load_bundle(save_bundle(root / "rk", kind="ranker", model=ranker, config={"ranker": to_dict(cfg)}, vocabs=vocabs,
                                    catalogue=catalogue)))  # fmt: skip


def plain_tower_vector(self: FeedService, view, known_user: bool) -> np.ndarray:
    """The user vector by ``TwoTower.user_vectors`` on the user's batch (the pre-#15 path)."""
    history = view.history[-self.model.cfg.max_history_len :]
    history = np.where(history < self.model.n_items, history, OOV)
    batch = user_batch(np.array([self.users(view.user_id) if known_user else OOV], dtype=np.int64),
                       np.array([[self.user_cats[c](view.cats[c]) for c in USER_CAT_COLUMNS]], dtype=np.int64),
                       np.array([0, len(history)]), history, user_counters(view.impressions, view.clicks)[None],
                       len(ITEM_CAT_COLUMNS))  # fmt: skip
    with torch.inference_mode():
        return self.model.user_vectors(batch)[0].numpy()


def plain_scores(self: Ranker, user: UserInputs, items: ItemInputs) -> dict[str, torch.Tensor]:
    """``Ranker.predict`` on the batch that repeats ``user`` for each of the N candidates."""
    n = items.item.shape[0]
    mask = torch.ones_like(user.history, dtype=torch.bool) if user.history_mask is None else user.history_mask
    zeros = torch.zeros(n)
    batch = Batch(user=user.user.expand(n), user_cats=user.user_cats.expand(n, -1), history=user.history.expand(n, -1),
                  history_mask=mask.expand(n, -1), item=items.item, item_cats=items.item_cats, item_age_h=items.item_age_h,
                  counters=torch.cat([user.counters.expand(n, -1), items.counters], dim=1), position=torch.zeros(n, dtype=torch.long),
                  clicked=zeros, dwell_s=zeros, shared=zeros, hidden=zeros, weight=torch.ones(n), item_logq=zeros,
                  request=torch.zeros(n, dtype=torch.long), item_tokens=items.tokens)  # fmt: skip
    return self.predict(batch, user.vector.expand(n, -1), items.vectors)


def feeds(service: FeedService, users: list[str]) -> dict[str, list[list]]:
    out = {}
    for user in users:
        for _ in range(2):  # tower (miss) then cached (hit)
            feed = service.feed(user, k=20)
            out.setdefault(user, []).append([[i.item_id, i.source, i.reason, i.publisher, i.score] for i in feed.items])
    return out


def test_the_served_feed_equals_the_plain_model_path(bundles, serving_world, tmp_path, monkeypatch):
    two_tower, ranker = bundles
    make = lambda name: FeedService(two_tower, serving_config(tmp_path / name, rerank=RerankConfig(per_publisher_cap=3)),  # noqa: E731
                                    ranker=ranker, log_dir=serving_world.log, clock=TickingClock(serving_world.start))
    fast, plain = make("fast"), make("plain")
    words = " ".join(two_tower.vocabs.tokens.ids[:40])  # published items (the ranker's rows extended), long titles
    published = [ItemIn(item_id=f"new-{i}", title=" ".join(words.split()[i : i + 12]), publisher="p0") for i in range(3)]
    try:
        fast.publish_items(published)
        plain.publish_items(published)
        users = sorted(fast.store._snapshot.row_of)[:8] + ["someone-new"]
        got = feeds(fast, users)
        plain._tower_vector = types.MethodType(plain_tower_vector, plain)
        plain.default_vector = plain._tower_vector(fast.store.view("", serving_world.start), known_user=False)
        with monkeypatch.context() as patch:
            patch.setattr(Ranker, "score_candidates", plain_scores)
            want = feeds(plain, users)
    finally:
        fast.close()
        plain.close()
    np.testing.assert_allclose(fast.default_vector, plain.default_vector, atol=1e-6)
    assert sum(len(runs[0]) for runs in got.values()) >= 8 * 10  # real feeds, not empty ones
    assert any(item[0].startswith("new-") for runs in got.values() for item in runs[0])  # published items were ranked
    for user in users:
        for g, w in zip(got[user], want[user], strict=True):
            assert [x[:4] for x in g] == [x[:4] for x in w], user
            assert [x[4] for x in g] == pytest.approx([x[4] for x in w], abs=1e-5), user


def test_history_rows_are_the_item_towers_history_embedding(bundles, serving_world):
    for model in (bundles[0].model, serving_world.two_tower.model):  # with titles, and ID only (the ID table itself)
        rows = history_rows(model, chunk=7)
        assert rows.shape == (model.n_items, model.cfg.item_id_dim)
        with torch.inference_mode():
            torch.testing.assert_close(rows, model.item_tower.embed_history(torch.arange(model.n_items)[None])[0])
