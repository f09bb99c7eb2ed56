"""Full-catalogue retrieval evaluation against hand-computed values (3 users, 5 items, a fixed model)."""

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from feedrank.bundle import build_catalogue
from feedrank.data.schema import TS_TYPE
from feedrank.data.log import write_log
from feedrank.evaluate.retrieval import UserState, evaluate_holdout, evaluate_ranking, user_state
from feedrank.features.vocab import ITEM_CAT_COLUMNS, USER_CAT_COLUMNS, Vocab, Vocabularies

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
ITEMS = ["i1", "i2", "i3", "i4", "i5"]  # vocabulary indices 2..6
D1 = 1 / math.log2(3)  # DCG of a hit at rank 2


def vocabs() -> Vocabularies:
    return Vocabularies(
        users=Vocab("user_id", ["u1", "u2"]),
        items=Vocab("item_id", ITEMS),
        user_cats={c: Vocab(c, []) for c in USER_CAT_COLUMNS},
        item_cats={c: Vocab(c, []) for c in ITEM_CAT_COLUMNS},
    )


def catalogue(v: Vocabularies) -> pa.Table:
    """Training clicks i1:3, i4:2, i3:1, i2:0 (2 impressions), i5:0 (1): popularity i1 > i4 > i3 > i2 > i5."""
    rows = [("i1", True)] * 3 + [("i4", True)] * 2 + [("i3", True), ("i2", False), ("i2", False), ("i5", False)]
    n = len(rows)
    return build_catalogue(pa.table({
        "item_id": [r[0] for r in rows],
        "ts": pa.array([T0 + dt.timedelta(minutes=i) for i in range(n)], TS_TYPE),
        "clicked": [r[1] for r in rows],
        "created_ts": pa.nulls(n, TS_TYPE),
        **{c: pa.nulls(n, pa.string()) for c in ITEM_CAT_COLUMNS},
    }), v)  # fmt: skip


class FixedModel(nn.Module):
    """Stand-in two-tower: item index 2+j is the unit vector e_j; users have fixed score rows."""

    def __init__(self, user_rows: dict[int, list[float]]):
        super().__init__()
        self.users = torch.zeros(4, 5)
        for idx, row in user_rows.items():
            self.users[idx] = torch.tensor(row)
        self.items = torch.cat([torch.zeros(2, 5), torch.eye(5)])

    def user_vectors(self, batch):
        return self.users[batch.user]

    def item_vectors(self, item_idx, item_cats, item_age_h):
        return self.items[item_idx]


# u1 (index 2) prefers i1 > i2 > ...; u2 (index 3) the reverse; u3 is unknown (OOV index 1): i3, i5.
MODEL = FixedModel({2: [5, 4, 3, 2, 1], 3: [1, 2, 3, 4, 5], 1: [0, 0, 5, 0, 1]})


def state(users: list[str]) -> UserState:
    n = len(users)
    return UserState(
        user_id=pa.array(users), user_cats={c: pa.nulls(n, pa.string()) for c in USER_CAT_COLUMNS},
        history_offsets=np.zeros(n + 1, dtype=np.int64), history_items=pa.array([], pa.string()),
        impressions=np.zeros(n, dtype=np.int64), clicks=np.zeros(n, dtype=np.int64),
    )  # fmt: skip


def pairs(*rows: tuple[str, str]) -> pa.Table:
    return pa.table({"user_id": pa.array([r[0] for r in rows], pa.string()), "item_id": pa.array([r[1] for r in rows], pa.string())})


def run(relevant: pa.Table, exclude: pa.Table, ks=(2,)):
    v = vocabs()
    return evaluate_ranking(MODEL, v, catalogue(v), state(["u1", "u2", "u3"]), relevant, exclude, T0, ks=ks)


