"""SIGTERM on a real training process: checkpoint, distinct exit status, exact resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from feedrank.train import PREEMPTED_EXIT_CODE, latest_checkpoint, load_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
ARGS = ["--steps", "16", "--dropout", "0.3", "--micro", "8", "--shards", "1", "--accum", "2"]
HOLD = 3  # the victim waits for SIGTERM after this many steps, so the signal always lands mid-run
# Deadlines only bound a failure: each Python process imports torch (tens of seconds when loaded).
DEADLINE_S = 300


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three Python processes importing torch
def test_sigterm_checkpoints_then_resume_matches_uninterrupted(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    reference = subprocess.Popen([sys.executable, str(WORKER), "--out", str(ref), *ARGS])
    victim = subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), "--hold-at", str(HOLD), *ARGS])
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ((out / "metrics.jsonl").is_file() and len(_losses(out)) >= HOLD):
            assert victim.poll() is None and time.monotonic() < deadline, f"worker ended or never logged {HOLD} steps"
            time.sleep(0.05)
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(timeout=DEADLINE_S) == PREEMPTED_EXIT_CODE
        assert reference.wait(timeout=DEADLINE_S) == 0
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                proc.kill()

    stopped_at = load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"]
    assert stopped_at == HOLD + 1  # the step under way when the signal came, then a checkpoint
    assert len(_losses(out)) == stopped_at

    resumed = subprocess.run([sys.executable, str(WORKER), "--out", str(out), *ARGS], timeout=DEADLINE_S)
    assert resumed.returncode == 0
    assert _losses(out) == _losses(ref)
    want, got = torch.load(ref / "final_rank0.pt"), torch.load(out / "final_rank0.pt")
    for name in want:
        assert torch.equal(want[name], got[name]), name
