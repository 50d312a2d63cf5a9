"""Linear regression forecasts (scikit-learn): a time trend per series, or autoregressive lags pooled per layer."""

from __future__ import annotations

import numpy as np

from predictors.base import Predictor, register
from predictors.series import block_means, repeat_blocks


@register("linear")
class LinearRegression(Predictor):
    """Least-squares fit on the last ``window`` steps, averaged in blocks of ``block`` steps.

    ``lags == 0``: each series is regressed on time (one multi-output fit for all layers and experts) and the
    line is extrapolated. ``lags > 0``: per layer, one regression of each block mean on the previous ``lags``
    block means of the same expert, pooled over the layer's experts so they share the coefficients; the
    forecast is iterated block by block. (A time term would be useless there: proportions sum to one at every
    block, so a regressor shared by all experts of a block explains nothing.)
    """

    def __init__(self, window: int = 2000, block: int = 1, lags: int = 0):
        if int(window) < 2 or int(block) < 1 or int(lags) < 0:
            raise ValueError("need window >= 2, block >= 1, lags >= 0")
        self.window, self.block, self.lags = int(window), int(block), int(lags)

    def _fit(self, history: np.ndarray) -> None:
        from sklearn.linear_model import LinearRegression as OLS

        self._series = block_means(history, self.block, self.window)  # [n, layers, experts]
        n, n_layers = self._series.shape[:2]
        if self.lags == 0 or n <= self.lags + 2:
            t = np.arange(n, dtype=np.float64)[:, None]
            self._trend_model = OLS().fit(t, self._series.reshape(n, -1)) if n > 1 else None
            self._lag_models = None
            return
        self._lag_models = []
        for layer in range(n_layers):
            features, targets = self._lag_features(self._series[:, layer, :])
            self._lag_models.append(OLS().fit(features, targets))

    def _lag_features(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows (block k, expert e): features ``y[k-1], ..., y[k-lags]`` of expert e, target ``y[k, e]``."""
        n = len(series)
        lagged = np.stack([series[self.lags - j - 1:n - j - 1] for j in range(self.lags)], axis=-1)
        return lagged.reshape(-1, self.lags), series[self.lags:].reshape(-1)

    def _predict(self, horizon: int) -> np.ndarray:
        n, n_layers, n_experts = self._series.shape
        n_blocks = -(-horizon // self.block)
        if self._lag_models is None:
            if self._trend_model is None:
                blocks = np.broadcast_to(self._series[-1], (n_blocks, n_layers, n_experts))
            else:
                t = np.arange(n, n + n_blocks, dtype=np.float64)[:, None]
                blocks = self._trend_model.predict(t).reshape(n_blocks, n_layers, n_experts)
            return repeat_blocks(blocks, self.block, horizon)
        blocks = np.empty((n_blocks, n_layers, n_experts))
        for layer, model in enumerate(self._lag_models):
            recent = list(self._series[-self.lags:, layer, :])  # oldest first
            for k in range(n_blocks):
                features = np.stack(recent[::-1][:self.lags], axis=-1)  # [experts, lags], newest first
                recent.append(model.predict(features))
                blocks[k, layer] = recent[-1]
        return repeat_blocks(blocks, self.block, horizon)
