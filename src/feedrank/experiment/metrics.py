"""Experiment metrics: what each one is, and the per-user sums it is computed from.

Every metric is a ratio of two per-user sums (``numerator / denominator``) or a per-user mean
(no denominator), because the user is the randomisation unit (see ``estimate``). The per-user
table built by ``user_metrics`` from the canonical event log is the one input analysis needs, and
a simulation can build the same columns in memory and call ``analyze`` directly.

Per-user columns: ``user_id``, ``arm`` (when known), ``impressions``, ``clicks``, ``dwell_s``
(time spent, seconds), ``hides``, ``publisher_share`` and, from a pre-period log, the same sums
prefixed ``pre_`` (CUPED covariates; 0 for users absent before).

Publisher concentration is the Herfindahl index of impressions over publishers within an arm,
``HHI = sum_p share_p^2``. Writing each impression's weight as its publisher's share in the arm,
``HHI = sum_u publisher_share_u / sum_u impressions_u``: a ratio of per-user sums, whose
delta-method gradient is twice the plain ratio's because the shares are estimated from the same
impressions (hence ``scale=2``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feedrank.data.log import read_events
from feedrank.experiment.assignment import arms_from_table, assign
from feedrank.experiment.params import check_open_unit


@dataclass(frozen=True)
class Metric:
    """A metric as ``sum(numerator) / sum(denominator)`` over users (``denominator`` None: a mean)."""

    name: str
    label: str
    numerator: str
    denominator: str | None = None
    higher_is_better: bool = True
    scale: float = 1.0

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.numerator, self.denominator) if c is not None]


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("ctr", "CTR", "clicks", "impressions"),
        Metric("time_spent", "time spent per user", "dwell_s"),
        Metric("clicks_per_user", "clicks per user", "clicks"),
        Metric("hide_rate", "hide rate", "hides", "impressions", higher_is_better=False),
        Metric(
            "publisher_hhi",
            "publisher concentration (HHI)",
            "publisher_share",
            "impressions",
            higher_is_better=False,
            scale=2.0,
        ),
    )
}

#: Guardrails read from serving monitoring, not from the event log (the log has no latency).
OPERATIONAL_METRICS: dict[str, str] = {
    "latency_p99_ms": "p99 feed latency (ms)",
    "serving_error_rate": "serving error rate",
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


@dataclass(frozen=True)
class Guardrail:
    """A metric that must not get worse by more than ``max_harm`` (relative, 0.05 = 5%).

    Breached when a one-sided test at ``alpha`` rejects "harm <= max_harm", i.e. the data show
    with confidence that the metric moved the bad way by more than the tolerance.
    """

    metric: str
    max_harm: float = 0.0
    alpha: float = 0.05

    def validate(self) -> None:
        if self.metric not in METRICS and self.metric not in OPERATIONAL_METRICS:
            known = [*METRICS, *OPERATIONAL_METRICS]
            raise ValueError(f"guardrail metric {self.metric!r} unknown; known: {', '.join(known)}")
        if not (self.max_harm >= 0 and np.isfinite(self.max_harm)):
            raise ValueError(f"guardrail {self.metric}: max_harm must be >= 0, got {self.max_harm!r}")
        check_open_unit(self.alpha, f"guardrail {self.metric} alpha")

    @property
    def label(self) -> str:
        return METRICS[self.metric].label if self.metric in METRICS else OPERATIONAL_METRICS[self.metric]


DEFAULT_GUARDRAILS: tuple[Guardrail, ...] = (
    Guardrail("hide_rate", max_harm=0.05),
    Guardrail("publisher_hhi", max_harm=0.10),
    Guardrail("latency_p99_ms", max_harm=0.10),
)

_SUM_COLUMNS = ("impressions", "clicks", "dwell_s", "hides")
_EVENT_COLUMNS = ["user_id", "clicked", "dwell_s", "hidden", "publisher"]


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Integer codes and distinct values of a string column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = pc.dictionary_encode(column)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary


def _user_sums(events: pa.Table) -> tuple[pa.Array, np.ndarray, dict[str, np.ndarray]]:
    missing = [c for c in _EVENT_COLUMNS if c not in events.column_names]
    if missing:
        raise ValueError(f"event table lacks column(s) {missing}; expected the canonical log schema")
    for name in ("user_id", "clicked", "dwell_s", "hidden"):
        nulls = events[name].null_count
        if nulls:
            raise ValueError(f"event column {name!r} has {nulls} null(s)")
    codes, users = _codes(events["user_id"])
    dwell = events["dwell_s"].to_numpy().astype(np.float64)
    if not np.all(np.isfinite(dwell)):
        raise ValueError(f"event column 'dwell_s' has {int((~np.isfinite(dwell)).sum())} non-finite value(s)")
    n = len(users)
    sums = {
        "impressions": np.bincount(codes, minlength=n).astype(np.float64),
        "clicks": np.bincount(
            codes, weights=events["clicked"].to_numpy(zero_copy_only=False).astype(np.float64), minlength=n
        ),
        "dwell_s": np.bincount(codes, weights=dwell, minlength=n),
        "hides": np.bincount(
            codes, weights=events["hidden"].to_numpy(zero_copy_only=False).astype(np.float64), minlength=n
        ),
    }
    return users, codes, sums


def user_metrics(events: pa.Table, arm: np.ndarray | None = None, pre_events: pa.Table | None = None) -> pa.Table:
    """Per-user sums from an event-level table (canonical schema columns suffice).

    ``arm`` gives each *event row*'s arm (e.g. ``assign(events["user_id"], salt, arms)``); a user
    seen in two arms is an error. Without it, all users form one group (planning from history).
    ``pre_events`` adds ``pre_*`` columns aligned to the users of ``events``.
    """
    if events.num_rows == 0:
        raise ValueError("no events: the log (or the selected period) is empty")
    users, codes, sums = _user_sums(events)
    n_users = len(users)
    arm_codes = np.zeros(events.num_rows, dtype=np.int64)
    arm_names: pa.Array | None = None
    if arm is not None:
        arm = np.asarray(arm, dtype=object)
        if arm.shape != (events.num_rows,):
            raise ValueError(f"arm has {arm.size} entries for {events.num_rows} event rows")
        arm_codes, arm_names = _codes(pa.array(arm, pa.string()))
    user_arm = np.full(n_users, -1, dtype=np.int64)
    user_arm[codes] = arm_codes
    if np.any(user_arm[codes] != arm_codes):
        bad = users[int(codes[np.flatnonzero(user_arm[codes] != arm_codes)[0]])].as_py()
        raise ValueError(f"user {bad!r} appears in more than one arm")

    # Each impression weighted by its publisher's share of impressions within the same arm.
    pub_codes, pubs = _codes(pc.fill_null(events["publisher"], "(unknown)"))
    n_arms = int(arm_codes.max()) + 1
    counts = np.bincount(arm_codes * len(pubs) + pub_codes, minlength=n_arms * len(pubs)).reshape(n_arms, len(pubs))
    shares = counts / counts.sum(axis=1, keepdims=True)
    sums["publisher_share"] = np.bincount(codes, weights=shares[arm_codes, pub_codes], minlength=n_users)

    columns: dict[str, pa.Array] = {"user_id": users}
    if arm_names is not None:
        columns["arm"] = arm_names.take(pa.array(user_arm))
    columns.update({k: pa.array(v) for k, v in sums.items()})
    if pre_events is not None and pre_events.num_rows:
        pre_users, _, pre_sums = _user_sums(pre_events)
        position = pc.fill_null(pc.index_in(users, value_set=pre_users), -1).to_numpy().astype(np.int64)
        seen = position >= 0
        for name in _SUM_COLUMNS:
            columns[f"pre_{name}"] = pa.array(np.where(seen, pre_sums[name][position], 0.0))
    return pa.table(columns)


_LOG_COLUMNS = ["user_id", "ts", "clicked", "dwell_s", "hidden", "publisher"]


def user_table_from_log(
    root: str | Path,
    pre_end: dt.datetime | None = None,
    arms: Sequence[str] | None = None,
    salt: str | None = None,
    weights: Sequence[float] | None = None,
    assignment: pa.Table | None = None,
) -> pa.Table:
    """Per-user table from a canonical log; events before ``pre_end`` become the ``pre_*`` columns.

    Arms come from ``assignment`` (a table with ``user_id`` and ``arm``), or from hashing with
    ``salt`` over ``arms``; with neither, the table has no ``arm`` column (history for planning).
    Users never seen from ``pre_end`` on are not in the table.
    """
    if salt is not None and assignment is not None:
        raise ValueError("give at most one of salt or an assignment table")
    if salt is not None and arms is None:
        raise ValueError("salt given without the arms to assign to")
    events = read_events(root, columns=_LOG_COLUMNS, start=pre_end)
    if events.num_rows == 0:
        raise ValueError(f"{root}: no events{' from ' + pre_end.isoformat() if pre_end else ''}")
    pre = read_events(root, columns=_LOG_COLUMNS, end=pre_end) if pre_end is not None else None
    arm = None
    if assignment is not None:
        arm = arms_from_table(events["user_id"], assignment)
    elif salt is not None:
        arm = assign(events["user_id"], salt, arms, weights)
    return user_metrics(events, arm, pre)
