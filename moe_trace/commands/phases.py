"""``moe-trace phases TRACE``: per MoE layer, the step from which the stable phase holds."""

from __future__ import annotations

import argparse
import math
import sys

from moe_trace.commands._common import add_trace_argument, output_file, write_json


def register(subparsers: argparse._SubParsersAction) -> None:
    from predictors.phases import DEFAULTS, SHORT_TRACE

    parser = subparsers.add_parser(
        "phases", help="find where each layer's stable phase starts",
        description="Per MoE layer, the first step of the stable phase (loads stay put up to noise), or "
                    "none. Rule: block means, their movement over lag blocks in units of the noise, PELT "
                    "change points, trailing quiet segments (see predictors/phases.py).")
    add_trace_argument(parser)
    scaled = f", scaled down on traces shorter than {SHORT_TRACE} steps"
    parser.add_argument("--block", type=int, help=f"steps per block (default: {DEFAULTS['block']}{scaled})")
    parser.add_argument("--lag", type=int, help=f"blocks between the compared means (default: {DEFAULTS['lag']})")
    parser.add_argument("--threshold", type=float,
                        help=f"quiet if movement < threshold x noise (default: {DEFAULTS['threshold']})")
    parser.add_argument("--penalty", type=float,
                        help=f"PELT penalty in units of sigma^2 log n (default: {DEFAULTS['penalty']})")
    parser.add_argument("--min-stable", type=int,
                        help=f"shortest stable phase reported, steps (default: {DEFAULTS['min_stable']}{scaled})")
    parser.add_argument("--json", metavar="FILE", type=output_file,
                        help="write [{layer, block, stable_from}] as JSON ('-': stdout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace import trace
    from moe_trace.errors import UsageError
    from predictors.phases import DEFAULTS, distance_to_quiet, parameters_for, stable_from

    given = {name: getattr(args, name) for name in DEFAULTS}
    if any(given[name] is not None and given[name] < 1 for name in ("block", "lag", "min_stable")):
        raise UsageError("--block, --lag and --min-stable must be >= 1")
    if given["threshold"] is not None and not (math.isfinite(given["threshold"]) and given["threshold"] > 0):
        raise UsageError(f"--threshold must be a positive number, got {given['threshold']}")
    if given["penalty"] is not None and not (math.isfinite(given["penalty"]) and given["penalty"] >= 0):
        raise UsageError(f"--penalty must be a non-negative number, got {given['penalty']}")
    loaded = trace.load(args.trace)
    p = loaded.proportions()
    params = parameters_for(len(p)) | {k: v for k, v in given.items() if v is not None}
    scaled = {k: v for k, v in params.items() if given[k] is None and v != DEFAULTS[k]}
    if scaled:
        print(f"note: the trace has {len(p)} steps, fewer than the {2 * DEFAULTS['min_stable']} the defaults suit: "
              f"using {' '.join(f'--{k.replace(chr(95), chr(45))} {v}' for k, v in scaled.items())} (scaled to "
              "the trace)", file=sys.stderr)
    starts = stable_from(p, **params)
    distance = distance_to_quiet(p, params["block"], params["lag"], params["min_stable"])
    records = [{"layer": i, "block": block, "stable_from": None if s is None else int(loaded.steps[s])}
               for i, (block, s) in enumerate(zip(loaded.layers, starts, strict=True))]
    if args.json != "-":
        print(f"{len(loaded)} steps; stable phase from (per MoE layer):")
        for r, d in zip(records, distance, strict=True):
            if r["stable_from"] is not None:
                verdict = str(r["stable_from"])
            elif math.isnan(d):
                verdict = f"never (too few steps for one {params['lag']}-block comparison)"
            else:
                verdict = (f"never (load movement over the last {params['min_stable']} steps: {d:.2f}x noise; "
                           f"quiet is below {params['threshold']}x)")
            print(f"  layer {r['layer']} (block {r['block']}): {verdict}")
    write_json(args.json, records)
    return 0
