"""Serving-side quantization of a trained ranker: int8 Linear layers and int8 / fp16 embedding tables.

``quantize_ranker(model, mode)`` returns a quantized *copy* for CPU inference (the input is left
as it is), with the same ``score_candidates`` / ``predict`` interface, so serving can swap it in
after loading a bundle. Modes:

- ``int8_linear``: ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers. Weights
  are stored int8 (per tensor); activations are quantized on the fly at every call (choose scale,
  quantize, int8 GEMM, dequantize). Only layers with at least ``min_linear_params`` weights are
  converted: on the ranker's tiny layers (the 1-output heads, the 1- to 3-input dense fields) the
  per-call quantize/dequantize costs more than the GEMM it replaces (``feedrank lab quantize``).
- ``int8_embeddings``: every ``nn.Embedding`` becomes a row-wise uint8 table with one fp32 scale
  and offset per row (the float-qparams scheme of FBGEMM's row-wise tables and ``torch.ao``'s
  ``quint8`` embedding, whose kernel needs contiguous indices, which a column of ``item_cats`` is
  not); only looked-up rows are dequantized. Embedding tables are most of a recommender's bytes,
  and a lookup has no GEMM to slow down.
- ``fp16_embeddings``: every ``nn.Embedding`` stored as fp16, looked-up rows cast back to fp32.
- ``int8``: ``int8_linear`` + ``int8_embeddings``.
- ``bf16_linear``: the same large ``nn.Linear`` layers with bfloat16 weights (``BF16Linear``):
  inputs are rounded to bf16, the GEMM accumulates in fp32 and rounds its output to bf16 (torch's
  CPU GEMM has no fp32 output for bf16 inputs), and the output goes on in fp32 with the fp32 bias.
  On a CPU with AVX512-BF16 the GEMM runs about twice as fast as fp32's; bf16 keeps 8 bits of
  mantissa, so scores move by about 1e-2 relative and near-ties may swap (``feedrank lab quantize``
  measures the AUC and the top-k overlap). Unlike int8 there is no per-call scale to compute.
- ``none``: an unchanged copy.

``torch.ao.quantization`` is deprecated in favour of ``torchao`` (not a dependency); its eager
dynamic quantization still ships with torch 2.13, and its deprecation warnings are silenced here.

Example::

    >>> q = quantize_ranker(bundle.model, "int8_embeddings")
    >>> q.score_candidates(user, items)["value"]          # same call as the fp32 ranker
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QuantizeMode = Literal["none", "int8", "int8_linear", "int8_embeddings", "fp16_embeddings", "bf16_linear"]
QUANTIZE_MODES: tuple[str, ...] = get_args(QuantizeMode)

#: Linear layers with fewer weights than this stay fp32 under int8_linear (see the module docstring).
DEFAULT_MIN_LINEAR_PARAMS = 4096


class HalfEmbedding(nn.Module):
    """An embedding table stored in fp16; the looked-up rows come back as fp32."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        self.register_buffer("weight", table.weight.detach().to(torch.float16))

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight).float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype=float16"


#: ``BF16Linear`` pads its input's rows up to a multiple of this. The CPU's bf16 GEMM (oneDNN) builds
#: and caches a kernel for each input shape it meets, ~3 ms each on the reference machine, against
#: ~0.3 ms for the GEMM itself; a served feed's candidate count varies by request (seen items dropped,
#: fewer fresh ones), so unpadded every new count paid that once per layer: 13 ms a forward instead of
#: 3 over the first 100 distinct counts. Padded, 500 candidates meet at most 8 shapes; the waste is
#: under 64 rows (~13% at 500).
ROW_BUCKET = 64


class BF16Linear(nn.Module):
    """``nn.Linear`` with its weight stored in bfloat16: ``y = fp32(bf16(bf16(x) @ W^T)) + b``.

    Rows are padded with zeros up to a multiple of ``ROW_BUCKET`` for the GEMM and cut off after:
    each row's output is its own, so the padding changes no result, only how many kernels are built.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def matmul(self, x: Tensor, columns: slice = slice(None)) -> Tensor:
        """``x @ W[:, columns]^T`` (no bias), returned as fp32: a slice of the input columns serves a layer
        whose input is split in parts (``feedrank.models.interactions.CrossLayer.first_one_user``)."""
        rows = x.shape[-2]
        padded = F.pad(x.to(torch.bfloat16), (0, 0, 0, -rows % ROW_BUCKET))
        return (padded @ self.weight[:, columns].t())[..., :rows, :].float()

    def forward(self, x: Tensor) -> Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, dtype=bfloat16"


class Int8Embedding(nn.Module):
    """A row-wise uint8 embedding table: ``row = q * scale + offset`` with per-row fp32 ``scale`` and
    ``offset`` (the row's min). The error per value is at most ``scale / 2`` = range / 510; an all-zero
    row (the padding row) stays exactly zero."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        w = table.weight.detach().float()
        self.num_embeddings, self.embedding_dim = table.num_embeddings, table.embedding_dim
        lo, hi = w.min(dim=1).values, w.max(dim=1).values
        scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(lo))
        self.register_buffer("weight", torch.round((w - lo[:, None]) / scale[:, None]).clamp(0, 255).to(torch.uint8))
        self.register_buffer("scale", scale[:, None].contiguous())
        self.register_buffer("offset", lo[:, None].contiguous())

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight).float() * F.embedding(idx, self.scale) + F.embedding(idx, self.offset)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype=uint8 row-wise"


def _embedding_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]


def _linear_names(model: nn.Module, min_params: int) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.numel() >= min_params}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_ranker(model: nn.Module, mode: QuantizeMode, min_linear_params: int = DEFAULT_MIN_LINEAR_PARAMS) -> nn.Module:
    """A quantized copy of ``model`` in eval mode, for CPU inference (module docstring for the modes).

    Raises ``ValueError`` on an unknown mode, and when the model has no parameters on the CPU (the
    int8 kernels are CPU-only).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_ranker works on a CPU model: call model.cpu() first (int8 kernels are CPU-only)")
    q = copy.deepcopy(model).eval()
    if mode == "none":
        return q
    table = {"int8": Int8Embedding, "int8_embeddings": Int8Embedding, "fp16_embeddings": HalfEmbedding}.get(mode)
    if table is not None:
        for name in _embedding_names(q):
            _replace(q, name, table(q.get_submodule(name)))
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        if mode in ("int8", "int8_linear"):
            names = _linear_names(q, min_linear_params)
            q = quantize_dynamic(q, names, dtype=torch.qint8, inplace=True) if names else q
    if mode == "bf16_linear":
        for name in _linear_names(q, min_linear_params):
            _replace(q, name, BF16Linear(q.get_submodule(name)))
    return q.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s saved state dict (``torch.save``): what a bundle stores and a server loads.

    Parameters alone would miss int8 Linear weights, which live in packed params, not parameters.
    """
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
