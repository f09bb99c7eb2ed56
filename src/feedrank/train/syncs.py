"""Count host-device synchronisations in a block of code, on any device (CPU included).

A *sync* is an op the host has to wait for: a tensor value read into Python (``.item()``,
``int(t)``, ``bool(t)``, ``float(t)``: all ``aten::_local_scalar_dense``) or an op whose output
shape depends on the data (``nonzero``, ``masked_select``, ``unique``, indexing with a boolean
mask). On CUDA each one stalls the host until the device has caught up, which empties the launch
queue; on CPU they cost next to nothing, which is why they creep into a training step unnoticed
until the job moves to a GPU. Counting them on CPU (in tests) keeps the step sync-free everywhere.

Not seen: ``.tolist()`` / ``.numpy()`` of a CPU tensor read its memory without going through the
dispatcher. On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` catches every kind.

Example::

    with SyncCounter() as syncs:
        trainer.fit(data)
    print(syncs.total, dict(syncs.by_op))      # e.g. 0 {} , or 340 {'_local_scalar_dense': 340}
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops that always make the host wait for the value or the shape of their input.
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
#: Indexing ops that sync only when an index is a boolean mask (it becomes ``nonzero``).
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def is_sync(func: Any, args: tuple) -> bool:
    """True when the dispatched ``func(*args)`` forces a host-device synchronisation."""
    if func in _SYNC_OPS:
        return True
    if func in _INDEX_OPS and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts syncs (``is_sync``) by op name while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_sync(func, args):
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
