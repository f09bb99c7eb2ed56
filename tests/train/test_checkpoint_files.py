"""Checkpoint files: atomic write, temp files ignored, truncation detected, pruning, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from feedrank.train.checkpoint import (
    CheckpointError,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)


def _payload(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((3,), float(step))}, "optimizer": {}}


def test_save_then_load_round_trips_and_leaves_no_temp_file(tmp_path):
    path = checkpoint_path(tmp_path / "ck", 7)
    save_checkpoint(path, _payload(7))
    assert path.name == "ckpt_000000007.pt"
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 7.0))


def test_leftover_temp_file_is_ignored_and_pruned(tmp_path):
    save_checkpoint(checkpoint_path(tmp_path, 2), _payload(2))
    leftover = tmp_path / ".ckpt_000000004.pt.123.abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)
    prune_checkpoints(tmp_path, keep=5)
    assert not leftover.exists()


def test_latest_orders_by_step_not_by_name_or_mtime(tmp_path):
    for step in (30, 4, 100):
        save_checkpoint(checkpoint_path(tmp_path, step), _payload(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_000000004.pt", "ckpt_000000030.pt", "ckpt_000000100.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt_000000100.pt"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_prune_keeps_newest_n(tmp_path):
    for step in range(1, 6):
        save_checkpoint(checkpoint_path(tmp_path, step), _payload(step))
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000004.pt", "ckpt_000000005.pt"]


def test_truncated_checkpoint_raises_clear_error(tmp_path):
    path = checkpoint_path(tmp_path, 3)
    save_checkpoint(path, _payload(3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ckpt_000000003\.pt is corrupt or truncated"):
        load_checkpoint(path)


def test_foreign_file_and_missing_file_are_rejected(tmp_path):
    path = tmp_path / "ckpt_000000001.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"not a feedrank checkpoint: missing \['model', 'optimizer', 'step'\]"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_failed_write_keeps_previous_checkpoint_and_no_temp(tmp_path):
    good = checkpoint_path(tmp_path, 1)
    save_checkpoint(good, _payload(1))
    with pytest.raises(Exception):
        save_checkpoint(checkpoint_path(tmp_path, 2), {"step": 2, "model": lambda: None, "optimizer": {}})
    assert list_checkpoints(tmp_path) == [good]
    assert not list(tmp_path.glob(".*.tmp"))


def test_rng_state_survives_save_and_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    save_checkpoint(checkpoint_path(tmp_path, 1), {"step": 1, "model": {}, "optimizer": {}, "rng": state})
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(load_checkpoint(checkpoint_path(tmp_path, 1))["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])
