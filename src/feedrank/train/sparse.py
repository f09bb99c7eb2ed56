"""Sparse embedding-table training (``train.sparse_embeddings: true``): cost per step flat in the table size.

With a dense gradient an ID table costs O(rows x dim) every step however few rows a batch looks
up: backward writes a zero-filled gradient the size of the table, and AdamW then updates (and
decays) every row. At 10M items that is most of the step (``benchmarks/sampled_softmax_scale.py``:
37x the 100k step). With the switch on, every ``nn.Embedding`` / ``nn.EmbeddingBag`` of the model
returns a sparse gradient (only the looked-up rows), those tables are stepped by
``torch.optim.SparseAdam`` (lazy Adam: a row's moments and weights change only in steps that look
it up), and every other parameter keeps fused AdamW with the trainer's weight decay.

What changes in the math, so the switch is a choice rather than a free speed-up:

- The tables get no weight decay (a decay would touch every row each step: the O(n) cost again).
- A row's Adam moments decay only when it is looked up, not every step (lazy Adam), and
  SparseAdam adds ``eps`` to ``sqrt(v)`` before bias correction where AdamW adds it after.
- Gradient clipping sees the same global norm as in dense mode: sparse gradients are coalesced
  (duplicate rows summed) before the norm is taken (``clip_grads``).

Not supported (refused when the config loads, ``TrainConfig.validate``): TorchRec tables (they
have their own fused row-wise optimizers), FSDP (it flattens parameters into dense shards) and
``torch.compile`` (its autograd does not trace sparse gradients).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

TABLE_TYPES = (nn.Embedding, nn.EmbeddingBag)


def make_tables_sparse(model: nn.Module) -> list[nn.Parameter]:
    """Turn every embedding table of ``model`` to sparse gradients; return their weights.

    Must run before DDP wraps the model: DDP decides at construction which parameters expect
    sparse gradients.
    """
    tables = [m for m in model.modules() if isinstance(m, TABLE_TYPES)]
    for table in tables:
        table.sparse = True
    seen: dict[int, nn.Parameter] = {}  # a table shared by two modules is one parameter
    for table in tables:
        if table.weight.requires_grad:
            seen.setdefault(id(table.weight), table.weight)
    return list(seen.values())


class SplitAdam:
    """Fused AdamW for the dense parameters and SparseAdam for the embedding tables, as one optimizer.

    It offers what the trainer and ``torch.amp.GradScaler`` use of an optimizer: ``param_groups``
    (the children's own group dicts, so setting a group's ``lr`` reaches the child), ``state``,
    ``step``, ``zero_grad``, ``state_dict`` / ``load_state_dict``.
    """

    def __init__(self, dense: torch.optim.Optimizer | None, sparse: torch.optim.SparseAdam) -> None:
        self.optimizers = [o for o in (dense, sparse) if o is not None]
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> ChainMap:
        return ChainMap(*(o.state for o in self.optimizers))

    def step(self, closure: None = None) -> None:
        for group in self.sparse.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    raise RuntimeError(
                        f"sparse_embeddings: an embedding table {tuple(p.shape)} got a dense gradient; the model "
                        "reads its .weight outside the table's forward (e.g. F.embedding(ids, table.weight))")
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": None if self.dense is None else self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"dense", "sparse"}:
            raise ValueError(f"not a sparse_embeddings optimizer state (keys {sorted(state)})")
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def split_adam(model: nn.Module, tables: list[nn.Parameter], *, lr: float, betas: tuple[float, float],
               weight_decay: float, device: torch.device) -> SplitAdam:
    """SparseAdam over ``tables``; AdamW over the rest, decaying matrices only (the trainer's split)."""
    table_ids = {id(t) for t in tables}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    dense = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda")) if groups else None
    return SplitAdam(dense, torch.optim.SparseAdam(tables, lr=lr, betas=betas))


def clip_grads(params: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """The global L2 norm of the gradients of ``params`` (sparse ones coalesced in place first, so a
    row looked up twice counts once, summed), and, if ``max_norm`` is set, every gradient scaled by
    ``min(1, max_norm / (norm + 1e-6))``: ``nn.utils.clip_grad_norm_``'s rule, which refuses sparse
    gradients."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())  # the coalesced values share the gradient's storage
        else:
            grads.append(p.grad)
    norm = nn.utils.get_total_norm(grads)
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(coef)
    return norm
