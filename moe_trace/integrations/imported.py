"""What an importer of another tool's expert-load logs returns, and how it becomes a schema-1 trace."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_trace import trace
from moe_trace.errors import UsageError


@dataclass
class Imported:
    """Per-step expert counts read from another tool, with what was skipped or assumed."""

    counts: np.ndarray  # int64 [steps, layers, experts]
    steps: np.ndarray  # int64, strictly increasing
    layers: list[int]  # transformer block index of each counts layer
    top_k: int
    source: str  # e.g. "megatron tokens_per_expert"
    meta: dict[str, Any] = field(default_factory=dict)  # more metadata (parallel sizes, rank order, ...)
    warnings: list[str] = field(default_factory=list)  # what was skipped or assumed, one phrase each

    def trace_meta(self, model: str, seq_len: int | None = None) -> dict[str, Any]:
        """Schema-1 metadata: sizes the logs do not hold are None; tokens per step is the median row's."""
        tokens = int(np.median(self.counts.sum(axis=2)) // self.top_k) if self.counts.size else 0
        return trace.make_meta(**{
            "model": model, "num_experts": int(self.counts.shape[2]), "top_k": int(self.top_k),
            "moe_layers": self.layers, "tokens_per_step": tokens, "seq_len": seq_len,
            "global_batch": tokens // seq_len if seq_len else None, "seed": None, "moe_backend": self.source,
            "attention": None, "world_size": self.meta.get("world_size", 1), "imported_from": self.source,
            **{k: v for k, v in self.meta.items() if k != "world_size"}})


def write_trace(imported: Imported, out: str | os.PathLike, model: str, seq_len: int | None = None) -> Path:
    """Write ``imported`` as a trace at ``out`` (a directory, or one file ending ``.parquet``)."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UsageError(f"--out {out} already exists; choose a new path")
    if not len(imported.steps):
        raise UsageError("nothing to import: no step has counts from every rank and layer")
    return trace.write(out, imported.counts, imported.trace_meta(model, seq_len), steps=imported.steps)


def stack(rows: dict[tuple[int, int], np.ndarray], steps: list[int], layers: list[int]) -> np.ndarray:
    """``rows[(step, layer)]`` as int64 ``[steps, layers, experts]``."""
    return np.stack([np.stack([rows[(s, layer)] for layer in layers]) for s in steps]).astype(np.int64)


def describe_steps(steps: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return f"{len(steps)} step{'s' * (len(steps) != 1)} ({shown}{', ...' if len(steps) > limit else ''})"
