"""Speed of the placement planner and the trace-replay simulator (issue 6), with the replay's results.

Goals on 2 CPU cores: planning 61 layers x 256 experts on 1024 GPUs with one redundant slot per GPU in well
under a second; replaying a 20000-step x 12-layer x 128-expert trace under every policy in under a minute
per policy set (one cluster size). The trace is synthetic, shaped like gpt-350m-moe (256 x 2048 tokens per
step, top-1) with a transient phase that ends at ``--switch``; each policy set's records (DESIGN.md's
simulate JSON, with per-phase figures) are saved beside the timings.

A ``--switch`` at or beyond ``--steps`` gives a trace whose load drifts to the end and never settles, as 4 of
the 12 layers of traces/gpt-350m-moe do: the ``phase`` policy then checks its plan every 25 steps throughout,
its slowest case. The recorded results:

    python benchmarks/placement_speed.py                                   # placement_speed.json
    python benchmarks/placement_speed.py --concentration 1 --out benchmarks/results/placement_speed_skewed.json
    python benchmarks/placement_speed.py --switch 20000 --out benchmarks/results/placement_speed_drifting.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np


def time_planning(layers: int, experts: int, gpus: int, redundant: int, repeats: int = 5) -> dict:
    from placement import planners

    loads = np.random.default_rng(0).dirichlet(np.full(experts, 1.0), size=layers)
    result = {"layers": layers, "experts": experts, "gpus": gpus, "redundant": redundant}
    for method in ("contiguous", "greedy", "eplb"):
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            planners.plan(loads, gpus, redundant=redundant, method=method)
            seconds.append(time.perf_counter() - start)
        result[f"{method}_s"] = float(np.median(seconds))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--switch", type=int, default=5000,
                        help="first step of the synthetic stable phase (>= --steps: the load never settles)")
    parser.add_argument("--concentration", type=float, default=5.0, help="Dirichlet skew of the mean load")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", default="benchmarks/results/placement_speed.json")
    args = parser.parse_args()

    import scipy

    from moe_trace import synth
    from placement import policies, simulator
    from placement.cost import CostModel

    planning = time_planning(61, 256, 1024, 1024)
    print("planning 61 x 256 on 1024 GPUs: " + ", ".join(f"{k} {v:.3f}s" for k, v in planning.items()
                                                          if k.endswith("_s")))

    counts, meta = synth.generate(layers=args.layers, experts=args.experts, steps=args.steps,
                                  tokens_per_step=256 * 2048, seq_len=2048, switch_step=args.switch,
                                  concentration=args.concentration, seed=0)
    cost = CostModel.from_meta(meta)
    stable_from = args.switch if args.switch < args.steps else None
    runs = []
    for gpus in args.gpus:
        setting = policies.Setting(gpus=gpus, redundant=gpus, cost=cost)
        wall_s, cpu_s = {}, {}  # CPU time too: on a shared machine wall time counts other processes' load
        records = []
        for policy in policies.get("all"):
            wall, cpu = time.perf_counter(), time.process_time()
            records += simulator.simulate(counts, [policy], setting, stable_from=stable_from)
            wall_s[policy.name], cpu_s[policy.name] = time.perf_counter() - wall, time.process_time() - cpu
        simulator.relative_to_static(records)
        print(simulator.format_table(records, setting, stable_from))
        print(f"replay of {args.steps} steps on {gpus} GPUs, all policies: {sum(wall_s.values()):.1f}s wall, "
              f"{sum(cpu_s.values()):.1f}s CPU; " + ", ".join(f"{k} {v:.1f}s" for k, v in wall_s.items()))
        runs.append({"gpus": gpus, "redundant": gpus, "policy_set_wall_s": sum(wall_s.values()),
                     "policy_set_cpu_s": sum(cpu_s.values()), "per_policy_wall_s": wall_s, "per_policy_cpu_s": cpu_s,
                     "records": records})

    result = {
        "benchmark": "placement_speed",
        "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "load_average_1m": os.getloadavg()[0]},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__},
        "planning_61x256_on_1024_gpus": planning,
        "trace": {"steps": args.steps, "layers": args.layers, "experts": args.experts, "switch_step": args.switch,
                  "stable_from": stable_from,
                  "concentration": args.concentration, "tokens_per_step": 256 * 2048, "seed": 0},
        "cost_model": {k: v for k, v in vars(cost).items()},
        "replay": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
