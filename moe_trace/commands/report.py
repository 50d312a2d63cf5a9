"""``moe-trace report TRACE --out DIR``: every figure of a run as PNG plus a Markdown summary."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's figures (PNG) and a summary (Markdown)",
        description="Draw the loss, the per-layer expert load, its windowed spread with the stable-phase "
                    "start, predictor error and placement imbalance over the run; write them as PNG files "
                    "and summary.md with the findings in numbers.")
    parser.add_argument("trace", help="trace directory, .parquet file or run directory")
    parser.add_argument("--out", required=True, help="directory for the PNG files and summary.md")
    parser.add_argument("--window", type=int, default=None,
                        help="steps per window for the spread figures (default: about 50 windows)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace import report

    analysis = report.analyse(report.load_run(args.trace), window=args.window)
    written = report.write_report(analysis, args.out)
    for path in written:
        print(path)
    return 0
