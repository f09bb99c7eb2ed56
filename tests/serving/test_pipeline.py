"""The feed pipeline without HTTP: paths, invalidation, cold start, candidates, ranking, events."""

import dataclasses
import datetime as dt
import time

import numpy as np
import pytest

from feedrank.data.log import read_events
from feedrank.index import load_index, read_manifest, save_index
from feedrank.serving.cache import MemoryCache
from feedrank.serving.config import EventLogConfig, StoreConfig
from feedrank.serving.follow import LogFollower
from feedrank.serving.pipeline import EventError, FeedRequestError, FeedService, make_clock, sorted_hits
from feedrank.serving.rerank import RerankConfig
from feedrank.serving.state import EventIn


def warm_user(service: FeedService) -> str:
    """A user of the log with a non-empty history (the store's first such user)."""
    for user in sorted(service.store._snapshot.row_of):
        if len(service.store.view(user, service.clock()).history) >= 3:
            return user
    raise AssertionError("the test world has no user with history")


def test_warm_user_goes_tower_then_cache_and_gets_k_distinct_items(make_service, backend_cache):
    service = make_service(cache=backend_cache)
    user = warm_user(service)
    first = service.feed(user, k=8)
    assert (first.path, first.cache) == ("tower", "miss")
    assert len(first.items) == 8 and len({i.item_id for i in first.items}) == 8
    second = service.feed(user, k=8)
    assert (second.path, second.cache) == ("cached", "hit")
    assert [i.item_id for i in second.items] == [i.item_id for i in first.items]
    assert set(first.timings_ms) == {"user", "ann", "rank", "rerank", "total"}
    assert first.timings_ms["total"] >= sum(first.timings_ms[s] for s in ("user", "ann", "rank", "rerank")) * 0.99
    assert first.server_timing().startswith("user;dur=")


def test_response_to_dict_is_dataclasses_asdict(make_service):
    """The hand-written body (asdict was a share of each feed's time) keeps asdict's keys, order and values."""
    feed = make_service().feed("someone-new", k=5)
    assert list(feed.to_dict().items()) == list(dataclasses.asdict(feed).items())


def test_event_invalidates_the_cached_vector_and_changes_the_next_feed(make_service, backend_cache):
    service = make_service(cache=backend_cache)
    user = warm_user(service)
    before = service.feed(user, k=10)
    old_vector = np.array(backend_cache.get(user))
    clicked = before.items[0].item_id
    assert service.record_events([EventIn(user_id=user, item_id=clicked, clicked=True, dwell_s=20.0)]) == 1
    assert backend_cache.get(user) is None  # invalidated
    after = service.feed(user, k=10)
    assert (after.path, after.cache) == ("tower", "miss")  # recomputed, not served stale
    assert clicked not in [i.item_id for i in after.items]  # seen now
    new_vector = backend_cache.get(user)
    assert not np.allclose(new_vector, old_vector)  # the history moved the vector
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]


def test_cold_start_user_gets_a_diverse_non_empty_feed(make_service):
    service = make_service(rerank=RerankConfig(per_publisher_cap=2))
    feed = service.feed("someone-new", k=10)
    assert (feed.path, feed.cache) == ("cold_start", "miss")
    assert len(feed.items) == 10
    publishers = [i.publisher for i in feed.items]
    assert len(set(publishers)) >= 5  # a cap of 2 over 10 items forces at least 5 publishers
    assert max(publishers.count(p) for p in set(publishers)) <= 2
    assert any("popular" in i.source for i in feed.items)
    assert service.metrics.cold_starts._value.get() == 1


def test_cold_start_uses_the_learned_default_vector_of_the_oov_user(make_service):
    service = make_service()
    view = service.store.view("nobody", service.clock())
    assert np.allclose(service.default_vector, service._tower_vector(view, known_user=False))
    ids = lambda user: [i.item_id for i in service.feed(user, k=5).items]  # noqa: E731
    assert ids("nobody") == ids("nobody-else")  # one learned default for everybody new


def test_a_new_user_with_an_event_leaves_cold_start(make_service):
    service = make_service()
    item = service.feed("newbie", k=3).items[0].item_id
    service.record_events([EventIn(user_id="newbie", item_id=item, clicked=True, dwell_s=5.0)])
    feed = service.feed("newbie", k=3)
    assert feed.path == "tower" and item not in [i.item_id for i in feed.items]


