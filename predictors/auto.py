"""``auto``: per layer, a blend of moving-average and trend forecasts weighted by a backtest on the history seen.

Every candidate is a linear forecast from the last ``W`` steps: their mean plus a fraction ``k`` (the
damping) of their least-squares slope, extrapolated. ``k = 0`` is the sliding-window average, ``k = 1`` the
window's linear trend. From prefix sums of ``p`` and ``t * p`` every candidate's forecast at every backtest
origin is a handful of array operations, so the whole grid is backtested at once, vectorised over origins,
candidates, layers and experts.

The router trains with a load-balancing loss that pulls every expert's share toward the uniform ``1/E``, so
each candidate also comes in versions whose deviation from ``1/E`` (level and trend alike) decays by half
every ``h`` steps of the horizon, for each half-life ``h`` in ``reversion`` (``inf``: no pull, the plain
candidate). The backtest decides per layer how much a layer reverts; the horizon means of the decay
factors have closed forms, so these versions cost the backtest no more than the windows do.

At ``predict(H)`` the backtest origins ``s`` run every ``stride`` steps up to ``t0 - min_target``; each
candidate is scored by its horizon-mean error (``mean_wape``) on the target ``[s, s + H)`` cut at ``t0``, so
the latest origins, with partial targets, let the blend follow a change of regime (the start of the stable
phase) within ``min_target`` steps rather than ``H``. A candidate's score is its log error relative to each
origin's best (scale-free: transient errors are 10x the stable ones), averaged with weights that favour recent
origins (halving every ``memory`` steps back). Per layer the candidates are blended with softmin weights
``exp(-score / temperature)``: averaging the few near-best windows cancels part of their independent errors,
where picking one alone also picks its noise (``temperature -> 0`` is that pick).
"""

from __future__ import annotations

import numpy as np

from predictors.base import Predictor, register

DEFAULT_WINDOWS = (50, 100, 200, 500, 1000, 2000, 4000, 8000)
DEFAULT_DAMPING = (0.0, 0.25, 0.5, 1.0)
DEFAULT_REVERSION = (float("inf"), 4000.0, 1000.0)  # half-lives, in steps, of the pull toward 1/E


@register("auto")
class BacktestWeighted(Predictor):
    """Blend of windowed mean/trend forecasts, weighted per layer by their backtest error."""

    def __init__(self, windows: tuple[int, ...] = DEFAULT_WINDOWS, damping: tuple[float, ...] = DEFAULT_DAMPING,
                 reversion: tuple[float, ...] = DEFAULT_REVERSION, stride: int = 100, memory: float = 1000.0,
                 min_target: int = 100, temperature: float = 0.1, fallback_window: int = 1000):
        if (min(windows) < 2 or stride < 1 or memory <= 0 or temperature <= 0 or 0.0 not in damping
                or min(reversion) <= 0 or float("inf") not in reversion):
            raise ValueError("windows must be >= 2, stride >= 1, memory > 0, temperature > 0, damping must "
                             "include 0, and reversion half-lives must be positive and include inf")
        self.windows = tuple(int(w) for w in windows)
        self.damping = tuple(float(k) for k in damping)
        self.reversion = tuple(float(h) for h in reversion)
        self.stride, self.memory, self.min_target = int(stride), float(memory), int(min_target)
        self.temperature = float(temperature)
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

    def _candidates(self, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (window, damping) candidate at each of ``ends``: its level's deviation from ``1/E`` at the first
        forecast step (the window's mean extrapolated from its centre) and its trend per step.

        Shapes ``[ends, windows, damping, layers, experts]``. A half-life then makes the forecast at step ``j``
        ``1/E + (deviation + trend * j) * decay^j``.
        """
        mean, slope, w = self._window_fit(ends)
        trend = np.array(self.damping)[None, None, :, None, None] * slope[:, :, None]
        deviation = mean[:, :, None] + trend * ((w[:, :, None] + 1) / 2) - 1.0 / self._sum.shape[-1]
        return deviation, trend

    def _decay(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """``decay^j`` and ``j * decay^j`` for the horizon's steps ``j``, per half-life: ``[horizon, half-lives]``."""
        j = np.arange(horizon)[:, None]
        decay = (0.5 ** (1.0 / np.array(self.reversion)))[None, :] ** j  # per-step factor 1.0 for inf
        return decay, decay * j

    def _predict(self, horizon: int) -> np.ndarray:
        n_steps, n_layers, n_experts = self._sum.shape[0] - 1, self._sum.shape[1], self._sum.shape[2]
        deviation, trend = (a[0] for a in self._candidates(np.array([n_steps])))  # [windows, damping, layers, E]
        weights = self._weights(horizon).reshape(-1, len(self.reversion), n_layers)  # [(window, damping), hl, layers]
        deviation = np.einsum("cle,crl->rle", deviation.reshape(-1, n_layers, n_experts), weights)
        trend = np.einsum("cle,crl->rle", trend.reshape(-1, n_layers, n_experts), weights)
        level_decay, trend_decay = self._decay(horizon)
        return (1.0 / n_experts + np.einsum("hr,rle->hle", level_decay, deviation)
                + np.einsum("hr,rle->hle", trend_decay, trend))

    def _weights(self, horizon: int) -> np.ndarray:
        """Blend weights ``[candidates, layers]`` over the flattened (windows, damping, half-life) grid; columns
        sum to 1."""
        n_steps, n_layers, n_experts = len(self._sum) - 1, self._sum.shape[1], self._sum.shape[2]
        grid = (len(self.windows), len(self.damping), len(self.reversion))
        ends = np.arange(n_steps - self.min_target, 1, -self.stride)[::-1]
        if len(ends) == 0:  # no backtest possible yet: the sliding average closest to fallback_window
            window = int(np.argmin(np.abs(np.array(self.windows) - self.fallback_window)))
            weights = np.zeros((*grid, n_layers))
            weights[window, self.damping.index(0.0), self.reversion.index(float("inf"))] = 1.0
            return weights.reshape(-1, n_layers)
        length = np.minimum(horizon, n_steps - ends)
        deviation, trend = self._candidates(ends)
        actual = (self._sum[ends + length] - self._sum[ends]) / length[:, None, None]
        # Horizon means over each target's first `length` steps of decay^j and j * decay^j, from prefix sums.
        prefix = np.concatenate([np.zeros((1, 2, grid[2])), np.cumsum(np.stack(self._decay(horizon), 1), 0)])
        level_factor, trend_factor = np.moveaxis(prefix[length] / length[:, None, None], 1, 0)  # [ends, half-lives]
        error = np.empty((len(ends), *grid, n_layers))
        for r in range(grid[2]):  # one half-life at a time keeps the [ends, windows, damping, layers, experts] peak
            forecast = (1.0 / n_experts + deviation * level_factor[:, r, None, None, None, None]
                        + trend * trend_factor[:, r, None, None, None, None])
            error[:, :, :, r] = np.abs(forecast - actual[:, None, None]).sum(axis=-1)
        regret = np.log((error + 1e-12) / (error.min(axis=(1, 2, 3), keepdims=True) + 1e-12))
        recency = 0.5 ** ((ends[-1] - ends) / self.memory)
        score = np.tensordot(recency / recency.sum(), regret, axes=1).reshape(-1, n_layers)
        weights = np.exp(-(score - score.min(axis=0)) / self.temperature)
        return weights / weights.sum(axis=0)