def test_hand_computed_metrics_exclusion_and_oov_counts():
    # u1 already clicked i1 (excluded); u1's i9 is outside the item vocabulary (dropped, counted).
    result = run(pairs(("u1", "i3"), ("u1", "i9"), ("u2", "i4"), ("u2", "i1"), ("u3", "i5")), pairs(("u1", "i1")))
    # model top 2: u1 [i2, i3] (i1 excluded) -> hit at 2 of 1; u2 [i5, i4] -> hit at 2 of 2; u3 [i3, i5] -> hit at 2 of 1
    m = result.model
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["precision@2"] == pytest.approx(0.5)
    assert m["ndcg@2"] == pytest.approx((D1 + D1 / (1 + D1) + D1) / 3)
    assert m["mrr@2"] == pytest.approx(0.5)
    assert m["hit@2"] == pytest.approx(1.0)
    # popularity top 2: u1 [i4, i3] -> hit at 2; u2 [i1, i4] -> both; u3 [i1, i4] -> none
    p = result.popularity
    assert p["recall@2"] == pytest.approx(2 / 3)
    assert p["precision@2"] == pytest.approx(0.5)
    assert p["ndcg@2"] == pytest.approx((D1 + 1 + 0) / 3)
    assert p["mrr@2"] == pytest.approx(0.5)
    assert p["hit@2"] == pytest.approx(2 / 3)
    assert result.counts == {
        "n_users": 3, "n_users_evaluated": 3, "n_oov_users": 1, "n_items_ranked": 5,
        "n_relevant": 4, "n_relevant_oov": 1, "n_oov_items": 1, "n_relevant_seen": 0,
    }  # fmt: skip


def test_excluded_items_never_ranked_and_relevant_repeats_dropped():
    # u2 clicked i5 and i4 before: its best two are excluded, and its re-click of i4 cannot count.
    result = run(pairs(("u2", "i4"), ("u2", "i3")), pairs(("u2", "i5"), ("u2", "i4")), ks=(1,))
    assert result.model["recall@1"] == 1.0  # top 1 is now i3
    assert result.counts["n_relevant_seen"] == 1 and result.counts["n_relevant"] == 1
    assert result.counts["n_users_evaluated"] == 1  # u1 and u3 have nothing relevant: skipped


def test_k_larger_than_the_catalogue_and_metrics_file():
    result = run(pairs(("u1", "i5")), pairs(), ks=(10,))
    assert result.model["recall@10"] == 1.0 and result.model["precision@10"] == pytest.approx(0.1)
    doc = result.metrics_file()
    assert set(doc["models"]) == {"two_tower", "popularity", "random"}
    assert doc["models"]["two_tower"]["ndcg@10"]["value"] == pytest.approx(1 / math.log2(6))
    assert doc["holdout"]["n_oov_users"] == 1


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="'u7', who is not among the evaluation users"):
        run(pairs(("u7", "i1")), pairs())
    with pytest.raises(ValueError, match="ks must be"):
        run(pairs(("u1", "i1")), pairs(), ks=(0,))
    with pytest.raises(ValueError, match="lack column"):
        run(pa.table({"user": ["u1"]}), pairs())


def test_user_state_history_counters_and_fallback_metadata():
    ts = [T0 + dt.timedelta(minutes=m) for m in (5, 1, 3, 2, 4, 6)]
    events = pa.table({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u1"],
        "item_id": ["i4", "i1", "i3", "i2", "i5", "i5"],
        "ts": pa.array(ts, TS_TYPE),
        "clicked": [True, True, True, True, False, False],
        "hidden": [False, False, True, False, False, False],  # i3 clicked then hidden: not history
        "age_bucket": ["a", "a", "a", "a", "b", "z"],
        "country": ["DE", "DE", "DE", "DE", "FR", "NL"],
    })  # fmt: skip
    later = pa.table({"user_id": ["u3"], "ts": pa.array([T0 + dt.timedelta(days=1)], TS_TYPE),
                      "age_bucket": ["c"], "country": ["JP"]})  # fmt: skip
    s = user_state(events, pa.array(["u1", "u2", "u3"]), history_len=2, fallback=later)
    histories = [s.history_items[s.history_offsets[u]:s.history_offsets[u + 1]].to_pylist() for u in range(3)]
    assert histories == [["i2", "i4"], [], []]  # u1's engaged: i1 (t1), i2 (t2), i4 (t5): last 2, oldest first
    assert s.impressions.tolist() == [5, 1, 0] and s.clicks.tolist() == [4, 0, 0]
    assert s.user_cats["age_bucket"].to_pylist() == ["z", "b", "c"]  # latest row; u3 from the fallback
    assert s.user_cats["country"].to_pylist() == ["NL", "FR", "JP"]


