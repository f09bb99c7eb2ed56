"""Negative down-sampling and its probability correction, including an end-to-end calibration check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from feedrank.evaluate.metrics import expected_calibration_error
from feedrank.models.calibration import correct_logit, correct_probability, downsample_negatives


def test_downsample_keeps_every_positive_and_about_rate_of_negatives():
    labels = (np.arange(100_000) % 10 == 0).astype(np.float32)  # 10k positives, 90k negatives
    keep = downsample_negatives(labels, rate=0.2, rng=7)
    assert keep.dtype == bool and keep.shape == labels.shape
    assert keep[labels == 1].all()
    assert abs(keep[labels == 0].mean() - 0.2) < 0.01


def test_downsample_is_deterministic_given_a_seed_and_accepts_tensors():
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0] * 100)
    a = downsample_negatives(labels, 0.5, rng=3)
    assert np.array_equal(a, downsample_negatives(labels.numpy().astype(bool), 0.5, rng=np.random.default_rng(3)))
    assert not np.array_equal(a, downsample_negatives(labels, 0.5, rng=4))
    assert downsample_negatives(labels, 1.0, rng=0).all()
    assert downsample_negatives(np.zeros(0), 0.5, rng=0).shape == (0,)


def test_downsample_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels\[2\] = 2"):
        downsample_negatives([0, 1, 2], 0.5)
    with pytest.raises(ValueError, match=r"labels\[1\] = nan"):
        downsample_negatives([0.0, float("nan")], 0.5)
    with pytest.raises(ValueError, match="1-D"):
        downsample_negatives(np.zeros((2, 2)), 0.5)
    for rate in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="rate must be in"):
            downsample_negatives([0, 1], rate)


def test_correct_probability_by_hand_and_equals_logit_shift():
    # p' = 0.5 at rate 0.1: 0.5 / (0.5 + 0.5 / 0.1) = 1 / 11
    assert correct_probability(np.array([0.5]), 0.1)[0] == pytest.approx(1 / 11)
    p = torch.tensor([0.0, 0.01, 0.3, 0.9, 1.0], dtype=torch.float64)
    corrected = correct_probability(p, 0.25)
    assert isinstance(corrected, torch.Tensor)
    shifted = torch.sigmoid(correct_logit(torch.logit(p[1:4]), 0.25))
    torch.testing.assert_close(corrected[1:4], shifted)
    assert corrected[0] == 0.0 and corrected[-1] == 1.0
    assert np.array_equal(correct_probability(np.array([0.2, 0.7]), 1.0), [0.2, 0.7])  # no sampling, no change


def test_correct_probability_rejects_bad_input():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        correct_probability(np.array([0.5, 1.2]), 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        correct_probability(torch.tensor([float("nan")]), 0.5)
    with pytest.raises(ValueError, match="rate must be in"):
        correct_logit(torch.zeros(2), 0.0)


def test_logistic_model_on_downsampled_data_is_calibrated_after_correction():
    """Known base rate ~6%; train on 1:10 down-sampled negatives; evaluate on un-sampled held-out rows."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300_000, 2))
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-(-3.2 + 1.0 * x[:, 0] + 0.5 * x[:, 1])))).astype(int)
    train, test = slice(0, 200_000), slice(200_000, None)
    keep = downsample_negatives(y[train], rate=0.1, rng=1)
    model = LogisticRegression(C=1e6).fit(x[train][keep], y[train][keep])
    p_sampled = model.predict_proba(x[test])[:, 1]
    p_corrected = correct_probability(p_sampled, 0.1)

    ece_raw = expected_calibration_error(y[test], p_sampled)
    ece_corrected = expected_calibration_error(y[test], p_corrected)
    assert ece_corrected < 0.02
    assert ece_raw > 0.1  # the uncorrected model predicts roughly 3x the true click rate
    assert p_corrected.mean() == pytest.approx(y[test].mean(), abs=0.005)
