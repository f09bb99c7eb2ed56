"""The blend of retrieval models: normalisation, mixing and the weight grid, against hand computation."""

import numpy as np
import pytest
import torch

from feedrank.config import ConfigError, from_dict
from feedrank.models.blend import BlendConfig, blend_scores, normalised


def test_zscore_blend_of_known_matrices_equals_the_hand_computed_ranking():
    a = torch.tensor([[4.0, 2.0, 0.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
    b = torch.tensor([[0.0, 30.0, 10.0, 20.0], [9.0, 0.0, 3.0, 0.0]])
    mixed = blend_scores([a, b], torch.tensor([0.6, 0.4]), "zscore")
    # by hand: row 0 of a has mean 2, population std sqrt(2); of b mean 15, std sqrt(125)
    za0 = (np.array([4, 2, 0, 2]) - 2) / np.sqrt(2)
    zb0 = (np.array([0, 30, 10, 20]) - 15) / np.sqrt(125)
    za1 = (np.array([1, 1, 1, 5]) - 2) / np.sqrt(3)
    zb1 = (np.array([9, 0, 3, 0]) - 3) / np.sqrt(13.5)
    expected = np.stack([0.6 * za0 + 0.4 * zb0, 0.6 * za1 + 0.4 * zb1])
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6)
    # the rankings: row 0 puts item 1 (b's best: z 1.34, a's 0) above item 0 (a's best: z 1.41, b's
    # -1.34) although a weighs more; row 1 item 3 (a's best) above item 0 (b's best)
    assert torch.argsort(mixed[0], descending=True).tolist() == [1, 0, 3, 2]
    assert torch.argsort(mixed[1], descending=True).tolist() == [3, 0, 2, 1]


def test_rank_normalisation_is_the_average_rank_scaled_to_one():
    ranks = normalised(torch.tensor([[3.0, 1.0, 3.0, 0.0, 2.0]]), "rank")
    # ascending order 0, 1, 2, 3, 3: ranks 0, 1, 2, then 3.5 for the tie; divided by n - 1 = 4
    np.testing.assert_allclose(ranks.numpy(), [[3.5 / 4, 1 / 4, 3.5 / 4, 0.0, 2 / 4]])
    # a blend of ranks ignores the parts' scales: equal weights on reversed orders tie everything
    mixed = blend_scores([torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[300.0, 200.0, 100.0]])], torch.tensor([0.5, 0.5]), "rank")
    np.testing.assert_allclose(mixed.numpy(), [[0.5, 0.5, 0.5]])


def test_grid_is_the_simplex_at_the_step_first_part_heaviest_first():
    assert BlendConfig(grid_step=0.5).grid() == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    three = BlendConfig(parts=["two_tower", "ease", "covisit"], grid_step=0.5).grid()
    assert three == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
    assert len(BlendConfig().grid()) == 11 and all(abs(sum(w) - 1) < 1e-9 for w in BlendConfig().grid())


@pytest.mark.parametrize(("section", "match"), [
    ({"parts": ["two_tower"]}, "at least 2 parts"),
    ({"parts": ["two_tower", "knn"]}, "unknown part"),
    ({"parts": ["ease", "ease"]}, "once"),
    ({"weights": [0.7, 0.7]}, "summing to 1"),
    ({"grid_step": 0.3}, "grid_step"),
    ({"select_by": "auc"}, "select_by"),
    ({"normalise": "minmax"}, "normalise"),
])  # fmt: skip
def test_bad_blend_sections_are_config_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(BlendConfig, section, "blend")
