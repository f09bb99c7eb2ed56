"""Two gloo ranks under torchrun: gradients are averaged, ranks stay identical, and the result
equals one process training on the union of both ranks' data (the same global batch)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from feedrank.config import from_dict
from feedrank.train import Trainer, TrainConfig
from feedrank.train.distributed import run_torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")
_spec = importlib.util.spec_from_file_location("train_toy_dist", WORKER)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

STEPS, MICRO, ACCUM = 6, 4, 2
# Deadlines only bound a failure (a hang): two workers importing torch on a loaded 2-core machine
# can take minutes.
DEADLINE_S = 300


def _single_process_union(out: Path) -> tuple[dict, list[float]]:
    cfg = from_dict(TrainConfig, {"steps": STEPS, "lr": 0.05, "warmup_steps": 2, "grad_accum_steps": ACCUM,
                                  "log_every": 1, "device": "cpu", "progress": False, "out_dir": str(out)})
    model = toy.TinyMLP()
    with Trainer(model, toy.mse_loss, cfg) as trainer:
        trainer.fit(toy.make_data(MICRO, shards=2))  # one process, 2 * MICRO rows per micro-batch
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return model.state_dict(), losses


@pytest.mark.slow  # two torchrun workers start in ~5-10 s
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_single_process_on_the_union(tmp_path, strategy):
    out = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--out", str(out), "--steps", str(STEPS), "--micro", str(MICRO), "--shards", "2",
           "--accum", str(ACCUM), "--strategy", strategy]
    returncode, stderr = run_torchrun(cmd, timeout_s=DEADLINE_S)
    assert returncode == 0, stderr[-3000:]

    rank0, rank1 = torch.load(out / "final_rank0.pt"), torch.load(out / "final_rank1.pt")
    want, want_losses = _single_process_union(tmp_path / "single")
    assert set(rank0) == set(want)
    for name in want:
        assert torch.equal(rank0[name], rank1[name]), f"ranks diverged on {name}"
        torch.testing.assert_close(rank0[name], want[name], rtol=0, atol=1e-6, msg=name)
    # Rank 0 logs the loss averaged over ranks: the union's loss, not its own shard's.
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(want_losses, abs=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"ckpt_{STEPS:09d}.pt"]


@pytest.mark.slow  # three torchrun launches
def test_sigterm_to_torchrun_checkpoints_all_ranks_and_resumes_exactly(tmp_path):
    """torchrun forwards SIGTERM to both workers; they agree on the stop step (no hang), rank 0
    checkpoints, and a relaunch continues to the same weights as an uninterrupted run (dropout on).

    Each rank waits for the signal after ``hold`` steps (``ddp_worker.hold_at``), so the signal
    always lands mid-run whatever the machine's load."""
    args, hold = ["--steps", "12", "--dropout", "0.2", "--micro", str(MICRO), "--shards", "2"], 2
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    ref, out = tmp_path / "ref", tmp_path / "killed"

    victim = subprocess.Popen([*launch, "--out", str(out), "--hold-at", str(hold), *args],
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= hold):
            assert victim.poll() is None and time.monotonic() < deadline, "torchrun ended or never logged"
            time.sleep(0.1)
        victim.send_signal(signal.SIGTERM)  # to torchrun only, as a scheduler would
        assert victim.wait(timeout=DEADLINE_S) != 0  # torchrun reports the signal itself, not the workers' 75
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    [checkpoint] = (out / "checkpoints").iterdir()
    assert int(checkpoint.stem.split("_")[1]) == hold + 1  # both ranks stopped after the step under way

    for run_dir in (out, ref):
        returncode, stderr = run_torchrun([*launch, "--out", str(run_dir), *args], timeout_s=DEADLINE_S)
        assert returncode == 0, stderr[-3000:]
    want, got = torch.load(ref / "final_rank0.pt"), torch.load(out / "final_rank1.pt")
    for name in want:
        assert torch.equal(want[name], got[name]), name
