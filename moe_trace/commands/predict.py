"""``moe-trace predict TRACE``: the predictor evaluation table of DESIGN.md (predictor x horizon x phase)."""

from __future__ import annotations

import argparse
import sys

from moe_trace.commands._common import (
    add_protocol_arguments,
    add_trace_argument,
    check_protocol_arguments,
    output_file,
    resolve_protocol,
    write_json,
)

DEFAULT_PREDICTORS = "sw_avg:window=100,sw_avg:window=1000,ema,linear,arima,auto"
COLUMNS = ("predictor", "horizon", "phase", "layer", "step_wape", "step_floor", "ratio", "mean_wape", "n_origins")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="evaluate load predictors on a trace",
        description="Fit each predictor at forecast origins every --stride steps (seeing only earlier steps) "
                    "and score its forecast of the next H steps: step_wape, the oracle's step_floor, their "
                    "ratio, and mean_wape of the horizon-mean load; per phase (moe-trace phases).")
    add_trace_argument(parser)
    add_protocol_arguments(parser, DEFAULT_PREDICTORS)
    parser.add_argument("--per-layer", action="store_true", help="also one row per MoE layer")
    parser.add_argument("--workers", type=int, default=None, help="processes for arima/lstm (default: all cores)")
    parser.add_argument("--json", metavar="FILE", type=output_file, help="write the records as JSON ('-': stdout)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moe_trace import trace
    from predictors import evaluate
    from predictors.phases import stable_from

    specs = check_protocol_arguments(args)
    loaded = trace.load(args.trace)
    p = loaded.proportions()
    horizons, stride, min_history, note = resolve_protocol(args, len(p))
    starts = stable_from(p)
    n_origins = len(evaluate.origins(len(p), min(horizons), stride, min_history))
    records = []
    with tqdm(total=n_origins * len(specs), unit="origin", disable=None) as bar:
        for spec in specs:
            bar.set_description(spec)
            scores = evaluate.evaluate(p, spec, horizons, stride, min_history, workers=args.workers,
                                       progress=bar.update)
            records += evaluate.records(spec, scores, starts, per_layer=args.per_layer)
    if note:
        print(note, file=sys.stderr)
    if args.json != "-":
        print(f"{len(p)} steps x {p.shape[1]} layers x {p.shape[2]} experts; stable from "
              f"{', '.join('never' if s is None else str(s) for s in starts)}")
        print(format_table([{**r, "ratio": r["step_wape"] / r["step_floor"]} for r in records]))
    write_json(args.json, records)
    return 0


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table with the COLUMNS (errors as percentages, ratio to 3 decimals)."""
    def cell(key: str, value: object) -> str:
        if key == "ratio":
            return f"{value:.3f}"
        if isinstance(value, float):
            return f"{100 * value:.2f}%"
        return str(value)

    cells = [COLUMNS] + [tuple(cell(k, r[k]) for k in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    n_text = COLUMNS.index("step_wape")  # text columns left-aligned, numbers right-aligned
    return "\n".join("  ".join(c.ljust(w) if i < n_text else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in cells)
