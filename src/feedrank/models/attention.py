"""Masked multi-head attention with three interchangeable kernels: einsum, bmm and SDPA.

The three kernels compute the same function; they exist side by side because the attention lab
compares their speed and memory, and because the explicit versions document what
``torch.nn.functional.scaled_dot_product_attention`` (SDPA) does behind one call.

Masking convention: ``key_mask`` is a boolean ``[B, Lk]`` tensor, True for real keys. A query whose
keys are *all* masked (a user with no history) must come out as zeros. Softmax over a row of
``-inf`` is NaN in every kernel (SDPA included), so instead of special-casing each kernel, ``attend``
un-masks such rows before the kernel runs (giving it a finite, meaningless row) and zeroes their
output afterwards. Multiplying by zero also zeroes the gradient that would flow through those rows.

Example::

    >>> mha = MultiHeadAttention(dim=32, n_heads=4, impl="einsum")
    >>> x = torch.randn(2, 5, 32); mask = torch.tensor([[True] * 5, [False] * 5])
    >>> y = mha(x, x, mask)                     # self-attention, [2, 5, 32]; y[1] is all zeros
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["einsum", "matmul", "sdpa"]
ATTENTION_IMPLS: tuple[str, ...] = get_args(AttentionImpl)


def _einsum_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    # bmm wants 3-D operands: fold heads into the batch dimension.
    q3, k3, v3 = q.reshape(b * h, lq, d), k.reshape(b * h, lk, d), v.reshape(b * h, lk, d)
    scores = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    key_mask = mask[:, None, None, :].expand(b, h, 1, lk).reshape(b * h, 1, lk)
    scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return torch.bmm(weights, v3).reshape(b, h, lq, d)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    # A boolean attn_mask means "True takes part in attention", the same convention as key_mask.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], dropout_p=dropout_p)


_KERNELS = {"einsum": _einsum_attention, "matmul": _matmul_attention, "sdpa": _sdpa_attention}


def _check_impl(impl: str) -> None:
    if impl not in _KERNELS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {list(ATTENTION_IMPLS)}")


def attend(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, impl: AttentionImpl = "sdpa", dropout_p: float = 0.0
) -> Tensor:
    """Scaled dot-product attention over heads, ignoring masked keys.

    Shapes: ``q`` [B, H, Lq, d], ``k`` and ``v`` [B, H, Lk, d], ``key_mask`` [B, Lk] bool (True =
    real key). Returns [B, H, Lq, d]; rows whose keys are all masked are exactly zero.
    ``dropout_p`` is applied to the attention weights; pass 0.0 in eval mode.
    """
    _check_impl(impl)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attend expects q [B, H, Lq, d] and k, v [B, H, Lk, d]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_mask must be bool [B, Lk] = {[k.shape[0], k.shape[2]]} to match k {tuple(k.shape)}; "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    has_keys = key_mask.any(dim=1)  # [B]
    safe_mask = key_mask | ~has_keys[:, None]
    out = _KERNELS[impl](q, k, v, safe_mask, dropout_p)
    return out * has_keys[:, None, None, None].to(out.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of ``query`` over ``context`` with a key padding mask.

    Used as self-attention (``query is context``) by the transformer history encoder and as
    attention pooling (a single query per row) by the attention history encoder. Queries and
    key/values have separate projections because in pooling they come from different sources.
    """

    def __init__(self, dim: int, n_heads: int, impl: AttentionImpl = "sdpa", dropout: float = 0.0):
        super().__init__()
        _check_impl(impl)
        if dim % n_heads:
            raise ValueError(f"attention dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.impl, self.dropout = n_heads, impl, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, query: Tensor, context: Tensor, key_mask: Tensor) -> Tensor:
        """``query`` [B, Lq, D], ``context`` [B, Lk, D], ``key_mask`` [B, Lk] -> [B, Lq, D]."""
        if query.dim() != 3 or context.dim() != 3 or query.shape[0] != context.shape[0]:
            raise ValueError(
                f"MultiHeadAttention expects query [B, Lq, D] and context [B, Lk, D]; "
                f"got query {tuple(query.shape)}, context {tuple(context.shape)}"
            )
        q = self._split_heads(self.q_proj(query))
        k, v = (self._split_heads(t) for t in self.kv_proj(context).chunk(2, dim=-1))
        out = attend(q, k, v, key_mask, self.impl, self.dropout if self.training else 0.0)
        b, h, lq, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, h * dh))
