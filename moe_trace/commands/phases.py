"""``moe-trace phases TRACE``: per MoE layer, the step from which the stable phase holds."""

from __future__ import annotations

import argparse

from moe_trace.commands._common import add_trace_argument, defaults_of, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from predictors.phases import stable_from

    defaults = defaults_of(stable_from)
    parser = subparsers.add_parser(
        "phases", help="find where each layer's stable phase starts",
        description="Per MoE layer, the first step of the stable phase (loads stay put up to noise), or "
                    "none. Rule: block means, their movement over lag blocks in units of the noise, PELT "
                    "change points, trailing quiet segments (see predictors/phases.py).")
    add_trace_argument(parser)
    parser.add_argument("--block", type=int, default=defaults["block"], help="steps per block (default: %(default)s)")
    parser.add_argument("--lag", type=int, default=defaults["lag"],
                        help="blocks between the compared means (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=defaults["threshold"],
                        help="quiet if movement < threshold x noise (default: %(default)s)")
    parser.add_argument("--penalty", type=float, default=defaults["penalty"],
                        help="PELT penalty in units of sigma^2 log n (default: %(default)s)")
    parser.add_argument("--min-stable", type=int, default=defaults["min_stable"],
                        help="shortest stable phase reported, steps (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="write [{layer, block, stable_from}] as JSON ('-': stdout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace import trace
    from moe_trace.errors import UsageError
    from predictors.phases import stable_from

    if min(args.block, args.lag, args.min_stable) < 1:
        raise UsageError("--block, --lag and --min-stable must be >= 1")
    loaded = trace.load(args.trace)
    starts = stable_from(loaded.proportions(), block=args.block, lag=args.lag, threshold=args.threshold,
                         penalty=args.penalty, min_stable=args.min_stable)
    records = [{"layer": i, "block": block, "stable_from": None if s is None else int(loaded.steps[s])}
               for i, (block, s) in enumerate(zip(loaded.layers, starts, strict=True))]
    if args.json != "-":
        print(f"{len(loaded)} steps; stable phase from (per MoE layer):")
        for r in records:
            print(f"  layer {r['layer']} (block {r['block']}): "
                  f"{'never' if r['stable_from'] is None else r['stable_from']}")
    write_json(args.json, records)
    return 0
