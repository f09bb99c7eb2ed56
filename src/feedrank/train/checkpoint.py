"""Atomic training checkpoints: write, find, load, prune; capture and restore RNG state.

A checkpoint is one ``torch.save`` file ``<dir>/ckpt_<step>.pt`` holding a plain dict (model and
optimizer state, training position, RNG states, config). Three rules make it safe to kill a job at
any instant:

- **Atomic write.** Bytes go to a hidden temp file in the same directory, are fsync'ed, then
  ``os.replace``'d onto the final name (atomic on POSIX), then the directory is fsync'ed so the
  rename itself survives a power cut. A reader therefore sees either the old set of checkpoints or
  the new one, never a half-written ``ckpt_*.pt``.
- **Temp files are invisible.** ``list_checkpoints`` only matches ``ckpt_<digits>.pt``, so a
  leftover ``.ckpt_*.tmp`` from a killed writer is ignored (and removed by the next prune).
- **Corruption is loud.** A final-named file that does not load (truncated disk, copied half-way)
  raises ``CheckpointError`` naming the file; silently falling back to an older checkpoint would
  quietly repeat training and hide a storage problem.

Model/optimizer state goes through ``torch.distributed.checkpoint.state_dict`` so that the same
file format serves a plain module, DDP and FSDP (full, unsharded tensors keyed by parameter name):
a run may resume under a different strategy or world size.

Example::

    save_checkpoint(Path("runs/x/checkpoints/ckpt_000000100.pt"), {"step": 100, ...})
    path = latest_checkpoint(Path("runs/x/checkpoints"))       # .../ckpt_000000100.pt
    payload = load_checkpoint(path)                            # {"step": 100, ...}
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from feedrank.fsutil import staged_file

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read back."""


def checkpoint_path(directory: Path, step: int) -> Path:
    """The canonical file name for the checkpoint taken after optimizer step ``step``."""
    return directory / f"ckpt_{step:09d}.pt"


def sharded_dir(path: Path) -> Path:
    """Where the sharded state of checkpoint ``path`` lives (``embeddings: torchrec``): a DCP folder
    ``ckpt_<step>.dcp`` beside it, written first; the ``.pt`` file commits it."""
    return path.with_suffix(".dcp")


def load_model_state(path: Path) -> dict[str, Any]:
    """The model's full ``state_dict`` from checkpoint ``path``, plain or sharded."""
    payload = load_checkpoint(path)
    if payload.get("sharded"):
        from feedrank.train.sharding import load_full_model_state

        return load_full_model_state(path.parent / payload["sharded"])
    return payload["model"]


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + os.replace + dir fsync).

    The temp file is ``.<name>.<random>.tmp`` (``feedrank.fsutil.staged_file``), created with the
    process umask like any file, which ``prune_checkpoints`` recognises as a leftover.
    """
    with staged_file(path, durable=True) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on CPU. ``weights_only`` loading: a checkpoint can never run code."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/EOFError/UnpicklingError for bad bytes
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({path.stat().st_size} bytes): {exc}"
        ) from exc
    missing = {"step", "model", "optimizer"} - set(payload if isinstance(payload, dict) else ())
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a feedrank checkpoint: missing {sorted(missing)}")
    return payload


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files are not matched)."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None when there is none."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; also remove temp files left by killed writers.

    Only call this while no other process is writing into ``directory`` (the trainer calls it from
    rank 0 right after its own write), or a concurrent writer's temp file could be removed.
    """
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for tmp in directory.glob(".ckpt_*.tmp"):
        tmp.unlink(missing_ok=True)
    for shards in directory.glob("ckpt_*.dcp"):  # sharded state whose .pt is gone or was never written
        if not shards.with_suffix(".pt").is_file():
            shutil.rmtree(shards, ignore_errors=True)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state on CPU, keyed by parameter name.

    A collective under FSDP: every rank must call it; only rank 0 receives the tensors (the
    others get empty dicts), which is all the rank-0 writer needs.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def apply_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load full model/optimizer state (as written by ``gather_state``) into a possibly sharded model."""
    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``: after this, random draws continue exactly where they stopped."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