def test_candidates_are_tagged_deduplicated_and_exclude_seen_and_unpublished(make_service):
    service = make_service()
    user = warm_user(service)
    now = service.clock()
    view = service.store.view(user, now)
    vector = service._tower_vector(view, known_user=True)
    rows, sources = service._candidates(vector, view, int(now.timestamp() * 1e6), cold=False)
    assert len(rows) == len(np.unique(rows))
    assert not np.isin(rows, view.seen).any() and len(view.seen) > 0
    assert set(sources) <= {"ann", "fresh", "ann+fresh"}
    newest = service.catalogue.newest(int(now.timestamp() * 1e6), 20)
    fresh_tagged = set(rows[np.array(["fresh" in s for s in sources])])
    assert fresh_tagged == set(newest) - set(view.seen)
    # a clock set before some items were created: those are never candidates
    early = service.catalogue.born_us[service.catalogue.rankable].min() + 1
    rows_early, _ = service._candidates(vector, view, int(early), cold=True)
    assert (service.catalogue.born_us[rows_early] <= early).all()


@pytest.mark.parametrize("seed", range(4))
def test_sorted_hits_marks_what_isin_marks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        values = np.unique(rng.integers(0, 50, rng.integers(0, 30)))
        queries = rng.integers(-5, 60, rng.integers(0, 20))  # below, inside and past the values
        marked = np.zeros(len(values), bool)
        marked[sorted_hits(values, queries)] = True
        np.testing.assert_array_equal(marked, np.isin(values, queries))


def test_ranker_scores_differ_from_the_two_tower_score(make_service):
    with_ranker, without = make_service(ranker=True), make_service(ranker=False)
    user = warm_user(with_ranker)
    a, b = with_ranker.feed(user, k=10), without.feed(user, k=10)
    assert a.model_versions == {"two_tower": with_ranker.two_tower.version, "ranker": with_ranker.ranker_bundle.version}
    assert [i.score for i in a.items] != [i.score for i in b.items]


def test_two_tower_score_is_the_dot_product_over_the_temperature(make_service):
    service = make_service(ranker=False, rerank=RerankConfig(mmr_lambda=1.0, per_publisher_cap=None))
    user = warm_user(service)
    feed = service.feed(user, k=5)
    vector = np.asarray(service.cache.get(user))
    for item in feed.items:
        row = service.items(item.item_id)
        assert item.score == pytest.approx(float(service.catalogue.vectors[row] @ vector) / service.temperature, rel=1e-5)
    assert [i.score for i in feed.items] == sorted((i.score for i in feed.items), reverse=True)  # lambda 1: by score


def test_k_is_validated(make_service):
    service = make_service()
    assert len(service.feed("u1").items) == service.cfg.k_default
    for bad in (0, -1, 51, 2.5, True):
        with pytest.raises(FeedRequestError, match=r"k must be an integer in \[1, 50\]"):
            service.feed("u1", k=bad)
    with pytest.raises(FeedRequestError, match="user_id"):
        service.feed("", k=3)


def test_events_are_logged_readable_by_read_events_with_metadata_filled_in(make_service, tmp_path):
    service = make_service()
    user = warm_user(service)
    item = service.catalogue.item_ids[service.catalogue.rankable[0]]
    n = service.record_events([EventIn(user_id=user, item_id=item, clicked=True, dwell_s=3.5, position=2),
                               EventIn(user_id="new-user", item_id=item, request_id="r-1")])  # fmt: skip
    assert n == 2
    rows = read_events(tmp_path / "serving_log").sort_by("user_id").to_pylist()
    assert [r["user_id"] for r in rows] == sorted([user, "new-user"])
    mine = next(r for r in rows if r["user_id"] == user)
    assert (mine["clicked"], mine["dwell_s"], mine["position"]) == (True, 3.5, 2)
    assert mine["publisher"] == service.catalogue.publishers[service.items(item)]
    assert mine["country"] is not None  # from the store (the user is in the log)
    assert mine["request_id"].startswith("srv-")
    assert next(r for r in rows if r["user_id"] == "new-user")["request_id"] == "r-1"


