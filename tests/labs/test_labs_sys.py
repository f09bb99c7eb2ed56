"""The compile, ddp and profile labs: from-scratch DDP against DDP under torchrun, bucketing,
accumulation, the profile diagnosis on hand-built profiles, and each lab's result.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig
from feedrank.labs import compile as compile_lab
from feedrank.labs import ddp as ddp_lab
from feedrank.labs import profile as profile_lab
from feedrank.labs.base import LabContext
from feedrank.labs.ddp_scratch import ScratchDDP, assign_buckets, overlap_share
from feedrank.labs.profile import (
    Span,
    diagnose_requests,
    diagnose_steps,
    self_times,
    stage_breakdown,
    sync_callers,
    union_length,
)
from feedrank.train.distributed import init_process_group


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labs_sys") / "log"
    simulate(WorldConfig(users=300, items=150, days=4, seed=1), path, progress=False)
    return path


def tiny_ctx(tmp_path: Path, tiny_log: Path, name: str) -> LabContext:
    return LabContext(root=tmp_path / "labs", name=name, log=tiny_log, quick=True)


# ------------------------------------------------------------------------------------------- ddp


def test_buckets_are_reverse_order_and_close_at_the_cap():
    assert assign_buckets([400, 400, 400, 400], 800) == [[3, 2], [1, 0]]
    assert assign_buckets([400, 400, 400, 400], 10**9) == [[3, 2, 1, 0]]
    assert assign_buckets([100, 5000, 100], 1000) == [[2, 1], [0]]  # a big parameter closes its bucket
    assert assign_buckets([4, 4, 4], 1) == [[2], [1], [0]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        assign_buckets([4], 0)


def test_overlap_share_counts_communication_before_backward_ended():
    assert overlap_share([(0.0, 2.0), (3.0, 5.0)], backward_end=4.0) == pytest.approx(0.75)
    assert overlap_share([(5.0, 6.0)], backward_end=4.0) == 0.0
    assert overlap_share([], backward_end=1.0) == 0.0


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank, so the wrapper's hooks and all-reduces run in-process
    (an in-memory store: no port to pick, so none another process can take first)."""
    init_process_group("gloo", 60.0, store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_scratch_ddp_launches_one_all_reduce_per_bucket_and_none_under_no_sync(one_rank_group):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # params of 512, 64, 256, 16 bytes
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    cap = 50  # -> buckets [bias2, weight2], [bias1], [weight1]
    wrapped = ScratchDDP(model, bucket_bytes=cap)
    assert [[id(p) for p in b.params] for b in wrapped.buckets] == \
        [[id(list(model.parameters())[i]) for i in idx] for idx in assign_buckets(sizes, cap)]
    x = torch.randn(5, 8)
    with wrapped.no_sync():
        wrapped(x).sum().backward()
    assert wrapped.stats.all_reduce_calls == 0
    local = [p.grad.clone() for p in model.parameters()]
    wrapped(x).sum().backward()  # accumulates onto the no_sync gradients, then all-reduces
    assert wrapped.stats.all_reduce_calls == len(assign_buckets(sizes, cap)) == 3
    for p, g in zip(model.parameters(), local):
        torch.testing.assert_close(p.grad, 2 * g)  # one rank: the average is the local sum of both passes


GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
_WORKER_EXIT = """
import os
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from feedrank.labs import ddp_worker as W  # the worker's imports come before its group, as in its main()
from feedrank.train.distributed import DistEnv
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=True,
              control=dist.group.WORLD)
model = DistributedDataParallel(nn.Linear(4, 2))  # DDP's first use imports what held the group
model(torch.randn(3, 4)).sum().backward()
del model
W.shutdown(env)
del env  # its control group is the default group: the worker's last reference, gone as main() returns
print(",".join(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
def test_ddp_worker_leaves_no_gloo_thread_running_into_interpreter_exit():
    """On main 2b65266 the worker's group outlived ``destroy_process_group`` (the defaults of
    ``torch.distributed.nn.functional``, first imported by DDP, held it): its gloo threads ran
    into interpreter teardown. A fresh process: that module is imported once per process."""
    src = Path(ddp_lab.__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", _WORKER_EXIT], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert not [name for name in out.split(",") if name in GLOO_THREADS], out


@pytest.mark.slow  # two torchrun workers start in ~10 s
def test_scratch_ddp_ends_with_ddps_parameters_under_torchrun(tmp_path, tiny_log):
    ctx = tiny_ctx(tmp_path, tiny_log, "ddp")
    caps = (4096, 10**9)
    args = ddp_lab.WorkerArgs(steps=3, accum=2, batch_size=128, bucket_bytes=caps, warmup=1, timed=2,
                              parts=("equality", "sweep"))
    found = ddp_lab.launch(ctx, args, tmp_path / "worker.json", save_params=tmp_path, timeout_s=240)
    final = {(kind, rank): torch.load(tmp_path / f"final_{kind}_rank{rank}.pt")
             for kind in ("scratch", "ddp") for rank in (0, 1)}
    start = ctx.two_tower().state_dict()
    for name, want in final["ddp", 0].items():
        torch.testing.assert_close(final["scratch", 0][name], want, rtol=0, atol=1e-6, msg=name)
        assert torch.equal(final["scratch", 0][name], final["scratch", 1][name]), f"ranks diverged on {name}"
        assert torch.equal(final["ddp", 0][name], final["ddp", 1][name]), name
    assert any(not torch.equal(start[k], final["ddp", 0][k]) for k in start)  # training moved the weights
    nbytes = [p.numel() * p.element_size() for p in ctx.two_tower().parameters()]
    for row, cap in zip(found["sweep"], caps):
        assert row["all_reduce_calls_per_step"] == row["buckets"] == len(assign_buckets(nbytes, cap))
    assert found["sweep"][-1]["buckets"] == 1


def test_accumulation_is_exact_for_bce_and_not_for_in_batch_softmax(tmp_path, tiny_log):
    ctx = tiny_ctx(tmp_path, tiny_log, "ddp")
    bce = ddp_lab.accumulation_error(ctx, "bce", k=4, b=8)
    assert bce["max_abs_diff"] <= 1e-6
    softmax = ddp_lab.accumulation_error(ctx, "in_batch", k=4, b=8)
    assert softmax["relative_l2"] > 1e-3  # fewer negatives per micro-batch: a different gradient


# --------------------------------------------------------------------------------------- profile

LOADER = "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__"


def test_union_and_self_times():
    assert union_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert union_length([]) == 0
    spans = [Span("outer", 0, 10), Span("a", 1, 4), Span("b", 5, 9), Span("b_child", 6, 7), Span("x", 0, 3, thread=2)]
    assert self_times(spans) == {"outer": 3, "a": 3, "b": 3, "b_child": 1, "x": 3}


def test_diagnose_steps_finds_loader_wait_syncs_and_top_op():
    spans = []
    for i in range(2):  # two steps of 100 us: 40 waiting on the loader, one sync, mm dominates
        t = 100 * i
        spans += [Span("ProfilerStep#%d" % i, t, t + 100), Span(LOADER, t, t + 40), Span("aten::mm", t + 45, t + 90),
                  Span("aten::item", t + 92, t + 95), Span("aten::_local_scalar_dense", t + 93, t + 94)]
    spans.append(Span("aten::_local_scalar_dense", 500, 501))  # outside every step: not counted
    d = diagnose_steps(spans)
    assert (d.steps, d.step_ms, d.syncs_per_step, d.top_op) == (2, 0.1, 1, "aten::mm")
    assert d.data_wait_share == pytest.approx(0.4)
    assert d.top_op_share == pytest.approx(0.45)
    assert any("input-bound" in f for f in d.findings)
    assert any("1 host-device syncs" in f for f in d.findings)
    clean = diagnose_steps([Span("ProfilerStep*", 0, 100)] + [Span(f"aten::op{i}", 10 * i, 10 * i + 5) for i in range(10)])
    assert clean.syncs_per_step == 0 and clean.data_wait_share == 0
    assert clean.findings == ["no single bottleneck: time is spread over many small ops (launch-bound)"]
    with pytest.raises(ValueError, match="ProfilerStep"):
        diagnose_steps([Span("aten::mm", 0, 1)])


def test_diagnose_requests_measures_time_outside_torch_ops():
    spans = [Span("feed", 0, 100), Span("aten::linear", 10, 30), Span("aten::addmm", 12, 28), Span("aten::mul", 25, 35),
             Span("feed", 200, 300), Span("aten::mm", 250, 260), Span("aten::mm", 400, 450)]
    d = diagnose_requests(spans)
    assert d.requests == 2
    assert d.torch_share == pytest.approx((25 + 10) / 200)
    assert d.outside_share == pytest.approx(1 - 35 / 200)
    assert "outside torch ops" in d.findings[0]
    with pytest.raises(ValueError, match="feed"):
        diagnose_requests([Span("aten::mm", 0, 1)])


def test_sync_callers_name_the_op_around_each_item():
    from types import SimpleNamespace as Ev

    step = Ev(name="ProfilerStep*", cpu_parent=None)
    adam = Ev(name="aten::_fused_adamw_", cpu_parent=step)
    nonzero = Ev(name="aten::is_nonzero", cpu_parent=step)
    events = [Ev(name="aten::item", cpu_parent=adam)] * 4 + [Ev(name="aten::item", cpu_parent=step)] * 2 + \
        [Ev(name="aten::item", cpu_parent=nonzero), Ev(name="aten::mm", cpu_parent=step)]
    assert sync_callers(events, steps=2) == [["aten::_fused_adamw_", 2.0], ["Python", 1.5]]


def test_stage_breakdown_takes_direct_children_of_the_request_function():
    spans = [Span("feedrank/serving/pipeline.py(1): feed", 0, 100),
             Span("feedrank/serving/pipeline.py(2): _scores", 10, 60), Span("feedrank/models/x.py(3): inner", 20, 50),
             Span("aten::addmm", 20, 40), Span("feedrank/serving/pipeline.py(4): _rerank", 70, 80)]
    rows = stage_breakdown(spans, "): feed")
    assert rows[0][0] == "serving/pipeline.py(2): _scores" and rows[0][1:3] == [1, 0.05]
    assert rows[0][3] == pytest.approx(0.4)
    assert [r[0] for r in rows] == ["serving/pipeline.py(2): _scores", "serving/pipeline.py(4): _rerank"]


# ------------------------------------------------------------------------------ result.json schemas


def check_result(ctx: LabContext, name: str, figure_keys: set[str]) -> dict:
    raw = json.loads((ctx.out / "result.json").read_text())
    assert raw["name"] == name and raw["quick"] is True and raw["summary"]
    assert {"name", "title", "summary", "tables", "plots", "figures", "device", "quick"} <= set(raw)
    for table in raw["tables"]:
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"]), table["title"]
    for plot in raw["plots"]:
        assert (ctx.out / plot).read_bytes()[:4] == b"\x89PNG"
    assert figure_keys <= set(raw["figures"])
    return raw


@pytest.mark.slow  # inductor compiles the serving forward (~5-15 s on 2 cores)
def test_compile_lab_quick_result(tmp_path, tiny_log):
    ctx = tiny_ctx(tmp_path, tiny_log, "compile")
    compile_lab.run(ctx)
    raw = check_result(ctx, "compile", {"graphs", "graph_breaks", "modes", "variable_lengths", "backend"})
    lengths = {r["strategy"]: r for r in raw["figures"]["variable_lengths"]}
    static, dynamic = lengths["dynamic=False"], lengths["dynamic=True"]
    assert static["compiles"] > dynamic["compiles"]  # a static graph per length vs a symbolic length
    assert {m["mode"] for m in raw["figures"]["modes"]} == {"eager", "default"}


@pytest.mark.slow  # torchrun
def test_ddp_lab_quick_result(tmp_path, tiny_log):
    ctx = tiny_ctx(tmp_path, tiny_log, "ddp")
    ddp_lab.run(ctx)
    raw = check_result(ctx, "ddp", {"equality", "sweep", "accumulation", "trace"})
    assert raw["figures"]["equality"]["max_abs_diff_scratch_vs_ddp"] <= 1e-6
    assert json.loads((ctx.out / "ddp_trace_rank0.json").read_text())["traceEvents"]


@pytest.mark.slow  # trains a few steps and serves 30 requests
def test_profile_lab_quick_result(tmp_path, tiny_log):
    ctx = tiny_ctx(tmp_path, tiny_log, "profile")
    profile_lab.run(ctx)
    raw = check_result(ctx, "profile", {"train", "feed", "feed_stages", "traces"})
    assert raw["figures"]["traces"] == ["feed_trace.json", "trainer_trace.json"]
    assert list((ctx.out / "tb_trainer").glob("*.pt.trace.json.gz"))
    assert json.loads((ctx.out / "feed_trace.json").read_text())["traceEvents"]
    assert raw["figures"]["train"]["steps"] == 6
    # feedrank's own step reads nothing back (tests/train/test_host_syncs.py counts it too); only torch's AdamW does
    assert raw["figures"]["train_syncs_in_feedrank_code"] == 0
