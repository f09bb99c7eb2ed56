"""Throughput cost of the shared Trainer over a bare hand-written loop on the same model and data.

The bare loop is the floor: forward, backward, fused AdamW step, nothing else. The Trainer adds
the per-step work it needs for its features (lr update, grad-norm clipping, device move, the
non-finite flag, the SIGTERM flag check, metrics every ``log_every`` steps, one checkpoint at the
end). Prints steps/s for both and the ratio; also writes the figures as JSON.

    python benchmarks/trainer_overhead.py --steps 300 --width 256 --batch 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch import nn

from feedrank.config import from_dict
from feedrank.train import Trainer, TrainConfig


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    return nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"]), {}


def make_batches(n: int, batch: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(batch, 64, generator=g), "y": torch.randn(batch, generator=g)} for _ in range(n)]


def bare_loop(model: nn.Module, batches: list, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    start = time.perf_counter()
    for batch in batches:
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_loop(model: nn.Module, batches: list, lr: float, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = from_dict(TrainConfig, {"steps": len(batches), "lr": lr, "log_every": log_every, "device": "cpu",
                                      "progress": False, "out_dir": out})
        with Trainer(model, loss_fn, cfg) as trainer:
            start = time.perf_counter()
            trainer.fit(lambda epoch: batches)
            return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    batches = make_batches(args.steps, args.batch)
    bare_times, our_times = [], []
    for _ in range(args.repeats):  # interleaved, best of N: other load on the machine hits both alike
        bare_times.append(bare_loop(make_model(args.width), batches, 1e-3))
        our_times.append(trainer_loop(make_model(args.width), batches, 1e-3, args.log_every))
    bare, ours = min(bare_times), min(our_times)
    result = {
        "steps": args.steps, "width": args.width, "batch": args.batch, "threads": torch.get_num_threads(),
        "bare_steps_per_s": args.steps / bare, "trainer_steps_per_s": args.steps / ours,
        "trainer_over_bare_time": ours / bare,
    }
    print(f"bare loop   : {result['bare_steps_per_s']:8.1f} steps/s")
    print(f"Trainer.fit : {result['trainer_steps_per_s']:8.1f} steps/s (incl. final checkpoint)")
    print(f"time ratio  : {result['trainer_over_bare_time']:.3f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
