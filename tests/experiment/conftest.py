"""Synthetic canonical event logs for the experiment tests: users with their own click
propensity (so impressions cluster by user), two days, a handful of publishers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from feedrank.experiment.assignment import assign

DAY0 = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)


def make_events(
    n_users: int = 400,
    days: int = 2,
    seed: int = 0,
    salt: str | None = None,
    arms: tuple[str, ...] = ("control", "treatment"),
    ctr_lift: float = 0.0,
    hide_lift: float = 0.0,
) -> pa.Table:
    """Impressions for ``n_users`` over ``days`` days. With ``salt``, users assigned to the
    second arm click ``ctr_lift`` (relative) more and hide ``hide_lift`` more from day 1 on."""
    rng = np.random.default_rng(seed)
    users = np.array([f"u{i:05d}" for i in range(n_users)], dtype=object)
    base_ctr = rng.beta(2, 30, n_users)  # heterogeneous propensity: mean ~0.0625
    per_day = rng.integers(3, 12, size=(days, n_users))
    treated = np.zeros(n_users, dtype=bool) if salt is None else assign(users, salt, arms) == arms[1]
    rows_user, rows_day = [], []
    for d in range(days):
        rows_user.append(np.repeat(np.arange(n_users), per_day[d]))
        rows_day.append(np.full(per_day[d].sum(), d))
    u = np.concatenate(rows_user)
    day = np.concatenate(rows_day)
    lift = np.where(treated[u] & (day >= 1), 1 + ctr_lift, 1.0)
    clicked = rng.random(u.size) < np.clip(base_ctr[u] * lift, 0, 1)
    dwell = np.where(clicked, rng.exponential(40.0, u.size), 0.0).astype(np.float32)
    hide_p = np.where(treated[u] & (day >= 1), 0.02 * (1 + hide_lift), 0.02)
    hidden = rng.random(u.size) < hide_p
    ts = [
        DAY0 + dt.timedelta(days=int(d), seconds=int(s))
        for d, s in zip(day, rng.integers(0, 86000, u.size), strict=True)
    ]
    n = u.size
    return pa.table(
        {
            "user_id": pa.array(users[u], pa.string()),
            "item_id": pa.array([f"i{k}" for k in rng.integers(0, 50, n)], pa.string()),
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "request_id": pa.array([f"r{k}" for k in range(n)], pa.string()),
            "position": pa.array(np.zeros(n, dtype=np.int32)),
            "clicked": pa.array(clicked),
            "dwell_s": pa.array(dwell),
            "shared": pa.array(np.zeros(n, dtype=bool)),
            "hidden": pa.array(hidden),
            "publisher": pa.array([f"pub{k}" for k in rng.zipf(1.8, n) % 7], pa.string()),
        }
    )


@pytest.fixture
def events_factory():
    return make_events
