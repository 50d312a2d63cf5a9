"""``moe-trace report TRACE --out DIR``: every figure of a run as PNG plus a Markdown summary."""

from __future__ import annotations

import argparse

from moe_trace.commands._common import add_protocol_arguments, add_trace_argument
from moe_trace.report import Cluster, Protocol  # numpy and pyarrow only; matplotlib loads when a figure is drawn

DEFAULTS = Protocol()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's figures (PNG) and a summary (Markdown)",
        description="Draw the loss, the per-layer expert load, its windowed spread with the stable-phase "
                    "start, predictor error and placement imbalance over the run; write them as PNG files "
                    "and summary.md with the findings in numbers.")
    add_trace_argument(parser)
    parser.add_argument("--out", required=True, help="directory for the PNG files and summary.md")
    parser.add_argument("--window", type=int, default=None,
                        help="steps per window for the spread figures (default: about 50 windows)")
    add_protocol_arguments(parser, ",".join(DEFAULTS.predictors))
    parser.add_argument("--no-predict", action="store_true", help="skip the predictor evaluation")
    parser.add_argument("--gpus", type=int, default=Cluster.gpus, help="simulated GPUs for the placement replay")
    parser.add_argument("--redundant", type=int, default=None,
                        help="redundant expert slots over all GPUs (default: one per GPU)")
    parser.add_argument("--policy", default=Cluster.policies,
                        help="comma list of placement policies, or all (default: %(default)s)")
    parser.add_argument("--cost", default=None, metavar="{measured,linear,FILE}",
                        help="placement cost model (default: the shipped GPU calibration where present, else linear)")
    parser.add_argument("--no-place", action="store_true", help="skip the placement replay")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: no window, even where a display exists

    from moe_trace import report
    from predictors import split_specs

    protocol = None if args.no_predict else Protocol(
        predictors=tuple(split_specs(args.predictors)), horizons=tuple(args.horizons), stride=args.stride,
        min_history=args.min_history)
    cluster = None if args.no_place else Cluster(gpus=args.gpus, redundant=args.redundant, policies=args.policy,
                                                  cost=args.cost)
    analysis = report.analyse(report.load_run(args.trace), window=args.window, protocol=protocol, cluster=cluster)
    written = report.write_report(analysis, args.out)
    for path in written:
        print(path)
    return 0
