"""Process-group setup and model wrapping, so one training script runs with and without torchrun.

``torchrun --nproc_per_node N script.py`` sets RANK / WORLD_SIZE / LOCAL_RANK in each worker's
environment; ``init_distributed`` reads them and joins the group (gloo on CPU, nccl on CUDA). With
no such variables it returns a single-process ``DistEnv`` and every helper below degrades to a
no-op, so the trainer never branches on "am I distributed" beyond asking ``env.is_main``.

Strategies (``wrap_model``):

- ``ddp``: ``DistributedDataParallel``: full replica per rank, gradients all-reduced in buckets of
  ``bucket_cap_mb`` overlapping the backward pass. DDP broadcasts rank 0's weights at wrap time, so
  ranks start identical even if each initialised its model differently.
- ``fsdp``: FSDP2 ``fully_shard`` on every direct child holding parameters, then on the root:
  parameters, gradients and optimizer state are sharded across ranks and all-gathered per child
  during forward/backward. Works on CPU/gloo in torch 2.13 (tested). Unlike DDP it does not
  broadcast, so rank 0's initial weights are broadcast here before sharding.

A model may only be called through the wrapper's ``forward`` (``model(batch)``): both strategies
hook it to prepare the gradient reduction / parameter all-gather.

A second, gloo-backed group carries tiny control messages (the "stop now" flag, RNG states) on
CPU, so they never force a CUDA synchronisation on the nccl stream.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Single-process runs have rank 0 of world size 1."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when init_distributed created the process group (so it must destroy it)
    control: Any = None  # gloo ProcessGroup for CPU control messages; None when single-process

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and TensorBoard files."""
        return self.rank == 0


def init_process_group(backend: str, timeout_s: float, **kwargs: Any) -> None:
    """``dist.init_process_group``, after importing ``torch.distributed.nn.functional``: the one way
    feedrank joins a process group, so that ``destroy_process_group`` really ends it.

    That module's functions take ``group=group.WORLD`` as a default argument, evaluated when it is
    first imported, and ``DistributedDataParallel(...)`` imports it lazily. Imported after the group
    exists (torch 2.13), those defaults hold the default ProcessGroup for good:
    ``destroy_process_group`` then leaves its gloo threads (two ``pt_gloo_runloop``, one
    ``gloo_tcp_loop``) alive into interpreter teardown, while the peer's sockets close: the
    state a C++ "terminate called without an active exception" at exit points to (a process
    exiting with live ProcessGroup threads). Imported first, the defaults are ``None`` and the
    threads end in ``destroy_process_group``. ``kwargs`` go to ``dist.init_process_group``.
    """
    import torch.distributed.nn.functional  # noqa: F401  (before the group exists: see above)

    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(preference: Literal["auto", "cpu", "cuda"], local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(preference: Literal["auto", "cpu", "cuda"] = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the torchrun process group if launched by torchrun, else describe a single process."""
    if not launched_by_torchrun() and not dist.is_initialized():
        return DistEnv(rank=0, world_size=1, local_rank=0, device=resolve_device(preference), owns_group=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(preference, local_rank)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_process_group("nccl" if device.type == "cuda" else "gloo", timeout_s)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        owns_group=owns,
        control=control,
    )


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if ``init_distributed`` created it (not one the caller owns).

    Call it from a ``finally`` (or ``__exit__``). On a normal exit every rank first meets at a
    barrier, so no rank closes its connections while a peer still reads from them. While an
    exception propagates there is no barrier: the peers may be inside another collective, which
    a barrier would mismatch or wait on until the timeout; destroying the group at once closes
    the connections, so the peers' collectives fail, each rank leaves through its own
    ``shutdown``, and torchrun reports this rank's traceback as the root cause.

    A ``DistributedDataParallel`` sits in a reference cycle and its reducer holds the group, so
    a collection follows: wrappers no longer reachable release the group (and its gloo threads
    end) here, not during interpreter teardown (see ``init_process_group``).
    """
    if env.owns_group and dist.is_initialized():
        if sys.exc_info()[1] is None:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def wrap_model(model: nn.Module, env: DistEnv, strategy: Strategy, bucket_cap_mb: float) -> nn.Module:
    """The module to call in training. Single-process: ``model`` itself.

    For FSDP the returned module *is* ``model`` (``fully_shard`` converts it in place); for DDP it is
    a wrapper around it whose parameters are ``model``'s own.
    """
    if not env.is_distributed:
        return model
    if strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=bucket_cap_mb)
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src=0)
    # One FSDP unit for the whole model, not one per child: feedrank's towers use parameters owned
    # by a sibling (the user tower embeds history with the item tower's ID table), and a per-child
    # unit would leave that table sharded (a DTensor) when the sibling reads it. Parameters and
    # optimizer state are still sharded between steps, which is what a large embedding table needs.
    fully_shard(model)
    return model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final accumulation micro-steps (``enabled=False``).

    Gradients then accumulate locally and the final micro-step reduces their sum once, instead of
    communicating ``grad_accum_steps`` times for the same result.
    """
    if enabled or not isinstance(module, nn.Module):
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2 module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier(group=env.control)


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True when ``flag`` is True on any rank: every rank then takes the same branch (no hang)."""
    if not env.is_distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control)
    return bool(t.item())


def all_gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """``obj`` from every rank, indexed by rank (single-process: ``[obj]``).

    Objects go through ``torch.save`` bytes: in torch 2.13 ``all_gather_object`` cannot unpickle an
    object holding tensors ("UntypedStorage has no attribute 'dtype'"), while bytes travel fine.
    """
    if not env.is_distributed:
        return [obj]
    buf = io.BytesIO()
    torch.save(obj, buf)
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, buf.getvalue(), group=env.control)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in out]


def mean_across_ranks(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``values`` over ranks (for logging the global loss, not rank 0's)."""
    if not env.is_distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


def run_torchrun(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a ``torchrun`` command line in its own process group and return (exit code, stderr).

    Its own group so that a hang past ``timeout_s`` kills the workers too, not only torchrun (which
    would leave them holding their ports); the ``TimeoutExpired`` is re-raised after the kill.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stderr
