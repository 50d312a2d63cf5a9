"""A run as the report reads it: its trace and, when present, the per-step metrics beside it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from moe_trace import trace as trace_io


@dataclass
class Run:
    """A trace with its per-step metrics (None when the run has no ``metrics.parquet``)."""

    name: str
    trace: trace_io.Trace
    metrics: dict[str, np.ndarray] | None = None
    path: Path | None = field(default=None, repr=False)

    @cached_property
    def proportions(self) -> np.ndarray:
        """``p[t, l, e]``, computed once per run."""
        return self.trace.proportions()

    def layer_labels(self) -> list[str]:
        return [f"block {b}" for b in self.trace.layers]


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read a trace (directory, ``.parquet`` file or run directory) and the metrics beside it, if any."""
    tr = trace_io.load(path)
    metrics_file = trace_io.metrics_path(path)
    metrics = trace_io.load_metrics(metrics_file) if metrics_file.exists() else None
    return Run(name=name or _default_name(Path(path)), trace=tr, metrics=metrics, path=Path(path))


def _default_name(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.name == "trace" else path.stem
