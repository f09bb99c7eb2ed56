"""Deterministic arm assignment by salted hashing, and the sample-ratio-mismatch (SRM) check.

A user's arm is a pure function of ``(salt, user_id)``: the first 8 bytes of
``blake2b(f"{salt}:{user_id}")`` read as a big-endian integer, mapped to [0, 1) and cut by the
cumulative arm weights. It needs no stored table, gives the same answer in every process, machine
and Python version (unlike ``hash()``, which is randomised per process), and a new salt
re-shuffles users independently of every other experiment.

Hashing is done once per *distinct* id (``np.unique``), then broadcast back, so an event-level
array of millions of rows costs one digest per user. hashlib has no array interface, so that one
step is a comprehension over distinct ids; everything around it is vectorised.

SRM: if the observed users per arm are unlikely under the planned weights (chi-square goodness of
fit, p below ``threshold``), assignment or logging is broken (a bot filter hitting one arm, a
crash in the treatment path) and no metric comparison can be trusted. Every analysis runs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

#: p-value under which a sample ratio mismatch is declared. Small on purpose: the check runs on
#: every analysis, and a false alarm halts an experiment.
SRM_THRESHOLD = 0.001

_TWO_TO_MINUS_53 = 2.0**-53


def normalise_weights(weights: Sequence[float] | None, arms: Sequence[str]) -> np.ndarray:
    """Weights as fractions summing to 1 (``None`` = equal split). ``[50, 50]`` == ``[1, 1]``."""
    if len(arms) < 2:
        raise ValueError(f"an experiment needs at least 2 arms, got {list(arms)}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arm names must be distinct, got {list(arms)}")
    if weights is None:
        return np.full(len(arms), 1.0 / len(arms))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arms),):
        raise ValueError(f"got {w.size} weight(s) for {len(arms)} arms {list(arms)}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    if w.sum() <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    return w / w.sum()


def _as_id_array(user_ids) -> np.ndarray:
    if isinstance(user_ids, (pa.Array, pa.ChunkedArray)):
        if user_ids.null_count:
            raise ValueError(f"user_ids contain {user_ids.null_count} null(s)")
        return np.asarray(user_ids.to_numpy(zero_copy_only=False))
    ids = np.asarray(user_ids)
    if ids.dtype == object and any(v is None for v in ids):
        raise ValueError("user_ids contain None")
    return ids


def hash_unit(user_ids, salt: str) -> np.ndarray:
    """Each id's position in [0, 1), uniform and independent across salts."""
    ids = _as_id_array(user_ids)
    if ids.size == 0:
        return np.empty(0, dtype=np.float64)
    uniques, inverse = np.unique(ids, return_inverse=True)
    digests = np.fromiter(
        (int.from_bytes(hashlib.blake2b(f"{salt}:{u}".encode(), digest_size=8).digest(), "big") >> 11 for u in uniques),
        dtype=np.uint64,
        count=uniques.size,
    )
    return (digests.astype(np.float64) * _TWO_TO_MINUS_53)[inverse.reshape(ids.shape)]


def assign_index(user_ids, salt: str, arms: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray:
    """Index into ``arms`` for every id (vectorised; repeated ids get the same arm)."""
    w = normalise_weights(weights, arms)
    edges = np.cumsum(w)[:-1]
    return np.searchsorted(edges, hash_unit(user_ids, salt), side="right")


def assign(user_ids, salt: str, arms: Sequence[str], weights: Sequence[float] | None = None) -> np.ndarray:
    """The arm name for every id, as a numpy array of str."""
    return np.asarray(arms, dtype=object)[assign_index(user_ids, salt, arms, weights)]


@dataclass(frozen=True)
class SRMCheck:
    """Observed vs expected users per arm and the chi-square goodness-of-fit verdict."""

    arms: list[str]
    observed: list[int]
    expected: list[float]
    chi2: float
    p_value: float
    threshold: float = SRM_THRESHOLD

    @property
    def ok(self) -> bool:
        return self.p_value >= self.threshold

    def to_dict(self) -> dict:
        return {
            "arms": self.arms,
            "observed": self.observed,
            "expected": [round(e, 2) for e in self.expected],
            "chi2": self.chi2,
            "p_value": self.p_value,
            "threshold": self.threshold,
            "ok": self.ok,
        }


def srm_check(
    observed: Sequence[int],
    arms: Sequence[str],
    weights: Sequence[float] | None = None,
    threshold: float = SRM_THRESHOLD,
) -> SRMCheck:
    """Chi-square test of users per arm against the planned weights."""
    w = normalise_weights(weights, arms)
    obs = np.asarray(observed, dtype=np.float64)
    if obs.shape != w.shape:
        raise ValueError(f"got {obs.size} count(s) for {len(arms)} arms")
    total = obs.sum()
    if total <= 0:
        raise ValueError("SRM check: no users in any arm")
    expected = total * w
    planned = expected > 0
    if np.any(obs[~planned] > 0):
        # Users in an arm planned to get none: a mismatch beyond any test.
        chi2, p = float("inf"), 0.0
    elif planned.sum() < 2:
        chi2, p = 0.0, 1.0
    else:
        chi2, p = stats.chisquare(obs[planned], expected[planned])
    return SRMCheck(list(arms), [int(o) for o in obs], expected.tolist(), float(chi2), float(p), threshold)


def arms_from_table(user_ids: pa.Array | pa.ChunkedArray, assignment: pa.Table) -> np.ndarray:
    """Each id's arm looked up in an explicit assignment table (columns ``user_id``, ``arm``).

    For experiments whose arms were not assigned by this module's hash (an external platform).
    Every id must be listed exactly once; unlisted ids are an error, not a silent drop.
    """
    missing = [c for c in ("user_id", "arm") if c not in assignment.column_names]
    if missing:
        raise ValueError(f"assignment table lacks column(s) {missing}; it needs user_id and arm")
    listed = assignment["user_id"].cast(pa.string())
    if pc.count_distinct(listed).as_py() != assignment.num_rows:
        raise ValueError("assignment table lists some user_id more than once")
    position = pc.index_in(user_ids.cast(pa.string()), value_set=listed)
    if position.null_count:
        first = user_ids.filter(pc.is_null(position))[0].as_py()
        raise ValueError(
            f"{position.null_count} event row(s) belong to users not in the assignment table, e.g. {first!r}"
        )
    return np.asarray(assignment["arm"].cast(pa.string()).take(position).to_numpy(zero_copy_only=False), dtype=object)
