"""Retrieval losses against hand-computed values, logQ correction sign, accidental hits, sampler."""

from __future__ import annotations

import math

import pytest
import torch

from feedrank.models.losses import (
    NegativeSampler,
    bce_loss,
    in_batch_softmax_loss,
    sampled_softmax_loss,
    weighted_mean,
)

LN = math.log


def test_in_batch_softmax_2x2_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # row 0: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2); row 1: -log(e^1 / (e^1 + e^1)) = log 2
    expected = (LN(1 + math.exp(-2)) + LN(2)) / 2
    loss = in_batch_softmax_loss(logits, item_ids=torch.tensor([5, 7]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_logq_correction_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    logq = torch.tensor([LN(0.5), LN(0.1)])
    # corrected logit = logit - log q(column item)
    # row 0: log(1 + exp((0 - ln .1) - (2 - ln .5))) = log(1 + 5 e^-2); row 1: log(1 + .1/.5) = log 1.2
    expected = (LN(1 + 5 * math.exp(-2)) + LN(1.2)) / 2
    loss = in_batch_softmax_loss(logits, torch.tensor([5, 7]), logq=logq)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_logq_pushes_popular_items_logit_down():
    logits = torch.zeros(2, 2)
    logq = torch.tensor([LN(0.9), LN(0.1)])  # item 0 popular, item 1 rare
    rows = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    plain = [in_batch_softmax_loss(logits, torch.tensor([3, 4]), weight=w).item() for w in rows]
    corrected = [in_batch_softmax_loss(logits, torch.tensor([3, 4]), logq=logq, weight=w).item() for w in rows]
    # The popular item's logit drops: as a positive (row 0) its loss rises, as a negative (row 1) the
    # rare positive's loss falls.
    assert corrected[0] > plain[0] == pytest.approx(LN(2))
    assert corrected[1] < plain[1]


def test_in_batch_masks_accidental_hits_by_item_and_by_user():
    logits = torch.tensor([[1.0, 9.0, 0.0], [9.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    # the large off-diagonal logits are the same item (or the same user's other positive): masked out
    expected = (2 * LN(1 + math.exp(-1)) + LN(1 + 2 * math.exp(-2))) / 3
    by_item = in_batch_softmax_loss(logits, item_ids=torch.tensor([5, 5, 7]))
    by_user = in_batch_softmax_loss(logits, item_ids=torch.tensor([5, 6, 7]), user_ids=torch.tensor([1, 1, 2]))
    unmasked = in_batch_softmax_loss(logits, item_ids=torch.tensor([5, 6, 7]))
    assert by_item.item() == pytest.approx(expected, rel=1e-6)
    assert by_user.item() == pytest.approx(expected, rel=1e-6)
    assert unmasked.item() > 5.0


def test_sampled_softmax_by_hand_with_accidental_hit():
    pos_logits = torch.tensor([2.0, 0.0])
    neg_logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pos_ids, neg_ids = torch.tensor([3, 4]), torch.tensor([4, 9])
    # row 0: log(1 + e^-2 + e^-1); row 1: negative 4 is its own positive -> masked; log(1 + e^0)
    expected = (LN(1 + math.exp(-2) + math.exp(-1)) + LN(2)) / 2
    assert sampled_softmax_loss(pos_logits, neg_logits, pos_ids, neg_ids).item() == pytest.approx(expected, rel=1e-6)


def test_sampled_softmax_logq_by_hand():
    pos_logits, neg_logits = torch.tensor([2.0]), torch.tensor([[0.0, 1.0]])
    pos_logq, neg_logq = torch.tensor([LN(0.5)]), torch.tensor([LN(0.2), LN(0.1)])
    # log(1 + exp(0 - ln .2 - 2 + ln .5) + exp(1 - ln .1 - 2 + ln .5)) = log(1 + 2.5 e^-2 + 5 e^-1)
    expected = LN(1 + 2.5 * math.exp(-2) + 5 * math.exp(-1))
    loss = sampled_softmax_loss(pos_logits, neg_logits, torch.tensor([3]), torch.tensor([4, 9]), pos_logq, neg_logq)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="both pos_logq and neg_logq"):
        sampled_softmax_loss(pos_logits, neg_logits, torch.tensor([3]), torch.tensor([4, 9]), pos_logq, None)


def test_sampled_softmax_masks_known_hits():
    """Row 0's negative 9 is a known positive of its user elsewhere in the data: not a negative."""
    pos_logits = torch.tensor([2.0, 0.0])
    neg_logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    known = torch.tensor([[False, True], [False, False]])
    # row 0: log(1 + e^-2) (9 masked); row 1: log(1 + e^1 + e^0)
    expected = (LN(1 + math.exp(-2)) + LN(1 + math.e + 1)) / 2
    loss = sampled_softmax_loss(pos_logits, neg_logits, torch.tensor([3, 5]), torch.tensor([4, 9]), known_hits=known)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"known_hits must be \[B, K\] = \[2, 2\], got \(2, 1\)"):
        sampled_softmax_loss(pos_logits, neg_logits, torch.tensor([3, 5]), torch.tensor([4, 9]), known_hits=known[:, :1])


def test_bce_weighted_by_hand():
    loss = bce_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0]))
    # row 0: -log sigmoid(0) = log 2; row 1: -log(1 - sigmoid(2)) = log(1 + e^2)
    assert loss.item() == pytest.approx((LN(2) + 3 * LN(1 + math.exp(2))) / 4, rel=1e-6)


