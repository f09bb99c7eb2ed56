"""Simulated A/B tests on the demo world: one experiment, the A/A false-positive rate, and power.

Steps (each reused when its output exists under --out):

1. simulate the world (``--world-config``, default configs/world_demo.yaml);
2. train the two-tower (``--train-config``, default configs/demo.yaml) and save an untrained twin
   (same config and vocabularies, seeded random weights): the "worse" arm;
3. one full experiment, untrained (control) vs trained (treatment), through ``simulate_ab``:
   requests per second and the readout;
4. ``serve_population``: every request of the population served once per model (untrained,
   trained, oracle, noisy oracle); the true CTR of each from the world's click probabilities;
5. A/A: ``--replicates`` re-randomised experiments on identical feeds (new salt, new outcome draws):
   the share significant at alpha, per metric;
6. power: for each better model, plan users per arm with ``feedrank.experiment.power`` from A/A
   variances and the true lift, then the share of replicates with that many users that detect it.

Prints figures and writes ``OUT/ab_simulation.json``. Example::

    python benchmarks/ab_simulation.py --out runs/ab_bench --users 3000 --days 2 --replicates 400
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feedrank.bundle import build_two_tower, load_bundle, save_bundle
from feedrank.config import load_yaml
from feedrank.data.log import read_events
from feedrank.data.simulate import simulate
from feedrank.data.world import WorldConfig, load_world
from feedrank.experiment.analyze import analyze
from feedrank.experiment.power import Design, MetricModel, estimate_from_users, power, sample_size
from feedrank.experiment.simulate_ab import ABSimConfig, replicate_users, serve_population, simulate_ab, true_ctr
from feedrank.train.retrieval import load_run_config, train_retrieval

PRE_COLUMNS = ["user_id", "clicked", "dwell_s", "hidden", "publisher"]
# Below this many users per arm a z-test's power is not what the normal approximation says.
MIN_USERS_PER_ARM = 30


def prepare(out: Path, world_config: Path, train_config: Path) -> tuple[Path, Path, Path]:
    world = out / "world"
    if not (world / "truth").exists():
        simulate(load_yaml(WorldConfig, world_config), world, overwrite=True)
    trained = out / "train" / "bundle"
    if not trained.exists():
        t = time.perf_counter()
        train_retrieval(world, out / "train", load_run_config(train_config), progress=False)
        print(f"trained the two-tower in {time.perf_counter() - t:.0f} s")
    untrained = out / "untrained"
    if not untrained.exists():
        bundle = load_bundle(trained)
        torch.manual_seed(0)
        model = build_two_tower(bundle.config, bundle.vocabs)
        save_bundle(untrained, kind="two_tower", model=model, config=bundle.config, vocabs=bundle.vocabs,
                    catalogue=bundle.catalogue)  # fmt: skip
    return world, trained, untrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ab_bench"))
    p.add_argument("--world-config", type=Path, default=Path("configs/world_demo.yaml"))
    p.add_argument("--train-config", type=Path, default=Path("configs/demo.yaml"))
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--days", type=int, default=2)
    p.add_argument("--replicates", type=int, default=400)
    p.add_argument("--oracle-noise", type=float, default=2.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines as they come, when piped to a file
    args.out.mkdir(parents=True, exist_ok=True)
    world_dir, trained, untrained = prepare(args.out, args.world_config, args.train_config)
    cfg = ABSimConfig(users=args.users, days=args.days, salt="bench", seed=0)
    report: dict = {"users": args.users, "days": args.days, "replicates": args.replicates}

    t = time.perf_counter()
    one = simulate_ab(world_dir, {"control": (untrained, None), "treatment": (trained, None)}, cfg)
    seconds = time.perf_counter() - t
    requests = sum(s.requests for s in one.arms.values())
    print(one.render_text())
    print(f"\none experiment: {requests:,} requests in {seconds:.1f} s ({requests / seconds:.0f} requests/s)\n")
    report["experiment"] = {"seconds": seconds, "requests": requests, "result": one.to_dict()}

    oracle = f"oracle:{args.oracle_noise:g}"
    t = time.perf_counter()
    served = serve_population(world_dir, {"untrained": (untrained, None), "trained": (trained, None),
                                          "oracle": "oracle", oracle: oracle}, cfg)  # fmt: skip
    print(f"served the population once per model in {time.perf_counter() - t:.1f} s")
    world = load_world(world_dir)
    truth = {name: true_ctr(world, s) for name, s in served.items()}
    print("true CTR: " + ", ".join(f"{n} {v:.5f} ({v / truth['untrained'] - 1:+.1%})" for n, v in truth.items()))
    report["true_ctr"] = truth
    pre = read_events(world_dir, columns=PRE_COLUMNS)
    exposed = len(np.unique(served["untrained"].requests.user_idx))

    t = time.perf_counter()
    same = {"control": served["untrained"], "treatment": served["untrained"]}
    hits = np.zeros(2)
    for r in range(args.replicates):
        table = replicate_users(world, same, f"aa-{r}", np.random.default_rng([1, r]), pre_events=pre)
        hits += [m.significant for m in analyze(table, ["control", "treatment"], guardrails=[]).metrics]
    fpr = hits / args.replicates
    se = np.sqrt(0.05 * 0.95 / args.replicates)
    print(f"\nA/A over {args.replicates} replicates ({exposed:,} exposed users, {time.perf_counter() - t:.1f} s): "
          f"false-positive rate ctr {fpr[0]:.3f}, time_spent {fpr[1]:.3f} (alpha 0.05, sampling se {se:.3f})")  # fmt: skip
    report["aa"] = {"ctr": fpr[0], "time_spent": fpr[1], "se": se, "exposed_users": exposed}

    def aa_model(name: str) -> MetricModel:
        same = {"c": served[name], "t": served[name]}
        return estimate_from_users(replicate_users(world, same, "plan", np.random.default_rng(0), pre_events=pre), "ctr")

    control = aa_model("untrained")
    report["power"] = {}
    for name in ("trained", oracle, "oracle"):
        lift = truth[name] / truth["untrained"] - 1
        if lift <= 0:
            print(f"{name}: true lift {lift:+.1%}, nothing to detect")
            continue
        metric = dataclasses.replace(control, sd_treatment=aa_model(name).sd)
        n = sample_size(metric, lift, Design(power=0.8)).n_control
        if n < MIN_USERS_PER_ARM:
            print(f"{name:>10}: true lift {lift:+.1%}; planned {n:,} users/arm for 80% power: too few for the "
                  "normal approximation the plan rests on, not replicated")  # fmt: skip
            report["power"][name] = {"lift": lift, "n_per_arm_for_80": n}
            continue
        users = min(2 * n, exposed)
        planned = power(metric, lift, users // 2)
        detected = 0
        for r in range(args.replicates):
            table = replicate_users(world, {"control": served["untrained"], "treatment": served[name]}, f"ab-{r}",
                                    np.random.default_rng([2, r]), users=users, pre_events=pre)  # fmt: skip
            ctr = analyze(table, ["control", "treatment"], metrics=["ctr"], guardrails=[]).metrics[0]
            detected += ctr.significant and ctr.rel_lift > 0
        rate, se = detected / args.replicates, np.sqrt(planned * (1 - planned) / args.replicates)
        print(f"{name:>10}: true lift {lift:+.1%}; planned {n:,} users/arm for 80% power; with {users:,} users: "
              f"planned power {planned:.3f}, detected {rate:.3f} (se {se:.3f})")  # fmt: skip
        report["power"][name] = {"lift": lift, "n_per_arm_for_80": n, "users": users, "planned": planned, "detected": rate}

    (args.out / "ab_simulation.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
