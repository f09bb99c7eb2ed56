"""The inverse-CDF sampler draws each item with the probability whose log is the logQ correction."""

from __future__ import annotations

import pytest
import torch

from feedrank.models.samplers import cumulative_table, draw_from_cdf


def test_draw_frequencies_match_probs() -> None:
    probs = torch.tensor([0.0, 0.0, 0.5, 0.3, 0.15, 0.05])  # ids 0/1 (padding, OOV) never drawn
    draws = draw_from_cdf(cumulative_table(probs), 200_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[:2].sum() == 0
    assert torch.allclose(freq, probs.double(), atol=5e-3)
    assert torch.allclose(freq[2:].log(), probs[2:].double().log(), atol=0.05)  # logQ of drawn items


def test_bad_table_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        cumulative_table(torch.tensor([0.5, -0.1]))


def test_popularity_negative_sampler_draws_by_its_log_q() -> None:
    """The two-tower's popularity sampler draws through the CDF table, and its draws follow its own log q."""
    from feedrank.models.losses import NegativeSampler

    counts = torch.tensor([0, 0, 90, 30, 5, 0])
    sampler = NegativeSampler(torch.zeros(6, 1, dtype=torch.long), "popularity", counts, power=1.0)
    draws = sampler.sample(200_000)
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[:2].sum() == 0  # padding and OOV are never negatives
    assert torch.allclose(freq[2:].log(), sampler.log_q[2:].double(), atol=0.05)
