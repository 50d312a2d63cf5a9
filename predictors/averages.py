"""Moving averages: the paper's sliding-window average and an exponentially weighted one.

Both forecast a constant: the recent mean load, the same for every step of the horizon.
"""

from __future__ import annotations

import numpy as np

from predictors.base import Predictor, constant_forecast, register


@register("sw_avg")
class SlidingWindowAverage(Predictor):
    """Mean of the last ``window`` steps (all of them if the history is shorter)."""

    def __init__(self, window: int = 1000):
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)

    def _fit(self, history: np.ndarray) -> None:
        self._level = history[-self.window:].mean(axis=0)

    def _predict(self, horizon: int) -> np.ndarray:
        return constant_forecast(self._level, horizon)


@register("ema")
class ExponentialMovingAverage(Predictor):
    """Exponentially weighted mean with weights halving every ``halflife`` steps back in time.

    Weights older than 20 half-lives (< 1e-6) are dropped, so a fit reads at most ``20 * halflife`` steps.
    """

    def __init__(self, halflife: float = 300.0):
        if float(halflife) <= 0:
            raise ValueError(f"halflife must be > 0, got {halflife}")
        self.halflife = float(halflife)

    def _fit(self, history: np.ndarray) -> None:
        n = min(len(history), int(np.ceil(20 * self.halflife)))
        weights = 0.5 ** (np.arange(n)[::-1] / self.halflife)  # oldest first, newest weight 1
        self._level = np.tensordot(weights / weights.sum(), history[-n:], axes=1)

    def _predict(self, horizon: int) -> np.ndarray:
        return constant_forecast(self._level, horizon)
