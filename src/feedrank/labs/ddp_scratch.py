"""Data parallelism from scratch: what ``DistributedDataParallel`` does, in one readable class.

``ScratchDDP(module, bucket_bytes)`` keeps a full replica per rank and makes every rank end each
backward pass with the *average* of all ranks' gradients, the way DDP does:

1. at wrap time, rank 0's parameters and buffers are broadcast, so every replica starts identical;
2. parameters are grouped into buckets of about ``bucket_bytes`` (``assign_buckets``), in reverse
   registration order, because backward produces gradients roughly from the last layer to the
   first;
3. a ``register_post_accumulate_grad_hook`` on each parameter marks its gradient ready; when the
   last gradient of a bucket is ready, the bucket's gradients are copied into one flat buffer
   (pre-divided by the world size, as DDP does) and an **async** ``all_reduce`` is launched, so
   communication of late layers overlaps the backward of early ones. Buckets are launched strictly
   in bucket order (a full bucket waits for the ones before it), as DDP's reducer does: the ranks
   must issue the same collectives in the same order, and which bucket fills first can differ
   between ranks (a parameter with no gradient on one rank's data only counts at the end);
4. a callback queued on the autograd engine runs when backward ends: it launches any bucket that
   did not fill (parameters without a gradient this step count as zeros), waits for every
   all-reduce and copies the averaged gradients back into ``param.grad``;
5. ``no_sync()`` turns the hooks off for gradient accumulation: gradients accumulate locally and
   the next synchronised backward all-reduces the accumulated sum.

Why buckets: one all-reduce per parameter pays the per-call latency hundreds of times; one
all-reduce for the whole model cannot start before backward ends (no overlap). A bucket size in
between buys both; ``feedrank lab ddp`` sweeps it.

Example (under ``torchrun``, after ``dist.init_process_group("gloo")``)::

    model = ScratchDDP(TwoTower(...), bucket_bytes=256 * 1024)
    loss_fn(model, batch).backward()        # gradients averaged across ranks on return
    with model.no_sync():                   # accumulate k-1 micro-batches locally ...
        loss_fn(model, micro).backward()
    print(model.stats.all_reduce_calls)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def assign_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``nbytes`` (one entry per parameter, in registration order) grouped into buckets.

    Parameters are taken in *reverse* order; a bucket is closed as soon as it holds at least
    ``bucket_bytes``, so every bucket but the last reaches the cap and a parameter larger than the
    cap gets a bucket of its own.

    >>> assign_buckets([400, 400, 400, 400], bucket_bytes=800)
    [[3, 2], [1, 0]]
    >>> assign_buckets([100, 5000, 100], bucket_bytes=1000)
    [[2, 1], [0]]
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in reversed(range(len(nbytes))):
        current.append(i)
        size += nbytes[i]
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


@dataclass
class CommStats:
    """What the wrapper did, for the lab: calls, bytes, and when each all-reduce ran.

    ``intervals`` holds ``(launched, completed)`` ``time.perf_counter`` pairs of every all-reduce
    and ``backward_ends`` the time each synchronised backward pass produced its last gradient
    (the end of gradient computation), so ``overlap_share`` can tell how much communication was
    hidden behind backward.
    """

    all_reduce_calls: int = 0
    bytes_reduced: int = 0
    intervals: list[list[float]] = field(default_factory=list)
    backward_ends: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.all_reduce_calls, self.bytes_reduced = 0, 0
        self.intervals.clear()
        self.backward_ends.clear()


def overlap_share(intervals: Sequence[Sequence[float]], backward_end: float) -> float:
    """Share of the all-reduce time (launch to completion) spent before ``backward_end``: 1 = all
    communication hidden behind backward, 0 = none (everything ran after it).

    >>> overlap_share([(0.0, 2.0), (3.0, 5.0)], backward_end=4.0)
    0.75
    """
    total = sum(max(0.0, done - start) for start, done in intervals)
    if total == 0.0:
        return 0.0
    hidden = sum(max(0.0, min(done, backward_end) - start) for start, done in intervals)
    return hidden / total


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.ready = 0
        self.work: Any = None
        self.buffer: Tensor | None = None
        self.interval: list[float] | None = None

    def reset(self) -> None:
        self.ready, self.work, self.buffer, self.interval = 0, None, None, None


class ScratchDDP(nn.Module):
    """A from-scratch ``DistributedDataParallel`` (see the module docstring)."""

    def __init__(self, module: nn.Module, bucket_bytes: int = 25 * 1024 * 1024, group: Any = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ScratchDDP needs an initialised process group (run under torchrun)")
        self.module, self.group = module, group
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        self._sync = True
        self._callback_queued = False
        self._last_ready = 0.0
        self._next = 0  # the next bucket to launch: launches go in bucket order on every rank
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0, group=group)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        for dtype in dict.fromkeys(p.dtype for p in params):  # one dtype per flat buffer
            same = [p for p in params if p.dtype == dtype]
            plan = assign_buckets([p.numel() * p.element_size() for p in same], bucket_bytes)
            self.buckets += [_Bucket([same[i] for i in idx]) for idx in plan]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally, without communication."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # ------------------------------------------------------------------ hooks

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        if not self._callback_queued:  # first gradient of this backward: finish when the engine does
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        self._last_ready = time.perf_counter()
        bucket = self._bucket_of[id(param)]
        bucket.ready += 1
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        first = bucket.params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.buffer = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
        bucket.interval = [time.perf_counter(), float("nan")]
        bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
        interval = bucket.interval
        bucket.work.get_future().then(lambda _: interval.__setitem__(1, time.perf_counter()))
        self.stats.all_reduce_calls += 1
        self.stats.bytes_reduced += bucket.buffer.numel() * first.element_size()

    def _finish(self) -> None:
        """End of backward: launch what did not fill, wait for everything, write gradients back."""
        self._callback_queued = False
        self.stats.backward_ends.append(self._last_ready)
        for bucket in self.buckets[self._next:]:  # in bucket order, after those already launched
            self._launch(bucket)
        self._next = 0
        for bucket in self.buckets:
            bucket.work.wait()
            offset = 0
            for p in bucket.params:
                n = p.numel()
                flat = bucket.buffer[offset: offset + n].view_as(p)
                if p.grad is None:
                    p.grad = flat.clone()
                else:
                    p.grad.copy_(flat)
                offset += n
            if bucket.interval is not None:
                if bucket.interval[1] != bucket.interval[1]:  # NaN: wait() returned before the callback
                    bucket.interval[1] = time.perf_counter()
                self.stats.intervals.append(bucket.interval)
            bucket.reset()
