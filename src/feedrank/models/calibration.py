"""Negative down-sampling and the correction that makes the resulting probabilities calibrated again.

Click logs are mostly negatives, so training often keeps every positive and only a fraction
``rate`` of the negatives (He et al., "Practical Lessons from Predicting Clicks on Ads at
Facebook", 2014). A model fit on that sample learns the odds of the *sample*, which are the true
odds divided by ``rate``: with ``p`` the true probability and ``p'`` the one learned,

    p' / (1 - p') = (p / (1 - p)) / rate

so ``logit(p) = logit(p') + log(rate)`` and, solved for ``p``,

    p = p' / (p' + (1 - p') / rate).

The shift is exact for any model whose output is a logit, because down-sampling by label changes
only the class prior, never ``P(x | y)``. Rankings are unchanged (the map is monotone); what it
restores is calibration, which matters wherever probabilities are added up or compared with a
threshold (the ranker's value formula, bidding, alerting on predicted CTR).

Example::

    >>> keep = downsample_negatives(labels, rate=0.1, rng=0)      # every positive, ~10% of negatives
    >>> p = correct_probability(model_probs, rate=0.1)            # calibrated on un-sampled traffic
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if not 0.0 < rate <= 1.0:  # also rejects NaN
        raise ValueError(f"negative sampling rate must be in (0, 1], got {rate}")
    return rate


def downsample_negatives(labels: Any, rate: float, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Boolean keep-mask: every positive (label 1) and each negative (label 0) with probability ``rate``.

    ``labels`` is a 1-D array or tensor of 0/1 (bool, int or float); ``rng`` a numpy Generator or a
    seed, so the same seed keeps the same rows. Each negative is kept independently (Bernoulli), so
    the kept share is ``rate`` in expectation, which is what the correction assumes.
    """
    rate = _check_rate(rate)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number):
            raise ValueError(f"labels must be numeric or bool, got dtype {y.dtype}")
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"labels must be 0 or 1: labels[{i}] = {y[i].item()!r} ({int(bad.sum())} bad value(s))")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return (y == 1) | (rng.random(y.shape[0]) < rate)


def correct_logit(logit: ArrayOrTensor, rate: float) -> ArrayOrTensor:
    """The logit on un-sampled data of a model trained with negatives kept at ``rate``: ``logit + log(rate)``."""
    return logit + math.log(_check_rate(rate))


def correct_probability(p: ArrayOrTensor, rate: float) -> ArrayOrTensor:
    """``p' / (p' + (1 - p') / rate)``: the probability on un-sampled data (numpy or torch, same type back).

    Written in probability space for callers that only have probabilities; where the logit is at
    hand, ``correct_logit`` is the same map and keeps full precision for tiny probabilities.
    """
    rate = _check_rate(rate)
    if isinstance(p, torch.Tensor):
        if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):  # also false for NaN
            raise ValueError("probabilities must be in [0, 1] (NaN or out-of-range values found)")
    else:
        p = np.asarray(p, dtype=np.float64)
        if p.size and not bool(((p >= 0) & (p <= 1)).all()):
            raise ValueError("probabilities must be in [0, 1] (NaN or out-of-range values found)")
    return p / (p + (1 - p) / rate)
