"""DCN-v2 cross layers and DLRM dot interactions, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from feedrank.models.interactions import CrossLayer, CrossNetwork, DotInteraction, FieldCross, build_interaction


def test_cross_layer_matches_formula_by_hand():
    layer = CrossLayer(2)
    with torch.no_grad():
        layer.project.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
        layer.project.bias.copy_(torch.tensor([0.5, 1.0]))
    x0 = torch.tensor([[2.0, 3.0]])
    x = torch.tensor([[1.0, -1.0]])
    # W x + b = [1 - 2 + 0.5, 1 + 1] = [-0.5, 2]; x0 * that + x = [-1 + 1, 6 - 1]
    assert torch.equal(layer(x0, x), torch.tensor([[0.0, 5.0]]))


def test_low_rank_cross_layer_equals_full_rank_with_w_equal_u_v():
    torch.manual_seed(0)
    low, full = CrossLayer(6, rank=2), CrossLayer(6)
    down, up = low.project[0], low.project[1]  # x -> V^T x -> U (V^T x) + b
    with torch.no_grad():
        full.project.weight.copy_(up.weight @ down.weight)
        full.project.bias.copy_(up.bias)
    x0, x = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(low(x0, x), full(x0, x))
    assert sum(p.numel() for p in low.parameters()) == 6 * 2 + 2 * 6 + 6


def test_cross_network_stacks_layers_with_the_same_x0():
    torch.manual_seed(0)
    net = CrossNetwork(4, n_layers=2)
    x0 = torch.randn(3, 4)
    expected = net.layers[1](x0, net.layers[0](x0, x0))
    torch.testing.assert_close(net(x0), expected)


def test_dot_interaction_by_hand():
    fields = torch.tensor([[[1.0, 0.0], [2.0, 3.0], [-1.0, 1.0]]])  # B=1, F=3, D=2
    out = DotInteraction(3, 2)(fields)
    # pairs (0,1), (0,2), (1,2): 2, -1, -2 + 3 = 1
    assert torch.equal(out, torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0, 1.0, 2.0, -1.0, 1.0]]))


@pytest.mark.parametrize("kind, expected_dim", [("dcn", 5 * 4), ("dot", 5 * 4 + 10)])
def test_build_interaction_output_dims(kind, expected_dim):
    module = build_interaction(kind, n_fields=5, dim=4, cross_layers=3, cross_rank=2)
    out = module(torch.randn(7, 5, 4))
    assert module.out_dim == expected_dim
    assert out.shape == (7, expected_dim)


def test_interactions_accept_an_empty_batch():
    for kind in ("dcn", "dot"):
        module = build_interaction(kind, n_fields=3, dim=2)
        assert module(torch.zeros(0, 3, 2)).shape == (0, module.out_dim)


def test_bad_interaction_arguments_are_named():
    with pytest.raises(ValueError, match="unknown interaction 'fm'"):
        build_interaction("fm", 3, 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank must be 0"):
        CrossLayer(4, rank=4)
    with pytest.raises(ValueError, match="at least one layer"):
        FieldCross(3, 4, n_layers=0)
    with pytest.raises(ValueError, match="at least two fields"):
        DotInteraction(1, 4)
    with pytest.raises(ValueError, match=r"fields must be \[B, 3, D\], got \(2, 4, 5\)"):
        DotInteraction(3, 5)(torch.zeros(2, 4, 5))