def test_user_state_of_users_never_seen_before_the_cut():
    empty = pa.table({"user_id": pa.array([], pa.string()), "item_id": pa.array([], pa.string()),
                      "ts": pa.array([], TS_TYPE), "clicked": pa.array([], pa.bool_()), "hidden": pa.array([], pa.bool_()),
                      "age_bucket": pa.array([], pa.string()), "country": pa.array([], pa.string())})  # fmt: skip
    s = user_state(empty, pa.array(["u8", "u9"]), history_len=5)
    assert s.history_offsets.tolist() == [0, 0, 0] and s.impressions.tolist() == [0, 0]
    assert s.user_cats["country"].to_pylist() == [None, None]


def test_history_rows_after_the_cut_are_not_test_positives(tmp_path):
    """MIND writes the pre-window clicks of a user first seen after the cut as ``hist-`` rows
    timestamped after it; they are history, not impressions, and must not count as relevant."""
    rows = [  # (request, user, item, hours, clicked); the cut is at hour 24
        ("r1", "u1", "i1", 1, True), ("r1", "u1", "i2", 1, False), ("r2", "u2", "i4", 2, True),
        ("t1", "u1", "i3", 25, True), ("t1", "u1", "i5", 25, False),
        ("hist-dev-u3", "u3", "i4", 29, True), ("hist-dev-u3", "u3", "i5", 29.5, True),  # u3's history
        ("t2", "u3", "i2", 30, True), ("t2", "u3", "i1", 30, False),
        ("hist-dev-u9", "u9", "i1", 31, True),  # a user whose only rows after the cut are history
    ]  # fmt: skip
    assert write_log(tmp_path / "log", pa.table({
        "request_id": [r[0] for r in rows], "user_id": [r[1] for r in rows], "item_id": [r[2] for r in rows],
        "ts": pa.array([T0 + dt.timedelta(hours=r[3]) for r in rows], TS_TYPE), "clicked": [r[4] for r in rows],
    })).ok  # fmt: skip
    v = vocabs()
    result = evaluate_holdout(MODEL, v, catalogue(v), tmp_path / "log", T0 + dt.timedelta(hours=24), ks=[2],
                              n_resamples=20)  # fmt: skip
    # relevant: u1 -> i3, u3 -> i2 only; u9 is not evaluated at all
    assert result.counts["n_relevant"] == 2 and result.counts["n_users"] == 2
    assert result.extra["rows_excluded"] == 3
    with_history = evaluate_holdout(MODEL, v, catalogue(v), tmp_path / "log", T0 + dt.timedelta(hours=24), ks=[2],
                                    n_resamples=20, exclude_prefixes=())  # fmt: skip
    assert with_history.counts["n_relevant"] == 5  # what the contaminated holdout counted


def test_intervals_comparisons_random_and_slices():
    # u1, u2 are in the user vocabulary (warm), u3 is not (cold)
    result = run(pairs(("u1", "i3"), ("u2", "i4"), ("u2", "i1"), ("u3", "i5")), pairs(("u1", "i1")), ks=(2,))
    doc = result.metrics_file()
    for model, cells in result.models.items():
        for name, interval in cells.items():
            lo, hi = interval.ci
            assert lo - 1e-12 <= interval.value <= hi + 1e-12, (model, name)
    # random ranks the 4 (u1) or 5 (u2, u3) unexcluded items uniformly: recall@2 = E[hits] / |relevant|
    assert result.models["random"]["recall@2"].value == pytest.approx((2 / 4 + 2 / 5 + 2 / 5) / 3)
    pairs_compared = {(row["a"], row["b"]) for row in doc["comparisons"]}
    assert pairs_compared == {("popularity", "two_tower"), ("random", "two_tower")}
    assert all(row["ci"] is not None for row in doc["comparisons"])
    by_name = {row["slice"]: row for row in doc["slices"]}
    assert by_name["warm users"]["counts"]["users"] == 2 and by_name["cold users"]["counts"]["users"] == 1
    assert by_name["cold users"]["models"]["two_tower"]["recall@2"]["value"] == pytest.approx(1.0)  # u3: [i3, i5]
    assert by_name["new items"]["counts"]["relevant"] == 0  # every relevant item has training impressions
    assert by_name["all"]["lift_share"] == {}  # no world, no oracle
