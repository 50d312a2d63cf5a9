"""Per-step expert-load recording without host-device syncs in the training step.

:class:`CountRecorder` sums each step's per-layer, per-expert counts (over micro-batches) into a device
buffer of ``block`` steps. When the buffer is full it is summed over data-parallel ranks and copied to
pinned host memory with a non-blocking copy and a CUDA event; :meth:`CountRecorder.flush` waits for those
events (long completed by then) and writes the steps as one schema-1 part file.

:class:`MetricsLog` does the same for the per-step scalars of ``metrics.parquet``: the loss, aux loss and
gradient norm stay device tensors until a flush or a progress update reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_trace import trace


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CountRecorder:
    """Collects ``[moe_layers, experts]`` counts per micro-batch and writes them as a trace.

    ``write=False`` (data-parallel ranks other than 0) still takes part in the all-reduce but writes nothing.
    """

    def __init__(self, trace_dir: str | os.PathLike, meta: Mapping[str, Any], device: torch.device,
                 block: int = 25, write: bool = True):
        self.trace_dir, self.meta, self.write = Path(trace_dir), dict(meta), write
        shape = (block, len(meta["moe_layers"]), meta["num_experts"])
        self._buffer = torch.zeros(shape, dtype=torch.int64, device=device)
        self._pin = device.type == "cuda"
        self._slot = 0
        self._first_step: int | None = None
        self._pending: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def add(self, counts: torch.Tensor) -> None:
        """Add one micro-batch's counts (int64 ``[moe_layers, experts]``, on the device) to the current step."""
        self._buffer[self._slot] += counts

    def end_step(self, step: int) -> None:
        """Close the current step as optimizer step ``step`` (steps arrive consecutively)."""
        if self._first_step is None:
            self._first_step = step
        self._slot += 1
        if self._slot == len(self._buffer):
            self._copy_to_host()

    def _copy_to_host(self) -> None:
        if self._slot == 0:
            return
        block = self._buffer[: self._slot]
        if _is_distributed():
            dist.all_reduce(block)
        host = torch.empty(block.shape, dtype=torch.int64, pin_memory=self._pin)
        host.copy_(block, non_blocking=self._pin)
        event = None
        if self._pin:
            event = torch.cuda.Event()
            event.record()
        # Stream order makes it safe to clear the buffer while the copy above is still in flight.
        self._buffer.zero_()
        self._pending.append((self._first_step, host, event))
        self._slot, self._first_step = 0, None

    def flush(self) -> None:
        """Write every step recorded so far as one part file (crash-safe: it appears only complete)."""
        self._copy_to_host()
        if not self._pending:
            return
        for _, _, event in self._pending:
            if event is not None:
                event.synchronize()
        steps = np.concatenate([first + np.arange(len(host)) for first, host, _ in self._pending])
        counts = np.concatenate([host.numpy() for _, host, _ in self._pending])
        self._pending.clear()
        if self.write:
            trace.write_part(self.trace_dir, steps, counts, self.meta)


class MetricsLog:
    """Per-step scalars for ``metrics.parquet``, device tensors until read; rewritten whole at each flush."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, write: bool = True):
        self.path, self.write = Path(path), write
        self._rows: list[dict[str, Any]] = []
        if resume_step > 0 and self.path.exists():
            kept = trace.load_metrics(self.path)
            keep = kept["step"] < resume_step
            self._rows = [{c: kept[c][i].item() for c in trace.METRIC_COLUMNS} for i in np.flatnonzero(keep)]

    def add(self, **row: Any) -> None:
        """One step's ``trace.METRIC_COLUMNS``; tensor values are read from the device later."""
        self._rows.append(row)

    def last(self, column: str) -> float:
        return float(self._rows[-1][column])

    def flush(self) -> None:
        """Atomically rewrite the whole file (this reads any pending device values)."""
        for row in self._rows:
            for column, value in row.items():
                if isinstance(value, torch.Tensor):
                    row[column] = value.item()
        if self.write and self._rows:
            trace.write_metrics(self.path, {c: [row[c] for row in self._rows] for c in trace.METRIC_COLUMNS})
