"""Explicit feature interactions for the ranker: a DCN-v2 cross network and DLRM-style dot products.

Both modules take the ranker's feature *fields*, one embedding per feature ``[B, F, D]`` (user id,
each categorical column, pooled history, counters, ...), and return one flat vector per row that
the ranker's shared MLP reads. They differ in which interactions they make explicit:

- ``CrossNetwork`` (DCN-v2, Wang et al. 2021): ``x_{l+1} = x0 * (W x_l + b) + x_l`` over the
  concatenated fields ``x0`` [B, F*D]. Each layer raises the polynomial degree of the feature
  crosses by one, element-wise, so a layer can learn "this publisher x this age bucket" bit by
  bit. ``W`` is full rank ``[F*D, F*D]`` or low rank ``U V^T`` with ``U, V`` ``[F*D, r]``
  (``rank=r``), which the paper finds nearly as good at a fraction of the cost. Output: [B, F*D].
- ``DotInteraction`` (DLRM, Naumov et al. 2019): every pairwise dot product ``<e_i, e_j>``, i < j,
  of the field embeddings: the factorisation-machine term, F(F-1)/2 numbers per row. The output
  is the concatenated fields followed by the dots, [B, F*D + F(F-1)/2]: the fields are kept (unlike
  the original DLRM, which keeps only the dense features) so that the only difference between the
  two choices is the explicit interaction, which is what ``benchmarks/ranker_interactions.py``
  measures.

``build_interaction(kind, n_fields, dim, ...)`` returns either one; each has ``out_dim`` and
``forward_one_user(user, items)``, the serving form (one user's fields against N candidates' fields,
``Ranker.score_candidates``): the cross network projects the user's share of its first layer once
instead of once per candidate.

Example::

    >>> fields = torch.randn(4, 3, 8)              # B=4 rows, F=3 fields of D=8
    >>> DotInteraction(3, 8)(fields).shape           # 3*8 + 3 pairwise dots
    torch.Size([4, 27])
    >>> CrossNetwork(24, n_layers=2, rank=4)(fields.flatten(1)).shape
    torch.Size([4, 24])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from feedrank.models.quantize import BF16Linear

InteractionKind = Literal["dcn", "dot"]


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x0 * (W x + b) + x``, with ``W`` full rank or ``U V^T`` of rank ``rank``."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        if rank < 0 or rank >= dim:
            raise ValueError(f"cross layer rank must be 0 (full rank) or in [1, {dim}), got {rank}")
        if rank:
            self.project = nn.Sequential(nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim))
        else:
            self.project = nn.Linear(dim, dim)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return torch.addcmul(x, x0, self.project(x))  # x0 * (W x + b) + x in one pass

    def first_one_user(self, x0: Tensor, user: Tensor, items: Tensor) -> Tensor:
        """The layer applied to ``x = x0`` [N, dim] = ``[user, items]`` per row, ``user`` [D_u] the
        same in every row (one request's user): ``forward(x0, x0)``, with the user columns' share
        of the first projection ``W x0`` computed once (one row) instead of N times.

        Exact up to float summation order: the projection is linear, ``W x0 = W_u u + W_i x0_i``.
        A bf16 projection (``BF16Linear``, ``feedrank.models.quantize``) is split the same way; an
        int8 one holds no weight matrix to split and is applied whole.
        """
        first = self.project[0] if isinstance(self.project, nn.Sequential) else self.project
        du = user.shape[0]
        if type(first) is nn.Linear:
            constant = nn.functional.linear(user, first.weight[:, :du], first.bias)  # [out]: the user half (+ bias)
            h = torch.addmm(constant, items, first.weight[:, du:].t())
        elif type(first) is BF16Linear:
            constant = first.matmul(user[None], slice(None, du))  # [1, out]: the user half
            if first.bias is not None:
                constant = constant + first.bias
            h = first.matmul(items, slice(du, None)) + constant
        else:
            return self.forward(x0, x0)
        if isinstance(self.project, nn.Sequential):  # low rank: U (V x0)
            h = self.project[1](h)
        return torch.addcmul(x0, x0, h)


class CrossNetwork(nn.Module):
    """``n_layers`` cross layers applied to ``x0`` [B, dim]; the residual keeps every lower degree."""

    def __init__(self, dim: int, n_layers: int, rank: int = 0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a cross network needs at least one layer, got {n_layers}")
        self.layers = nn.ModuleList(CrossLayer(dim, rank) for _ in range(n_layers))
        self.out_dim = dim

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x

    def forward_one_user(self, user: Tensor, items: Tensor) -> Tensor:
        """``forward`` of ``x0 = [user, items]`` per row, ``user`` [D_u] the same in all N rows and
        ``items`` [N, dim - D_u]: the first layer projects the user half once (``first_one_user``)."""
        x0 = torch.cat([user.expand(items.shape[0], -1), items], dim=1)
        x = self.layers[0].first_one_user(x0, user, items)
        for layer in self.layers[1:]:
            x = layer(x0, x)
        return x


class FieldCross(nn.Module):
    """Adapter: fields [B, F, D] -> flattened -> ``CrossNetwork`` -> [B, F*D]."""

    def __init__(self, n_fields: int, dim: int, n_layers: int, rank: int = 0):
        super().__init__()
        self.cross = CrossNetwork(n_fields * dim, n_layers, rank)
        self.out_dim = self.cross.out_dim

    def forward(self, fields: Tensor) -> Tensor:
        return self.cross(fields.flatten(1))

    def forward_one_user(self, user: Tensor, items: Tensor) -> Tensor:
        """``forward`` of one user's fields [F_u, D] joined to each of N rows of item fields
        [N, F_i, D] (user fields first), without projecting the user's fields N times."""
        return self.cross.forward_one_user(user.flatten(), items.flatten(1))


class DotInteraction(nn.Module):
    """Fields [B, F, D] -> [B, F*D + F(F-1)/2]: the fields, then every ``<e_i, e_j>`` with i < j."""

    def __init__(self, n_fields: int, dim: int):
        super().__init__()
        if n_fields < 2:
            raise ValueError(f"dot interactions need at least two fields, got {n_fields}")
        rows, cols = torch.triu_indices(n_fields, n_fields, offset=1)
        # Buffers (not saved): they follow the module across devices and are derived from n_fields.
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.n_fields = n_fields
        self.n_pairs = rows.shape[0]
        self.out_dim = n_fields * dim + self.n_pairs

    def forward(self, fields: Tensor) -> Tensor:
        if fields.dim() != 3 or fields.shape[1] != self.n_fields:
            raise ValueError(f"fields must be [B, {self.n_fields}, D], got {tuple(fields.shape)}")
        gram = torch.bmm(fields, fields.transpose(1, 2))  # [B, F, F]; F is small (~15), so this is cheap
        return torch.cat([fields.flatten(1), gram[:, self.rows, self.cols]], dim=1)

    def forward_one_user(self, user: Tensor, items: Tensor) -> Tensor:
        """``forward`` of one user's fields [F_u, D] joined to each of N rows of item fields [N, F_i, D]."""
        return self(torch.cat([user.expand(items.shape[0], -1, -1), items], dim=1))


def build_interaction(kind: InteractionKind, n_fields: int, dim: int, *, cross_layers: int = 2, cross_rank: int = 0) -> nn.Module:
    """The interaction module named by ``kind``; both map fields [B, F, D] to [B, module.out_dim]."""
    if kind == "dcn":
        return FieldCross(n_fields, dim, cross_layers, cross_rank)
    if kind == "dot":
        return DotInteraction(n_fields, dim)
    raise ValueError(f"unknown interaction {kind!r}; choose 'dcn' or 'dot'")
