"""Always-valid p-values (mSPRT with a normal mixture) so an experiment can be watched daily.

A fixed-horizon p-value is valid only if it is looked at once. Checking it every day and stopping
the first time it dips below 0.05 rejects a true null far more often than 5% (about 25-30% over
20 looks). The mixture sequential probability ratio test (Robbins 1970; Johari, Pekelis & Walsh,
"Always valid inference", 2017) fixes that: with the estimated lift ``d ~ N(theta, v)`` and a
normal prior ``theta ~ N(0, tau^2)`` on the alternative, the likelihood ratio against
``theta = 0`` is

    Lambda = sqrt(v / (v + tau^2)) * exp(tau^2 * d^2 / (2 v (v + tau^2)))

which is a non-negative martingale under the null, so by Ville's inequality
P(Lambda ever >= 1/alpha) <= alpha. The always-valid p-value is the running minimum of
``1 / Lambda`` over the looks made; stopping whenever it falls below alpha keeps the false-positive
rate at alpha no matter how often one peeks.

``tau`` is the scale of effects one expects (the planned MDE is a good choice): it trades speed
on effects near ``tau`` against speed on much smaller or larger ones, never validity. ``v`` uses the
estimated variance, as in Johari et al.; with thousands of users per look the error is negligible.
"""

from __future__ import annotations

import numpy as np


def mixture_log_lr(estimate: np.ndarray, variance: np.ndarray, tau: float | np.ndarray) -> np.ndarray:
    """log Lambda for an estimated lift with known ``variance`` and normal mixing sd ``tau``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    tau2 = np.asarray(tau, dtype=np.float64) ** 2
    if np.any(tau2 <= 0):
        raise ValueError(f"mixing scale tau must be positive, got {tau!r}")
    if np.any(variance <= 0):
        raise ValueError("always-valid p-value: the estimate has zero variance")
    return 0.5 * np.log(variance / (variance + tau2)) + tau2 * estimate**2 / (2 * variance * (variance + tau2))


def always_valid_p(estimate: np.ndarray, variance: np.ndarray, tau: float | np.ndarray) -> np.ndarray:
    """Running-minimum ``min(1, 1/Lambda)`` along the last axis (the looks, in time order).

    One look (scalars or a trailing axis of length 1) gives the p-value of that look, which is
    itself valid at any stopping time; passing all looks made so far makes it monotone.
    """
    log_lr = np.atleast_1d(mixture_log_lr(estimate, variance, tau))
    p = np.minimum(1.0, np.exp(-log_lr))
    return np.minimum.accumulate(p, axis=-1)
