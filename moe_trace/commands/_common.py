"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trace.errors import UsageError


def output_file(text: str) -> str:
    """argparse ``type`` of an output file option (``--json``): refused at once where it cannot be written,
    not after the work it would hold (``-`` is stdout)."""
    if text == "-":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not a writable directory")
    return text


def write_json(path: str | None, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` (``-`` for stdout); do nothing when ``path`` is None."""
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=_jsonable) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def add_trace_argument(parser: argparse.ArgumentParser) -> None:
    """The positional TRACE every analysis command reads (anything ``moe_trace.trace.load`` accepts)."""
    parser.add_argument("trace", help="trace directory, .parquet file or run directory")


def defaults_of(function) -> dict[str, Any]:
    """A function's keyword defaults, so a command's options default to what the library does."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


@dataclass(frozen=True)
class ProtocolDefaults:
    """DESIGN.md's evaluation protocol defaults, sized for runs of ``REFERENCE_STEPS`` steps or more."""

    horizons: tuple[int, ...] = (1000, 2000)
    stride: int = 250
    min_history: int = 1000


PROTOCOL = ProtocolDefaults()
# A trace shorter than the defaults need gets them scaled by steps / REFERENCE_STEPS: the protocol's shape on a
# run of this length (origins from 20 % to 60 % of the run every 5 %, horizons of 20 % and 40 %).
REFERENCE_STEPS = 5000


def add_protocol_arguments(parser: argparse.ArgumentParser, predictors: str) -> None:
    """The evaluation protocol's options (DESIGN.md): which predictors, how far ahead, how often.

    Horizons, stride and history default to None: :func:`resolve_protocol` fills them in, scaled to a trace
    too short for DESIGN.md's defaults, and honours (or refuses) values the user gave.
    """
    parser.add_argument("--predictors", default=predictors,
                        help="comma list of specs name[:key=value...], e.g. sw_avg:window=100,arima:block=50 "
                             "(default: %(default)s)")
    parser.add_argument("--horizons", type=int, nargs="+", default=None,
                        help=f"forecast horizons in steps (default: {' '.join(map(str, PROTOCOL.horizons))}, "
                             f"scaled down on traces shorter than {REFERENCE_STEPS} steps)")
    parser.add_argument("--stride", type=int, default=None,
                        help=f"steps between forecast origins (default: {PROTOCOL.stride}, scaled likewise)")
    parser.add_argument("--min-history", type=int, default=None,
                        help=f"steps of history before the first forecast origin (default: {PROTOCOL.min_history}, "
                             "scaled likewise)")


def check_protocol_arguments(args: argparse.Namespace) -> list[str]:
    """Validate the protocol options before any work; return the predictor specs (each one buildable)."""
    from predictors import from_spec, split_specs

    given = {"--horizons": min(args.horizons) if args.horizons else None, "--stride": args.stride,
             "--min-history": args.min_history, "--workers": getattr(args, "workers", None)}
    bad = [name for name, value in given.items() if value is not None and value < 1]
    if bad:
        raise UsageError(f"{', '.join(bad)} must be >= 1")
    specs = split_specs(args.predictors)
    if not specs:
        raise UsageError("--predictors is empty")
    for spec in specs:
        try:
            from_spec(spec)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return specs


def resolve_protocol(args: argparse.Namespace, n_steps: int) -> tuple[tuple[int, ...], int, int, str | None]:
    """``(horizons, stride, min_history, note)`` for a trace of ``n_steps``: the user's values where given, else
    the defaults, scaled to the trace where it is too short for them; ``note`` is then the line that says so
    (printed by the caller once the work succeeded, so that an error is never preceded by it), else None.

    Raises :class:`UsageError` where the user's own values leave no forecast origin.
    """
    from predictors.evaluate import origins

    horizons = tuple(args.horizons or PROTOCOL.horizons)
    stride = args.stride or PROTOCOL.stride
    min_history = args.min_history or PROTOCOL.min_history
    if len(origins(n_steps, max(horizons), stride, min_history)):
        return horizons, stride, min_history, None
    scale = n_steps / REFERENCE_STEPS
    scaled = lambda value: max(1, math.floor(value * scale))  # noqa: E731
    if args.horizons is None:
        horizons = tuple(scaled(h) for h in PROTOCOL.horizons)
    stride = args.stride or scaled(PROTOCOL.stride)
    min_history = args.min_history or scaled(PROTOCOL.min_history)
    if not len(origins(n_steps, max(horizons), stride, min_history)):
        raise UsageError(f"the trace has {n_steps} steps, too few for a {max(horizons)}-step horizon after "
                         f"{min_history} steps of history; pass shorter --horizons or --min-history")
    note = (f"note: the trace has {n_steps} steps, fewer than the {PROTOCOL.min_history + max(PROTOCOL.horizons)} "
            f"the default protocol needs: used --horizons {' '.join(map(str, horizons))} --min-history "
            f"{min_history} --stride {stride} (the defaults scaled to the trace)")
    return horizons, stride, min_history, note
