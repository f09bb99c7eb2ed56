"""Salted-hash assignment (determinism, balance, independence) and the SRM check."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from feedrank.experiment.assignment import arms_from_table, assign, assign_index, hash_unit, srm_check

ARMS = ["control", "treatment"]


def test_hash_unit_is_the_documented_blake2b_rule():
    digest = hashlib.blake2b(b"exp-1:user-42", digest_size=8).digest()
    expected = (int.from_bytes(digest, "big") >> 11) / 2**53
    assert hash_unit(["user-42"], "exp-1")[0] == expected


def test_assignment_is_stable_across_processes_and_hash_seeds():
    ids = [f"u{i}" for i in range(50)]
    here = assign(ids, "salt-a", ARMS).tolist()
    code = (
        "from feedrank.experiment.assignment import assign;"
        f"print(','.join(assign([f'u{{i}}' for i in range(50)], 'salt-a', {ARMS!r})))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split(",") == here


def test_repeated_ids_get_the_same_arm_and_arrays_are_accepted():
    ids = np.array(["a", "b", "a", "c", "b", "a"], dtype=object)
    arms = assign(ids, "s", ARMS)
    assert arms[0] == arms[2] == arms[5] and arms[1] == arms[4]
    assert assign(pa.array(ids.tolist()), "s", ARMS).tolist() == arms.tolist()
    assert assign(np.arange(10), "s", ARMS).tolist() == assign([str(i) for i in range(10)], "s", ARMS).tolist()


@pytest.mark.parametrize("weights", [[50, 50], [10, 90], [1, 1, 2]])
def test_balance_matches_weights(weights):
    arms = ["a", "b", "c"][: len(weights)]
    n = 60_000
    idx = assign_index([f"user{i}" for i in range(n)], "balance", arms, weights)
    counts = np.bincount(idx, minlength=len(arms))
    share = np.asarray(weights) / np.sum(weights)
    sd = np.sqrt(n * share * (1 - share))
    assert np.all(np.abs(counts - n * share) < 4 * sd)
    assert srm_check(counts, arms, weights).ok


def test_salts_shuffle_independently():
    ids = [f"user{i}" for i in range(20_000)]
    same = (assign_index(ids, "exp-1", ARMS) == assign_index(ids, "exp-2", ARMS)).mean()
    assert abs(same - 0.5) < 4 * np.sqrt(0.25 / len(ids))


@pytest.mark.parametrize(
    "arms, weights, match",
    [
        (ARMS, [0, 0], "sum to a positive number"),
        (ARMS, [-1, 2], "non-negative"),
        (ARMS, [1, 2, 3], "3 weight\\(s\\) for 2 arms"),
        (["a", "a"], None, "distinct"),
        (["a"], None, "at least 2 arms"),
    ],
)
def test_bad_weights_and_arms(arms, weights, match):
    with pytest.raises(ValueError, match=match):
        assign(["u1"], "s", arms, weights)


def test_null_ids_are_refused():
    with pytest.raises(ValueError, match="null"):
        assign(pa.array(["a", None]), "s", ARMS)


def test_srm_flags_5000_vs_5500_but_not_5000_vs_5050():
    bad = srm_check([5000, 5500], ARMS, [50, 50])
    assert not bad.ok and bad.p_value < 1e-5
    assert bad.chi2 == pytest.approx(2 * 250**2 / 5250)
    good = srm_check([5000, 5050], ARMS, [50, 50])
    assert good.ok
    assert good.chi2 == pytest.approx(2 * 25**2 / 5025)  # 0.2488
    assert good.p_value == pytest.approx(0.6179, abs=1e-3)


def test_srm_uses_planned_unequal_weights():
    assert srm_check([1000, 9000], ARMS, [10, 90]).ok
    assert not srm_check([1000, 9000], ARMS, [50, 50]).ok
    assert not srm_check([10, 9000], ARMS, [0, 100]).ok  # users in an arm planned empty


def test_arms_from_table_lookup_and_errors():
    table = pa.table({"user_id": ["u1", "u2"], "arm": ["control", "treatment"]})
    assert arms_from_table(pa.array(["u2", "u1", "u2"]), table).tolist() == ["treatment", "control", "treatment"]
    with pytest.raises(ValueError, match="not in the assignment table, e.g. 'u3'"):
        arms_from_table(pa.array(["u1", "u3"]), table)
    with pytest.raises(ValueError, match="more than once"):
        arms_from_table(pa.array(["u1"]), pa.table({"user_id": ["u1", "u1"], "arm": ["a", "b"]}))
    with pytest.raises(ValueError, match="lacks column"):
        arms_from_table(pa.array(["u1"]), pa.table({"user_id": ["u1"]}))
