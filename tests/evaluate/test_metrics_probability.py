"""Log loss, normalised entropy and calibration against hand-computed values and scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss as sk_log_loss

from feedrank.evaluate.metrics import expected_calibration_error, log_loss, normalized_entropy, reliability_curve


def test_log_loss_hand_computed_and_sklearn():
    # -(ln 0.8 + ln(1 - 0.3)) / 2
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2, abs=1e-12)
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 2, 1000), rng.uniform(0.01, 0.99, 1000)
    assert log_loss(labels, probs) == pytest.approx(sk_log_loss(labels, probs), abs=1e-9)


def test_log_loss_clips_confident_mistakes_at_eps():
    assert log_loss([0], [1.0]) == pytest.approx(-math.log(1e-7), abs=1e-6)  # 16.118...
    assert log_loss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3), abs=1e-9)


def test_log_loss_accepts_torch_half_precision():
    probs = torch.tensor([0.8, 0.3], dtype=torch.bfloat16)
    expected = -(math.log(float(probs[0])) + math.log(1 - float(probs[1]))) / 2
    assert log_loss(torch.tensor([1, 0]), probs) == pytest.approx(expected, abs=1e-6)


def test_normalized_entropy():
    # Predicting the base rate 1/4 everywhere: log loss equals the base-rate entropy -> NE = 1
    assert normalized_entropy([1, 0, 0, 0], [0.25] * 4) == pytest.approx(1.0, abs=1e-12)
    # labels [1, 0], probs [0.8, 0.3]: log loss -(ln .8 + ln .7)/2, base entropy ln 2
    expected = -(math.log(0.8) + math.log(0.7)) / 2 / math.log(2)
    assert normalized_entropy([1, 0], [0.8, 0.3]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1]])
def test_normalized_entropy_undefined_for_single_class(labels):
    with pytest.raises(ValueError, match="base rate"):
        normalized_entropy(labels, [0.5] * len(labels))


def test_expected_calibration_error_uniform_hand_computed():
    # bins of width 0.1: 0.05 -> bin 0 (pred .05, observed 0, 1 row)
    #                    0.15, 0.12 -> bin 1 (pred .135, observed .5, 2 rows), 0.95 -> bin 9 (pred .95, observed 1)
    # ECE = (1 * .05 + 2 * .365 + 1 * .05) / 4 = 0.2075
    labels, probs = [0, 1, 0, 1], [0.05, 0.15, 0.12, 0.95]
    assert expected_calibration_error(labels, probs) == pytest.approx(0.2075, abs=1e-12)
    curve = reliability_curve(labels, probs, n_bins=10)
    np.testing.assert_array_equal(curve.counts, [1, 2, 0, 0, 0, 0, 0, 0, 0, 1])
    assert curve.mean_predicted[1] == pytest.approx(0.135) and curve.observed_rate[1] == 0.5
    assert np.isnan(curve.mean_predicted[2]) and np.isnan(curve.observed_rate[2])
    assert curve.edges.shape == (11,)


def test_expected_calibration_error_quantile_hand_computed():
    # 2 quantile bins: edges [0.1, 0.25, 0.4] -> {0.1, 0.2} (pred .15, observed 0), {0.3, 0.4} (pred .35, observed 1)
    # ECE = .5 * .15 + .5 * .65 = 0.4
    assert expected_calibration_error([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], n_bins=2, strategy="quantile") == pytest.approx(0.4, abs=1e-12)


def test_perfectly_calibrated_bins_have_zero_error():
    assert expected_calibration_error([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.0


def test_value_on_an_inner_edge_falls_in_the_lower_bin():
    curve = reliability_curve([1], [0.5], n_bins=2)
    np.testing.assert_array_equal(curve.counts, [1, 0])


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_curve_matches_sklearn(strategy):
    rng = np.random.default_rng(1)
    probs = rng.beta(2, 5, 3000)
    labels = (rng.random(3000) < probs).astype(int)
    observed, predicted = calibration_curve(labels, probs, n_bins=8, strategy=strategy)
    curve = reliability_curve(labels, probs, n_bins=8, strategy=strategy)
    filled = curve.counts > 0
    np.testing.assert_allclose(curve.mean_predicted[filled], predicted, atol=1e-12)
    np.testing.assert_allclose(curve.observed_rate[filled], observed, atol=1e-12)
    assert curve.counts.sum() == 3000


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: log_loss([1, 0], [0.5, float("nan")]), "probs contains NaN"),
        (lambda: log_loss([1, 0], [0.5, 1.2]), r"probs must lie in \[0, 1\]"),
        (lambda: log_loss([1, 2], [0.5, 0.5]), "labels must be binary"),
        (lambda: log_loss([1, 0], [0.5]), "labels has 2 rows but probs has 1"),
        (lambda: log_loss([], []), "labels is empty"),
        (lambda: log_loss([1], [0.5], eps=0.0), "eps"),
        (lambda: expected_calibration_error([1], [0.5], n_bins=0), "n_bins must be an integer >= 1"),
        (lambda: reliability_curve([1], [0.5], strategy="kmeans"), "strategy must be one of"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
