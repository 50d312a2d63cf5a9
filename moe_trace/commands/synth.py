"""``moe-trace synth OUT``: write a synthetic trace with a known transient/stable switch."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_trace.commands._common import defaults_of
from moe_trace.errors import UsageError


def _switch(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def register(subparsers: argparse._SubParsersAction) -> None:
    from moe_trace.synth import generate

    defaults = defaults_of(generate)
    parser = subparsers.add_parser(
        "synth", help="write a synthetic expert-load trace",
        description="Draw a synthetic trace: per layer a stable mean load (Dirichlet), a transient phase "
                    "before --switch-step where the mean drifts, and per-step counts with per-sequence "
                    "correlated routing. The generator's parameters are stored in the trace's metadata.")
    parser.add_argument("out", help="trace directory (or a .parquet file) to create")
    for name, kind, help_text in [
        ("layers", int, "MoE layers"), ("experts", int, "experts per layer"), ("steps", int, "optimizer steps"),
        ("tokens_per_step", int, "tokens per step"), ("top_k", int, "experts per token"),
        ("seq_len", int, "tokens per sequence (they share a routing preference)"),
        ("switch_step", _switch, "first step of the stable phase, or none"),
        ("concentration", float, "Dirichlet concentration of the stable loads (small = skewed)"),
        ("drift", float, "std of the transient's logit excursion"),
        ("drift_timescale", float, "correlation time of the transient's excursion, steps"),
        ("fade", float, "std of the transient's initial logit deviation, fading to 0 at the switch (default: drift)"),
        ("seq_concentration", float, "per-sequence routing concentration (small = more overdispersed)"),
        ("seed", int, "random seed"),
    ]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name],
                            help=f"{help_text} (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace import synth, trace

    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty; choose a new path")
    params = {k: v for k, v in vars(args).items() if k not in ("out", "run", "command")}
    try:
        counts, meta = synth.generate(**params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    path = trace.write(out, counts, meta)
    print(f"wrote {path}: {counts.shape[0]} steps x {counts.shape[1]} layers x {counts.shape[2]} experts")
    return 0
