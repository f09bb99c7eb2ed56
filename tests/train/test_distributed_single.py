"""distributed.py outside torchrun: every helper degrades to the single-process no-op."""

import pytest
import torch
import torch.distributed as dist
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


@pytest.fixture
def one_rank_env():
    """A real one-rank gloo group that ``shutdown`` owns (in-memory store: no port to pick)."""
    D.init_process_group("gloo", 60.0, store=dist.HashStore(), rank=0, world_size=1)
    yield D.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=True,
                    control=dist.group.WORLD)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_shutdown_barriers_on_a_clean_exit_and_not_while_an_exception_propagates(one_rank_env, monkeypatch):
    barriers = []
    monkeypatch.setattr(D.dist, "barrier", lambda *a, **k: barriers.append(1))
    with pytest.raises(ValueError, match="rank failed"):
        try:
            raise ValueError("rank failed")
        finally:
            D.shutdown(one_rank_env)  # a peer may be inside another collective: no barrier
    assert barriers == [] and not dist.is_initialized()
    D.init_process_group("gloo", 60.0, store=dist.HashStore(), rank=0, world_size=1)
    D.shutdown(one_rank_env)
    assert barriers == [1] and not dist.is_initialized()