def test_empty_and_zero_weight_give_zero_not_nan():
    assert weighted_mean(torch.zeros(0)).item() == 0.0
    assert weighted_mean(torch.tensor([1.0, 2.0]), torch.zeros(2)).item() == 0.0
    assert in_batch_softmax_loss(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)).item() == 0.0


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\[B, N\].*\(2, 3\)"):
        in_batch_softmax_loss(torch.zeros(2, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"logits \(2,\) and clicked \(3,\)"):
        bce_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"weight \(3,\) must match per-example losses \(2,\)"):
        bce_loss(torch.zeros(2), torch.zeros(2), torch.ones(3))


def test_uniform_sampler_skips_padding_and_oov():
    sampler = NegativeSampler(torch.zeros(6, 1, dtype=torch.long), "uniform")
    torch.manual_seed(0)
    ids = sampler.sample(2000)
    assert ids.min() >= 2 and ids.max() <= 5
    torch.testing.assert_close(sampler.log_q, torch.full((6,), LN(1 / 4)))


def test_popularity_sampler_probabilities():
    counts = torch.tensor([0, 0, 3, 0, 8])
    sampler = NegativeSampler(torch.zeros(5, 2, dtype=torch.long), "popularity", counts, power=1.0)
    # weights (count + 1): 4, 1, 9 over the real ids 2..4; padding/OOV get the rarest log q
    expected = torch.tensor([1 / 14, 1 / 14, 4 / 14, 1 / 14, 9 / 14]).log()
    torch.testing.assert_close(sampler.log_q, expected)
    torch.manual_seed(0)
    freq = torch.bincount(sampler.sample(20000), minlength=5).float() / 20000
    assert freq[:2].sum() == 0
    torch.testing.assert_close(freq[2:], torch.tensor([4 / 14, 1 / 14, 9 / 14]), atol=0.02, rtol=0)


def test_all_sampler_is_the_whole_catalogue_once_whatever_k():
    sampler = NegativeSampler(torch.zeros(6, 1, dtype=torch.long), "all")
    for k in (1, 4, 100):
        assert sampler.sample(k).tolist() == [2, 3, 4, 5]
    torch.testing.assert_close(sampler.log_q, torch.full((6,), LN(1 / 4)))  # uniform: the correction cancels


def test_sampler_bad_input():
    with pytest.raises(ValueError, match="needs item_counts"):
        NegativeSampler(torch.zeros(5, 1, dtype=torch.long), "popularity")
    with pytest.raises(ValueError, match=r"item_counts must be \[5\]"):
        NegativeSampler(torch.zeros(5, 1, dtype=torch.long), "popularity", torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown negative sampler 'zipf'"):
        NegativeSampler(torch.zeros(5, 1, dtype=torch.long), "zipf")


def test_known_hits_are_masked_from_the_negatives():
    """Column 1's item is a known positive of row 0's user from outside the batch: not a negative."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, 0.0], [0.0, 0.3, 1.0]])
    items = torch.tensor([10, 11, 12])
    known = torch.zeros(3, 3, dtype=torch.bool)
    known[0, 1] = True
    per_row = torch.stack([
        -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0],  # row 0 without column 1
        -torch.log_softmax(logits[1], 0)[1],
        -torch.log_softmax(logits[2], 0)[2],
    ])
    assert in_batch_softmax_loss(logits, items, known_hits=known).item() == pytest.approx(per_row.mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="known_hits must be"):
        in_batch_softmax_loss(logits, items, known_hits=known[:2])


def test_in_batch_positives_mask_equals_the_sub_batch_of_positive_rows():
    """The masked formulation (fixed shapes, no sync) gives the loss and the gradient of selecting
    the positive rows first: they take no part as rows nor as negative columns."""
    g = torch.Generator().manual_seed(0)
    b = 7
    logits = torch.randn(b, b, generator=g, requires_grad=True)
    items, users = torch.tensor([2, 3, 3, 4, 5, 6, 2]), torch.tensor([2, 2, 3, 4, 5, 6, 7])
    logq, weight = -torch.rand(b, generator=g), torch.rand(b, generator=g) + 0.5
    known = torch.rand(b, b, generator=g) < 0.2
    positives = torch.tensor([True, False, True, True, False, True, False])
    masked = in_batch_softmax_loss(logits, items, users, logq, weight, known, positives)
    (grad_masked,) = torch.autograd.grad(masked, logits)
    rows = positives.nonzero().squeeze(1)
    sub = in_batch_softmax_loss(logits[rows][:, rows], items[rows], users[rows], logq[rows], weight[rows],
                                known[rows][:, rows])
    (grad_sub,) = torch.autograd.grad(sub, logits)
    torch.testing.assert_close(masked, sub)
    torch.testing.assert_close(grad_masked, grad_sub)
    assert in_batch_softmax_loss(logits, items, positives=torch.zeros(b, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match=r"positives must be a bool \[N\] = \[7\] mask"):
        in_batch_softmax_loss(logits, items, positives=positives.float())
