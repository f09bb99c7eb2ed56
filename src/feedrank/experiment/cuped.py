"""CUPED: variance reduction with a pre-experiment covariate (Deng, Xu, Kohavi & Walker, 2013).

A user's behaviour before the experiment (``x``) predicts their behaviour during it (``y``) but is
untouched by the treatment, so ``y - theta * (x - mean(x))`` keeps the treatment effect while
losing the part of the noise that ``x`` explains. With ``theta = cov(y, x) / var(x)`` the variance
shrinks by the factor ``1 - rho^2`` (``rho`` the correlation of ``y`` and ``x``), which the power
analysis turns directly into fewer users or days.

Every function works along the last axis, so a stack of simulated experiments of shape
``(n_sims, n_users)`` is handled without a Python loop.
"""

from __future__ import annotations

import numpy as np


def cuped_theta(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``cov(y, x) / var(x)`` along the last axis; 0 where ``x`` is constant (it explains nothing)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if y.shape != x.shape:
        raise ValueError(f"CUPED: metric and covariate shapes differ: {y.shape} vs {x.shape}")
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    var_x = (xc * xc).sum(axis=-1)
    cov = (xc * yc).sum(axis=-1)
    return np.divide(cov, var_x, out=np.zeros_like(cov), where=var_x > 0)


def variance_factor(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``1 - rho^2``: the share of ``y``'s variance left after CUPED with covariate ``x``."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if y.shape != x.shape:
        raise ValueError(f"CUPED: metric and covariate shapes differ: {y.shape} vs {x.shape}")
    var_y = y.var(axis=-1)
    if np.any(var_y <= 0):
        raise ValueError("CUPED: the metric has zero variance; there is nothing to reduce")
    adjusted = cuped_adjust(y, x)
    return adjusted.var(axis=-1) / var_y


def cuped_adjust(y: np.ndarray, x: np.ndarray, theta: np.ndarray | float | None = None) -> np.ndarray:
    """``y - theta * (x - mean(x))``; ``theta`` defaults to the least-squares ``cuped_theta(y, x)``.

    In an A/B analysis pass one ``theta`` estimated on both arms together, so that both arms are
    adjusted by the same line and the difference of their means stays unbiased.
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    theta = cuped_theta(y, x) if theta is None else np.asarray(theta, dtype=np.float64)
    return y - np.expand_dims(theta, -1) * (x - x.mean(axis=-1, keepdims=True))