def test_unknown_item_is_refused_and_nothing_is_logged_or_applied(make_service, tmp_path):
    service = make_service()
    user = warm_user(service)
    good = service.catalogue.item_ids[service.catalogue.rankable[0]]
    before = service.store.view(user, service.clock())
    with pytest.raises(EventError, match=r"events\[1\].item_id: unknown item 'no-such-item'"):
        service.record_events([EventIn(user_id=user, item_id=good, clicked=True),
                               EventIn(user_id=user, item_id="no-such-item")])  # fmt: skip
    assert not list((tmp_path / "serving_log" / "events").glob("date=*/*.parquet"))
    assert service.store.view(user, service.clock()).impressions == before.impressions
    assert service.metrics.events.labels("rejected")._value.get() == 2


def test_schema_rules_reject_events_naming_the_rule(make_service):
    service = make_service()
    item = service.catalogue.item_ids[service.catalogue.rankable[0]]
    with pytest.raises(EventError, match="dwell_s > 0 on an unclicked impression"):
        service.record_events([EventIn(user_id="u", item_id=item, clicked=False, dwell_s=4.0)])
    twice = EventIn(user_id="u", item_id=item, request_id="r", ts="2024-01-04T00:00:00Z")
    with pytest.raises(EventError, match="duplicate row"):
        service.record_events([twice, twice])
    with pytest.raises(EventError, match="no events"):
        service.record_events([])


def test_index_is_saved_then_loaded_when_the_model_version_matches(make_service, tmp_path):
    index_dir = str(tmp_path / "index")
    first = make_service(index_dir=index_dir)
    assert first.index_origin.startswith("built and saved")
    assert read_manifest(index_dir).model_version == first.two_tower.version
    second = make_service(index_dir=index_dir)
    assert second.index_origin.startswith("loaded")
    # another model version in the manifest -> rebuilt, not trusted
    index = load_index(index_dir)
    index.model_version = "another-model"
    save_index(index, index_dir)
    third = make_service(index_dir=index_dir)
    assert third.index_origin.startswith("built and saved")
    assert read_manifest(index_dir).model_version == first.two_tower.version


def test_without_a_log_known_users_use_the_tower_and_unknown_ones_cold_start(make_service, serving_world):
    service = make_service(log=False)
    known = serving_world.two_tower.vocabs.users.ids[0]
    assert service.feed(known, k=3).path == "tower"
    assert service.feed("stranger", k=3).path == "cold_start"


def test_make_clock_starts_at_start_time_and_advances():
    start = dt.datetime(2024, 1, 4, tzinfo=dt.timezone.utc)
    before = time.monotonic()
    clock = make_clock("2024-01-04T00:00:00")
    a, b = clock(), clock()
    elapsed = dt.timedelta(seconds=time.monotonic() - before)
    # it advances in real time from start_time: by no more than the real time this test took
    assert a.tzinfo is not None and start <= a <= b <= start + elapsed


def test_bad_bundles_are_refused(serving_world, serving_cfg):
    cfg = serving_cfg()
    with pytest.raises(ValueError, match="expected a two_tower bundle"):
        FeedService(serving_world.ranker, cfg)
    with pytest.raises(ValueError, match="expected a ranker bundle"):
        FeedService(serving_world.two_tower, cfg, ranker=serving_world.two_tower)
    bad = dataclasses.replace(serving_world.ranker, model=type(serving_world.ranker.model)(
        dataclasses.replace(serving_world.ranker.model.cfg, two_tower_dim=7), 10, serving_world.two_tower.vocabs.n_items,
        [5, 5], [5, 5, 5], 2, 3))  # fmt: skip
    with pytest.raises(ValueError, match="two-tower vectors of dim 7"):
        FeedService(serving_world.two_tower, cfg, ranker=bad)


