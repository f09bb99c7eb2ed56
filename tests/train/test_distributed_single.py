"""distributed.py outside torchrun: every helper degrades to the single-process no-op."""

import pytest
import torch
from torch import nn

from feedrank.train import distributed as D


def test_single_process_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.is_distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")
    model = nn.Linear(2, 1)
    assert D.wrap_model(model, env, "ddp", 25.0) is model
    assert D.any_rank(env, True) is True and D.any_rank(env, False) is False
    assert D.all_gather_objects(env, {"a": 1}) == [{"a": 1}]
    values = torch.tensor([1.0, 2.0])
    assert D.mean_across_ranks(env, values) is values
    with D.gradient_sync(model, enabled=False):
        pass
    D.barrier(env)
    D.shutdown(env)  # did not create a group: nothing to destroy


def test_torchrun_detection(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not D.launched_by_torchrun()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.launched_by_torchrun()


def test_cuda_request_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="device 'cuda' requested"):
        D.resolve_device("cuda")
    assert D.resolve_device("auto") == torch.device("cpu")
