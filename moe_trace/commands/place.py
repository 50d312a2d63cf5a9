"""``moe-trace place TRACE --gpus G --at STEP``: the expert placement a planner picks for one step."""

from __future__ import annotations

import argparse

from moe_trace.commands.simulate import HELP_COST, add_cluster_arguments, make_setting


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "place", help="print the expert placement planned for one step",
        description="Plan expert placement for step STEP from the mean load of the WINDOW steps before it "
                    "(as EPLB does) and print, per layer and GPU, the experts hosted (* = replicated), with "
                    "the imbalance those steps would have had under the plan and under the static one.",
        epilog=HELP_COST)
    add_cluster_arguments(p)
    p.add_argument("--at", type=int, required=True, help="trace step the plan is for")
    p.add_argument("--window", type=int, default=1000, help="steps of history to plan from (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from moe_trace import trace
    from moe_trace.commands._common import write_json
    from moe_trace.errors import UsageError
    from placement.dispatch import gpu_tokens, imbalance

    loaded = trace.load(args.trace)
    setting = make_setting(loaded.meta, args)
    at = int(np.searchsorted(loaded.steps, args.at))
    if not 0 < at < len(loaded) or loaded.steps[at] != args.at:
        raise UsageError(f"--at {args.at} must be a recorded step after the first "
                         f"({int(loaded.steps[0])} < STEP <= {int(loaded.steps[-1])})")
    if args.window < 1:
        raise UsageError(f"--window must be >= 1, got {args.window}")
    history = slice(max(0, at - args.window), at)
    plan = setting.plan(loaded.proportions()[history].mean(axis=0))
    static = setting.initial(*loaded.counts.shape[1:])
    imb = {name: imbalance(gpu_tokens(loaded.counts[history], p, setting.dispatch)).mean(axis=0)
           for name, p in (("plan", plan), ("static", static))}

    blocks = plan.slot_expert.reshape(len(loaded.layers), setting.gpus, -1)
    layers = []
    for li, block_index in enumerate(loaded.layers):
        gpus = [[int(e) for e in slots if e >= 0] for slots in blocks[li]]
        layers.append({"layer": block_index, "gpus": gpus, "replicas": plan.replicas[li].tolist(),
                       "history_imbalance": float(imb["plan"][li]), "static_imbalance": float(imb["static"][li])})
        if args.json != "-":
            print(f"layer {block_index}: mean imbalance over steps {int(loaded.steps[history][0])}.."
                  f"{int(loaded.steps[at - 1])}: {imb['plan'][li]:.3f} planned, {imb['static'][li]:.3f} static")
            for g, experts in enumerate(gpus):
                marked = " ".join(f"{e}{'*' if plan.replicas[li, e] > 1 else ''}" for e in experts)
                print(f"  gpu {g:>4}: {marked}")
    write_json(args.json, {"step": args.at, "gpus": setting.gpus, "redundant": setting.redundant,
                           "slots_per_gpu": plan.slots_per_gpu, "planner": setting.planner,
                           "window": args.window, "layers": layers})
    return 0
