"""A served ranker that reads user x category counters gets the user's counts from the log and from POST /events."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feedrank.bundle import load_bundle, save_bundle
from feedrank.config import to_dict
from feedrank.data.log import read_events
from feedrank.features.counters import scale_counts
from feedrank.features.vocab import FIRST_ID, ITEM_CAT_COLUMNS, lookup_quiet
from feedrank.models.ranker import Ranker, RankerConfig
from feedrank.serving.pipeline import FeedService
from feedrank.serving.state import EventIn

from .conftest import TickingClock, serving_config

CATEGORY = ITEM_CAT_COLUMNS.index("category")


@pytest.fixture
def service(serving_world, tmp_path):
    tt = serving_world.two_tower
    rcfg = RankerConfig(dim=8, hidden=[32], two_tower_dim=16, dropout=0.0, max_history_len=20)
    torch.manual_seed(0)
    model = Ranker(rcfg, tt.vocabs.n_users, tt.vocabs.n_items, tt.vocabs.user_cat_sizes, tt.vocabs.item_cat_sizes, 2, 3,
                   cross_counters=["category"])  # fmt: skip
    config = {"ranker": to_dict(rcfg), "features": {"cross_counters": ["category"]}}  # what build_ranker reads back
    bundle = load_bundle(save_bundle(tmp_path / "ranker", kind="ranker", model=model, config=config, vocabs=tt.vocabs,
                                     catalogue=tt.catalogue))  # fmt: skip
    assert bundle.model.cross_counters == ("category",)
    svc = FeedService(tt, serving_config(tmp_path), ranker=bundle, log_dir=serving_world.log,
                      clock=TickingClock(serving_world.start))  # fmt: skip
    yield svc
    svc.close()


def _scored(service, monkeypatch) -> list:
    """The ItemInputs of every score_candidates call of the service's ranker."""
    calls, model = [], service.ranker.bundle.model
    real = model.score_candidates
    monkeypatch.setattr(model, "score_candidates", lambda user, items: calls.append(items) or real(user, items))
    return calls


def test_the_feed_reads_the_users_category_counts_from_the_log_then_from_events(service, serving_world, monkeypatch):
    events = read_events(serving_world.log)
    user = events["user_id"][int(np.argmax(events["clicked"].to_numpy()))].as_py()  # a user with a click
    mine = events.filter(events["user_id"].to_numpy(zero_copy_only=False) == user)
    vocab = service.ranker.bundle.vocabs.item_cats["category"]
    logged = lookup_quiet(vocab, mine["category"])
    clicked = mine["clicked"].to_numpy()
    calls = _scored(service, monkeypatch)

    feed = service.feed(user, k=10)
    items = calls[-1]
    cats = items.item_cats[:, CATEGORY].numpy()
    want = scale_counts(np.stack([[(logged == c).sum(), ((logged == c) & clicked).sum()] for c in cats]))
    np.testing.assert_array_equal(items.cross_counters.numpy(), want)
    assert (want[:, 0] > 0).any()

    # a click on an item of the candidates' most common category: the others of it now count it
    values, counts = np.unique(cats, return_counts=True)
    clicked_cat = int(values[np.argmax(counts)])
    index = int(items.item[np.flatnonzero(cats == clicked_cat)[0]])
    item_id = service.ranker.bundle.vocabs.items.ids[index - FIRST_ID]  # the ranker's vocabulary is the two-tower's here
    assert service.record_events([EventIn(user_id=user, item_id=item_id, clicked=True, dwell_s=5.0)]) == 1
    service.feed(user, k=10)
    items = calls[-1]
    cats = items.item_cats[:, CATEGORY].numpy()
    extra = (cats == clicked_cat)[:, None].astype(np.int64)
    want = scale_counts(np.stack([[(logged == c).sum(), ((logged == c) & clicked).sum()] for c in cats]) + extra)
    np.testing.assert_array_equal(items.cross_counters.numpy(), want)
    assert extra.any()
