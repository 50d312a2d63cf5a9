"""Training scalars where users look: TensorBoard event files.

Nothing here reads a device value when it is logged: expert loads arrive as host arrays with a recorder
block (:meth:`TensorBoardLog.add_load`, the recorder's ``on_block``), and other scalars may be device
tensors that stay pending until :meth:`TensorBoardLog.flush`, which training calls where it flushes the
trace and metrics anyway. So logging adds no host-device sync to the training step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_trace.errors import UsageError


class TensorBoardLog:
    """Per-MoE-layer load imbalance (max/mean of the expert counts) and other scalars, every ``log_every`` steps."""

    def __init__(self, log_dir: str | os.PathLike, log_every: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(log_dir))
        self.log_every = max(1, int(log_every))
        self._pending: list[tuple[int, Mapping[str, Any]]] = []

    def logs(self, step: int) -> bool:
        """Whether ``step`` is one of the logged steps."""
        return step % self.log_every == 0

    def add_load(self, steps: np.ndarray, counts: np.ndarray, moe_layers: Sequence[int]) -> None:
        """``counts[steps, layers, experts]`` of MoE blocks ``moe_layers``: each logged step's imbalance per
        layer, ``load_imbalance/block_<b>`` (1.0 is perfectly even)."""
        logged = np.asarray(steps) % self.log_every == 0
        counts = np.asarray(counts, dtype=np.float64)[logged]
        mean = counts.mean(axis=2)
        imbalance = np.divide(counts.max(axis=2), mean, out=np.ones_like(mean), where=mean > 0)
        for step, row in zip(np.asarray(steps)[logged], imbalance, strict=True):
            for block, value in zip(moe_layers, row, strict=True):
                self.writer.add_scalar(f"load_imbalance/block_{block}", value, int(step))

    def add_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Scalars of one step (floats, or device tensors read at the next :meth:`flush`)."""
        self._pending.append((step, scalars))

    def flush(self) -> None:
        for step, scalars in self._pending:
            for name, value in scalars.items():
                self.writer.add_scalar(name, float(value), int(step))
        self._pending.clear()
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        self.writer.close()
