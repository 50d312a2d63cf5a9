"""``auto``: per layer, the moving-average or trend forecast that did best in a backtest on the history seen.

Every candidate is a linear forecast from the last ``W`` steps: their mean plus a fraction ``k`` (the
damping) of their least-squares slope, extrapolated. ``k = 0`` is the sliding-window average, ``k = 1`` the
window's linear trend. From prefix sums of ``p`` and ``t * p`` every candidate's forecast at every backtest
origin is a handful of array operations, so the whole grid is backtested at once, vectorised over origins,
candidates, layers and experts.

At ``predict(H)`` the backtest origins ``s`` run every ``stride`` steps up to ``t0 - min_target``; each
candidate is scored by its horizon-mean error (``mean_wape``) on the target ``[s, s + H)`` cut at ``t0``, so
the latest origins, with partial targets, let the choice follow a change of regime (the start of the stable
phase) within ``min_target`` steps rather than ``H``. Per layer, the candidate with the least log error
relative to each origin's best (scale-free: transient errors are 10x the stable ones), weighted to favour
recent origins (weights halve every ``memory`` steps back), is used.
"""

from __future__ import annotations

import numpy as np

from predictors.base import Predictor, register

DEFAULT_WINDOWS = (50, 100, 200, 500, 1000, 2000, 4000, 8000)
DEFAULT_DAMPING = (0.0, 0.25, 0.5, 1.0)


@register("auto")
class BacktestSelected(Predictor):
    """Backtest-selected window and trend damping, chosen per layer."""

    def __init__(self, windows: tuple[int, ...] = DEFAULT_WINDOWS, damping: tuple[float, ...] = DEFAULT_DAMPING,
                 stride: int = 100, memory: float = 2000.0, min_target: int = 100, fallback_window: int = 1000):
        if min(windows) < 2 or stride < 1 or memory <= 0 or 0.0 not in damping:
            raise ValueError("windows must be >= 2, stride >= 1, memory > 0, and damping must include 0")
        self.windows = tuple(int(w) for w in windows)
        self.damping = tuple(float(k) for k in damping)
        self.stride, self.memory, self.min_target = int(stride), float(memory), int(min_target)
        self.fallback_window = int(fallback_window)

    def _fit(self, history: np.ndarray) -> None:
        t = np.arange(len(history), dtype=np.float64)[:, None, None]
        zero = np.zeros((1, *history.shape[1:]))
        self._sum = np.concatenate([zero, np.cumsum(history, axis=0)])  # sum of p over [0, i)
        self._tsum = np.concatenate([zero, np.cumsum(t * history, axis=0)])  # sum of t * p over [0, i)

    def _window_fit(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean, least-squares slope and effective length of every window ending before each of ``ends``.

        Shapes ``[ends, windows, layers, experts]`` (length ``[ends, windows, 1, 1]``); windows longer
        than the history are cut to it.
        """
        w = np.minimum(np.array(self.windows)[None, :], ends[:, None]).astype(np.float64)  # [ends, windows]
        starts = ends[:, None] - w.astype(np.int64)
        s0 = self._sum[ends][:, None] - self._sum[starts]
        s1 = self._tsum[ends][:, None] - self._tsum[starts]
        w = w[..., None, None]
        mean_t = ends[:, None, None, None] - (w + 1) / 2
        spread = np.maximum(w * (w * w - 1) / 12, 1e-12)  # sum of (t - mean_t)^2
        return s0 / w, (s1 - mean_t * s0) / spread, w

    def _predict(self, horizon: int) -> np.ndarray:
        n_steps = len(self._sum) - 1
        choice = self._select(horizon)  # [layers] flat index into (windows, damping)
        mean, slope, w = (a[0] for a in self._window_fit(np.array([n_steps])))  # [windows, layers, experts]
        n_layers = mean.shape[1]
        wi, ki = np.unravel_index(choice, (len(self.windows), len(self.damping)))
        layers = np.arange(n_layers)
        level, trend = mean[wi, layers], slope[wi, layers] * np.array(self.damping)[ki][:, None]
        offset = (w[wi, 0] + 1) / 2 + np.arange(horizon)[:, None, None]  # steps from the window's centre
        return level[None] + trend[None] * offset

    def _select(self, horizon: int) -> np.ndarray:
        n_steps, n_layers = len(self._sum) - 1, self._sum.shape[1]
        ends = np.arange(n_steps - self.min_target, 1, -self.stride)[::-1]
        if len(ends) == 0:  # no backtest possible yet: the sliding average closest to fallback_window
            window = int(np.argmin(np.abs(np.array(self.windows) - self.fallback_window)))
            return np.full(n_layers, window * len(self.damping) + self.damping.index(0.0))
        damping = np.array(self.damping)[None, None, :, None, None]
        length = np.minimum(horizon, n_steps - ends).astype(np.float64)
        mean, slope, w = self._window_fit(ends)
        lead = (w + length[:, None, None, None]) / 2
        forecast = mean[:, :, None] + damping * (slope * lead)[:, :, None]
        actual = (self._sum[ends + length.astype(np.int64)] - self._sum[ends]) / length[:, None, None]
        error = np.abs(forecast - actual[:, None, None]).sum(axis=-1)  # [ends, windows, damping, layers]
        regret = np.log((error + 1e-12) / (error.min(axis=(1, 2), keepdims=True) + 1e-12))
        weights = 0.5 ** ((ends[-1] - ends) / self.memory)
        score = np.tensordot(weights, regret, axes=1)  # [windows, damping, layers]
        return score.reshape(-1, score.shape[-1]).argmin(axis=0)
