"""``moe-trace report TRACE [TRACE ...] --out DIR``: every figure of a run as PNG plus a Markdown summary, or
with several traces, the runs side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_trace.commands._common import (
    add_protocol_arguments,
    check_protocol_arguments,
    resolve_protocol,
)
from moe_trace.errors import UsageError
from moe_trace.report import Cluster, Protocol  # numpy and pyarrow only; matplotlib loads when a figure is drawn

DEFAULTS = Protocol()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's figures (PNG) and a summary (Markdown), or compare several runs",
        description="Draw the loss, the per-layer expert load, its windowed spread with the stable-phase "
                    "start, predictor error and placement imbalance over the run; write them as PNG files "
                    "and summary.md with the findings in numbers. Given several traces (runs of one "
                    "architecture), compare them instead: their windowed spread and skew, and a table of "
                    "their numbers side by side.")
    parser.add_argument("traces", nargs="+", metavar="TRACE",
                        help="trace directory, .parquet file or run directory; several: compare them")
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
    # Everything that can be refused is refused before the analysis, which takes minutes on a long run.
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; the report is a directory of PNG files and summary.md")
    specs = None if args.no_predict else check_protocol_arguments(args)
    if args.window is not None and args.window < 2:
        raise UsageError(f"--window needs at least 2 steps, got {args.window}")

    import matplotlib

    matplotlib.use("Agg")  # files only: no window, even where a display exists

    from moe_trace import report
    from placement import policies
    from placement.planners import even_slots_per_gpu

    runs = [report.load_run(path) for path in args.traces]
    cluster = None
    if not args.no_place:
        cluster = Cluster(gpus=args.gpus, redundant=args.redundant, policies=args.policy, cost=args.cost)
        for run in runs:  # validates gpus and redundant
            even_slots_per_gpu(run.trace.num_experts, cluster.gpus, cluster.spare_slots)
        policies.get(cluster.policies)  # validates the names
    protocol, note = None, None
    if specs is not None:
        horizons, stride, min_history, note = resolve_protocol(args, min(len(run.trace) for run in runs))
        protocol = Protocol(predictors=tuple(specs), horizons=horizons, stride=stride, min_history=min_history)
    if len(runs) == 1:
        written = report.write_report(report.analyse(runs[0], args.window, protocol, cluster), args.out)
    else:
        written = report.write_comparison(report.analyse_runs(runs, args.window, protocol, cluster), args.out)
    if note:
        print(note, file=sys.stderr)
    for path in written:
        print(path)
    return 0
