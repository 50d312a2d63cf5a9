"""``moe-trace simulate TRACE --gpus G``: replay a trace under placement policies and compare them."""

from __future__ import annotations

import argparse
from typing import Any

from moe_trace.commands._common import add_trace_argument, output_file, write_json

HELP_COST = ("--cost measured (the default once placement/calibration/h200.json ships) prices a layer's expert work "
             "and all-to-all from GPU measurements (benchmarks/expert_cost.py); --cost linear from a FLOP rate and a "
             "bandwidth; --cost FILE from another calibration. Overrides (defaults in placement/cost.py): "
             "--matmul-tflops achieved expert GEMM rate (linear model), --a2a-gbps all-to-all GB/s per GPU (linear "
             "model, and measured beyond one host), --link-gbps migration GB/s, --hidden model width")


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with ``moe-trace place``: the simulated cluster, the planner and the cost model."""
    add_trace_argument(p)
    p.add_argument("--gpus", type=int, required=True, help="simulated GPUs")
    p.add_argument("--redundant", type=int, default=None,
                   help="redundant expert slots over all GPUs; experts + redundant must be a multiple of --gpus "
                        "(default: one per GPU)")
    p.add_argument("--planner", default="eplb", choices=("eplb", "greedy", "contiguous"),
                   help="planner every re-plan uses (default: %(default)s)")
    p.add_argument("--dispatch", default="balanced", choices=("balanced", "even"),
                   help="how replicas split an expert's tokens (default: %(default)s)")
    p.add_argument("--cost", default=None, metavar="{measured,linear,FILE}",
                   help="cost model: measured (shipped GPU calibration), linear, or a calibration file "
                        "(default: measured where shipped, else linear)")
    p.add_argument("--matmul-tflops", type=float, default=None)
    p.add_argument("--a2a-gbps", type=float, default=None)
    p.add_argument("--link-gbps", type=float, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--json", default=None, type=output_file,
                   help="write the result as JSON to this file (- for stdout only)")


def default_redundant(gpus: int) -> int:
    """One spare expert slot per GPU; none on one GPU, where a second copy of an expert splits nothing."""
    return gpus if gpus > 1 else 0


def make_setting(meta: dict[str, Any], args: argparse.Namespace):
    """The :class:`placement.policies.Setting` the cluster options describe; bad values raise UsageError."""
    from moe_trace.errors import UsageError
    from moe_trace.memory import physical_memory_bytes
    from placement import calibration
    from placement.cost import CostModel
    from placement.planners import even_slots_per_gpu
    from placement.policies import Setting
    from placement.simulator import replay_bytes

    overrides = {"matmul_flops": args.matmul_tflops and args.matmul_tflops * 1e12,
                 "a2a_bandwidth": args.a2a_gbps and args.a2a_gbps * 1e9,
                 "link_bandwidth": args.link_gbps and args.link_gbps * 1e9, "hidden": args.hidden}
    if any(v is not None and v <= 0 for v in overrides.values()):
        raise UsageError("--matmul-tflops, --a2a-gbps, --link-gbps and --hidden must be > 0")
    redundant = default_redundant(args.gpus) if args.redundant is None else args.redundant
    slots = even_slots_per_gpu(int(meta["num_experts"]), args.gpus, redundant)  # the copies must fill the GPUs evenly
    needed, available = replay_bytes(len(meta["moe_layers"]), args.gpus, slots), physical_memory_bytes()
    if needed > available:
        raise UsageError(f"--gpus {args.gpus}: replaying {args.gpus} GPUs x {slots} expert slots needs ~"
                         f"{needed / 2**30:.0f} GiB, more than this machine's {available / 2**30:.0f} GiB")
    cost = CostModel.from_meta(meta, calibration.resolve(args.cost), **overrides)
    return Setting(gpus=args.gpus, redundant=redundant, cost=cost,
                   planner=args.planner, dispatch=args.dispatch)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="replay a trace under expert placement policies",
        description="Replay a trace step by step under each placement policy on a simulated cluster; print "
                    "per policy the mean and p99 imbalance, migrations, bytes moved and estimated step time, "
                    "over the whole run and, when the run has a stable phase, per phase.", epilog=HELP_COST)
    add_cluster_arguments(p)
    p.add_argument("--policy", default="all",
                   help="comma list of static, history, predict, phase, oracle, or all (default: %(default)s)")
    p.add_argument("--replan-every", type=int, default=None,
                   help="steps between re-plans of history (1000), predict (50) and phase while loads move (25)")
    p.add_argument("--predictor", default=None,
                   help="predictor spec for 'predict' and the transient phase of 'phase' "
                        "(defaults: ema:halflife=50 and ema:halflife=25)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace import trace
    from placement import policies, simulator

    loaded = trace.load(args.trace)
    setting = make_setting(loaded.meta, args)
    chosen = policies.get(args.policy, replan_every=args.replan_every, predictor=args.predictor)
    stable_from = simulator.whole_model_stable_from(loaded.proportions())
    records = simulator.simulate(loaded.counts, chosen, setting, stable_from=stable_from)
    if args.json != "-":
        print(simulator.format_table(records, setting, stable_from))
    write_json(args.json, records)
    return 0
