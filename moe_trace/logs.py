"""Training scalars where users look: TensorBoard event files.

Values arrive on the host in batches (a block of recorded steps at a recorder flush, metrics at a log
step), so logging adds no host-device sync to the training step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


class TensorBoardLog:
    """Per-MoE-layer load imbalance (max/mean of the expert counts) and any other scalars, every ``log_every`` steps."""

    def __init__(self, log_dir: str | os.PathLike, moe_layers: Sequence[int], log_every: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from moe_trace.errors import UsageError

            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(str(log_dir))
        self.moe_layers, self.log_every = list(moe_layers), max(1, int(log_every))

    def add_load(self, steps: np.ndarray, counts: np.ndarray) -> None:
        """``counts[steps, layers, experts]``: each logged step's imbalance per layer (1.0 is perfectly even)."""
        logged = np.asarray(steps) % self.log_every == 0
        counts = np.asarray(counts, dtype=np.float64)[logged]
        mean = counts.mean(axis=2)
        imbalance = np.divide(counts.max(axis=2), mean, out=np.ones_like(mean), where=mean > 0)
        for step, row in zip(np.asarray(steps)[logged], imbalance, strict=True):
            for block, value in zip(self.moe_layers, row, strict=True):
                self.writer.add_scalar(f"load_imbalance/block_{block}", value, int(step))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        self.writer.close()