def test_a_restart_replays_the_serving_log_once(make_service, shared_clock):
    first = make_service(clock=shared_clock)
    user = warm_user(first)
    clicked = first.feed(user, k=10).items[0].item_id
    first.record_events([EventIn(user_id=user, item_id=clicked, clicked=True, dwell_s=5.0)])
    state = first.store.view(user, shared_clock())
    first.close()  # or killed: the event was on disk before record_events returned
    second = make_service(clock=shared_clock)  # same serving log
    assert second.replayed == 1
    assert clicked not in [i.item_id for i in second.feed(user, k=10).items]
    again = second.store.view(user, shared_clock())
    assert (again.impressions, again.clicks, again.history.tolist(), sorted(again.seen.tolist())) == \
           (state.impressions, state.clicks, state.history.tolist(), sorted(state.seen.tolist()))  # fmt: skip
    assert second._catch_up() == 0  # nothing new: replaying is idempotent
    everything = LogFollower(second.cfg.event_log.dir).poll()  # even applying every file again
    assert second._apply_foreign(everything, "a test") == 0
    assert second.store.view(user, shared_clock()).impressions == state.impressions


def test_a_retried_event_id_is_logged_and_applied_once(make_service, tmp_path):
    service = make_service()
    user = warm_user(service)
    item = service.catalogue.item_ids[service.catalogue.rankable[0]]
    before = service.store.view(user, service.clock()).impressions
    event = EventIn(user_id=user, item_id=item, clicked=True, event_id="client-42")
    assert service.record_events([event]) == 1
    assert service.record_events([event]) == 1  # the response was lost, the client retried
    assert service.store.view(user, service.clock()).impressions == before + 1
    assert read_events(tmp_path / "serving_log").num_rows == 1
    assert service.metrics.events.labels("duplicate")._value.get() == 1


def test_workers_converge_through_the_shared_log_without_a_bus(make_service, shared_clock):
    a = make_service(clock=shared_clock)
    b = make_service(clock=shared_clock, store=StoreConfig(catch_up_interval_s=0.05))
    user = warm_user(a)
    clicked = b.feed(user, k=10).items[0].item_id
    a.record_events([EventIn(user_id=user, item_id=clicked, clicked=True)])
    deadline = time.monotonic() + 30
    while b.metrics.events.labels("from_log")._value.get() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert clicked not in [i.item_id for i in b.feed(user, k=10).items]
    assert b.store.view(user, shared_clock()).impressions == a.store.view(user, shared_clock()).impressions


def test_the_seeding_log_cannot_be_the_serving_log(make_service, serving_world):
    with pytest.raises(ValueError, match="same folder"):
        make_service(event_log=EventLogConfig(dir=str(serving_world.log)))


class FlakyCache(MemoryCache):
    """A memory cache whose invalidations fail while ``down`` (a Redis that is paused)."""

    down = False

    def invalidate(self, user_id: str) -> bool:
        return False if self.down else super().invalidate(user_id)


def test_a_failed_invalidation_keeps_the_stale_vector_out_of_feeds(make_service):
    cache = FlakyCache(1000, 600)
    service = make_service(cache=cache)
    user = warm_user(service)
    clicked = service.feed(user, k=10).items[0].item_id
    cache.down = True
    service.record_events([EventIn(user_id=user, item_id=clicked, clicked=True)])
    assert cache.get(user) is not None  # the old vector is still cached
    after = service.feed(user, k=10)
    assert (after.path, after.cache) == ("tower", "error")  # recomputed from the new state, not the stale hit
    cache.down = False
    assert service.feed(user, k=10).cache == "miss"  # the retried invalidation succeeded
    assert service.feed(user, k=10).cache == "hit"


def test_a_quantized_ranker_serves_close_scores_and_an_unknown_mode_is_refused(make_service, serving_cfg):
    """serving.quantize swaps the ranker for ``quantize_ranker``'s copy; the feed keeps its items
    nearly in order (int8 noise only) and /healthz says which ranker serves."""
    plain, quantized = make_service(), make_service(quantize="int8")
    user = warm_user(plain)
    assert quantized.health()["ranker_quantize"] == "int8" and plain.health()["ranker_quantize"] == "none"
    assert plain.ranker.bundle.model is not quantized.ranker.bundle.model  # the loaded bundle is left as it was
    a, b = plain.feed(user, 10).to_dict()["items"], quantized.feed(user, 10).to_dict()["items"]
    scores = {item["item_id"]: item["score"] for item in a}
    shared = [item for item in b if item["item_id"] in scores]
    assert len(shared) >= 7  # int8 moves a few items at the boundary at most
    assert max(abs(item["score"] - scores[item["item_id"]]) for item in shared) < 0.05
    with pytest.raises(ValueError, match="quantize must be one of"):
        serving_cfg(quantize="int4").validate()
