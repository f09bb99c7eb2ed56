"""Draw item ids from a fixed popularity table in O(k log n) a call, not O(n).

``torch.multinomial(probs, k, replacement=True)`` walks the whole ``probs`` table on every call, so
its per-step cost grows with the catalogue (10M items: tens of ms a step). Sampling by inverse CDF
pays the O(n) prefix sum once, then each draw is a binary search: ``searchsorted(cdf, u)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cumulative_table(probs: Tensor) -> Tensor:
    """The float64 CDF of ``probs`` (1-D, non-negative, summing to > 0), last entry exactly 1."""
    if probs.dim() != 1 or not bool((probs >= 0).all()) or not float(probs.sum()) > 0:
        raise ValueError(f"probs must be a 1-D non-negative table with a positive sum, got shape {tuple(probs.shape)}")
    cdf = torch.cumsum(probs.double(), 0)
    return cdf / cdf[-1]


def draw_from_cdf(cdf: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` indices drawn with replacement, index i with probability cdf[i] - cdf[i-1]."""
    u = torch.rand(k, dtype=torch.float64, device=cdf.device, generator=generator)
    return torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[0] - 1)
