"""Helpers shared by the model-based predictors: block averaging, the re-estimation schedule, one thread."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def block_means(history: np.ndarray, block: int, window: int | None = None) -> np.ndarray:
    """Means of consecutive ``block``-step blocks over the last ``window`` steps, aligned to the newest step.

    ``[steps, ...] -> [blocks, ...]``; a partial oldest block is dropped (at least one block is kept).
    """
    recent = history if window is None else history[-window:]
    n_blocks = max(1, len(recent) // block)
    recent = recent[-n_blocks * block:]
    return recent.reshape(n_blocks, len(recent) // n_blocks, *recent.shape[1:]).mean(axis=1)


def repeat_blocks(block_forecast: np.ndarray, block: int, horizon: int) -> np.ndarray:
    """Expand a ``[blocks, ...]`` forecast to ``[horizon, ...]`` steps (each block value held ``block`` steps)."""
    return np.repeat(block_forecast, block, axis=0)[:horizon]


def estimation_cut(n_steps: int, refit_every: int) -> int:
    """How much of an ``n_steps`` history a model's parameters are estimated on.

    The history up to the last multiple of ``refit_every`` (of ``refit_every / 4`` while the history is
    shorter than ``refit_every``; all of it while shorter still, or if ``refit_every`` is 0). Parameters then
    change only when the history crosses such a point, and do not depend on which origins one evaluation
    process happened to fit before.
    """
    if refit_every <= 0:
        return n_steps
    unit = refit_every if n_steps >= refit_every else max(1, refit_every // 4)
    return n_steps // unit * unit or n_steps


@contextmanager
def one_thread() -> Iterator[None]:
    """Hold BLAS/OpenMP (and torch, if imported) to one thread inside the block.

    The predictors' matrices are small: extra threads only spin, which on a busy machine makes fits 3-20x
    slower; parallelism comes from processes over forecast origins instead.
    """
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=1):
        if torch is not None:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(torch_threads)
