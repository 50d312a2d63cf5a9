"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any


def write_json(path: str | None, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` (``-`` for stdout); do nothing when ``path`` is None."""
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=_jsonable) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


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


def add_protocol_arguments(parser: argparse.ArgumentParser, predictors: str) -> None:
    """The evaluation protocol's options (DESIGN.md): which predictors, how far ahead, how often."""
    parser.add_argument("--predictors", default=predictors,
                        help="comma list of specs name[:key=value...], e.g. sw_avg:window=100,arima:block=50 "
                             "(default: %(default)s)")
    parser.add_argument("--horizons", type=int, nargs="+", default=[1000, 2000],
                        help="forecast horizons in steps (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=250,
                        help="steps between forecast origins (default: %(default)s)")
    parser.add_argument("--min-history", type=int, default=1000,
                        help="steps of history before the first forecast origin (default: %(default)s)")
