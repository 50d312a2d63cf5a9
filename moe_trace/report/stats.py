"""The numbers behind the spread figures: windowed statistics of the load proportions, and distances
between runs' windows. numpy (and pandas for rolling means) only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_trace.errors import UsageError


@dataclass(frozen=True)
class WindowStats:
    """Per-window summary of the load proportions over windows of ``window`` steps: each expert's mean, and
    the variance and range (max - min) of each expert's proportion over the window, averaged over experts.
    """

    window: int
    starts: np.ndarray  # [windows] first step of each window
    mean: np.ndarray  # [windows, layers, experts]
    variance: np.ndarray  # [windows, layers]
    range: np.ndarray  # [windows, layers]

    @property
    def skew(self) -> np.ndarray:
        """``[windows, layers]`` heaviest expert's mean load over the average expert's: the imbalance one
        expert per GPU would suffer. Independent of how experts are numbered, so it compares across seeds."""
        return self.mean.max(axis=-1) * self.mean.shape[-1]


def windowed_stats(p: np.ndarray, steps: np.ndarray, window: int) -> WindowStats:
    """Variance and range of ``p[t, l, e]`` over consecutive, non-overlapping windows of ``window`` steps.

    A trailing partial window is dropped so that every point averages the same number of steps.
    """
    if window < 2:
        raise UsageError(f"a window needs at least 2 steps (got {window})")
    n_windows = p.shape[0] // window
    if n_windows < 2:
        raise UsageError(f"a {window}-step window needs a trace of at least {2 * window} steps "
                         f"(this one has {p.shape[0]}); pass a smaller window")
    blocks = p[: n_windows * window].reshape(n_windows, window, *p.shape[1:])
    return WindowStats(
        window=window,
        starts=steps[: n_windows * window : window],
        mean=blocks.mean(axis=1),
        variance=blocks.var(axis=1).mean(axis=-1),
        range=np.ptp(blocks, axis=1).mean(axis=-1),
    )


def default_window(n_steps: int) -> int:
    """A window giving about 50 points over the run (at least 10 steps): smooth enough to show the trend."""
    return max(10, n_steps // 50)


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` samples (shorter at the start), NaNs ignored."""
    import pandas as pd

    return pd.Series(x).rolling(window, min_periods=1).mean().to_numpy()


def binned_mean(p: np.ndarray, steps: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``p`` over ``bins`` equal runs of consecutive steps; return the bin edges (in steps) and means."""
    bins = min(bins, p.shape[0])
    edges = np.linspace(0, p.shape[0], bins + 1).astype(int)
    means = np.add.reduceat(p, edges[:-1], axis=0) / np.diff(edges).reshape(-1, *([1] * (p.ndim - 1)))
    step_edges = np.append(steps[edges[:-1]], steps[-1] + 1)
    return step_edges, means


def common_windows(*stats: WindowStats) -> int:
    """How many windows every run has (runs compare only at one window size)."""
    windows = sorted({s.window for s in stats})
    if len(windows) > 1:
        raise UsageError(f"compare runs with the same window (got {', '.join(map(str, windows))} steps)")
    return min(len(s.starts) for s in stats)


def load_distance(a: WindowStats, b: WindowStats) -> np.ndarray:
    """``[windows, layers]`` L1 distance between the two runs' window-mean loads, expert by expert.

    Meaningful only where expert ``e`` of one run corresponds to expert ``e`` of the other (same seed and
    initialisation, e.g. INT8 vs bf16 attention); across seeds expert numbering is arbitrary.
    """
    if a.mean.shape[1:] != b.mean.shape[1:]:
        raise UsageError(f"runs differ in layers x experts ({a.mean.shape[1:]} vs {b.mean.shape[1:]})")
    n = common_windows(a, b)
    return np.abs(a.mean[:n] - b.mean[:n]).sum(axis=-1)


def window_drift(stats: WindowStats) -> np.ndarray:
    """``[windows, layers]`` L1 distance of each window-mean load from the previous window's (NaN for the
    first): how much a run moves by itself in one window, noise included."""
    drift = np.abs(np.diff(stats.mean, axis=0)).sum(axis=-1)
    return np.concatenate([np.full((1, drift.shape[1]), np.nan), drift])
