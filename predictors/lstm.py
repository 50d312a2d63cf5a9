"""An LSTM forecaster (torch, imported only when fitted), shared by all (layer, expert) series.

Series are averaged over blocks of ``block`` steps. One small LSTM reads the last ``context`` block means of
a series, as deviations from their mean scaled by the number of experts (so that loads of any expert count
look alike), and predicts the next block's deviation; forecasts are iterated block by block. The network is
trained on windows of the history it is fitted on (every series, every position: strength is shared
across experts and layers), or, with ``train_on=PATH``, once on another run's trace and then only applied.
Like ARIMA it is re-trained only when the history crosses a multiple of ``refit_every`` steps
(``series.estimation_cut``).
"""

from __future__ import annotations

import numpy as np

from predictors.base import Predictor, register
from predictors.series import block_means, estimation_cut, one_thread, repeat_blocks


@register("lstm")
class LSTMForecaster(Predictor):
    """A one-layer LSTM over ``context`` block means, trained on the history's own windows."""

    parallel = True

    def __init__(self, block: int = 50, context: int = 20, hidden: int = 32, epochs: int = 3,
                 max_windows: int = 20000, refit_every: int = 5000, train_on: str | None = None, seed: int = 0):
        if min(int(block), int(context), int(hidden), int(epochs), int(max_windows)) < 1:
            raise ValueError("block, context, hidden, epochs and max_windows must be >= 1")
        self.block, self.context, self.hidden, self.epochs = int(block), int(context), int(hidden), int(epochs)
        self.max_windows, self.refit_every = int(max_windows), int(refit_every)
        self.train_on, self.seed = train_on, int(seed)
        self._trained_at: int | None = None

    def _fit(self, history: np.ndarray) -> None:
        self._series = block_means(history, self.block)  # [n, layers, experts]
        self._forecast = np.empty((0, *self._series.shape[1:]))
        cut = estimation_cut(len(history), self.refit_every)
        if self.train_on is not None:
            if self._trained_at is None:
                from moe_trace import trace

                self._train(block_means(trace.load(self.train_on).proportions(), self.block))
                self._trained_at = -1  # never re-trained
        elif cut != self._trained_at:
            self._train(block_means(history[:cut], self.block))
            self._trained_at = cut

    def _windows(self, series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scaled training windows ``[n, context, 1]`` and next-block targets ``[n]`` from ``[blocks, L, E]``."""
        flat = series.reshape(len(series), -1).T  # [series, blocks]
        n_experts = series.shape[-1]
        n_pos = flat.shape[1] - self.context
        if n_pos < 1:
            return np.empty((0, self.context, 1)), np.empty(0)
        idx = np.arange(self.context + 1)[None, :] + np.arange(n_pos)[:, None]  # [positions, context + 1]
        windows = flat[:, idx].reshape(-1, self.context + 1)  # [series * positions, context + 1]
        level = windows[:, :-1].mean(axis=1, keepdims=True)
        scaled = (windows - level) * n_experts
        return scaled[:, :-1, None], scaled[:, -1]

    def _train(self, series: np.ndarray) -> None:
        import torch

        with one_thread():
            self._train_net(series, torch)

    def _train_net(self, series: np.ndarray, torch) -> None:
        torch.manual_seed(self.seed)
        inputs, targets = self._windows(series)
        rng = np.random.default_rng(self.seed)
        if len(inputs) > self.max_windows:
            keep = rng.choice(len(inputs), self.max_windows, replace=False)
            inputs, targets = inputs[keep], targets[keep]
        self._net = _Net(self.hidden)
        if len(inputs) == 0:
            self._net = None  # too little history: hold the last block mean
            return
        x = torch.as_tensor(inputs, dtype=torch.float32)
        y = torch.as_tensor(targets, dtype=torch.float32)
        optimizer = torch.optim.Adam(self._net.parameters(), lr=3e-3)
        for _ in range(self.epochs):
            for batch in torch.randperm(len(x)).split(256):
                loss = torch.nn.functional.mse_loss(self._net(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def _predict(self, horizon: int) -> np.ndarray:
        import torch

        n_blocks = -(-horizon // self.block)
        if len(self._forecast) >= n_blocks:
            return repeat_blocks(self._forecast[:n_blocks], self.block, horizon)
        n, n_layers, n_experts = self._series.shape
        forecast = np.broadcast_to(self._series[-1], (n_blocks, n_layers, n_experts)).copy()
        if self._net is not None and n >= self.context:
            recent = self._series[-self.context:].reshape(self.context, -1).T.copy()  # [series, context]
            with torch.no_grad(), one_thread():
                for k in range(n_blocks):
                    level = recent.mean(axis=1, keepdims=True)
                    x = torch.as_tensor((recent - level) * n_experts, dtype=torch.float32)[..., None]
                    step = level[:, 0] + self._net(x).numpy() / n_experts
                    forecast[k] = step.reshape(n_layers, n_experts)
                    recent = np.concatenate([recent[:, 1:], step[:, None]], axis=1)
        self._forecast = forecast
        return repeat_blocks(forecast, self.block, horizon)


def _Net(hidden: int):
    """LSTM over a window of scaled block means -> the next one (built lazily: torch is imported here)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(1, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Minus the response to a flat window: a load that has not moved is forecast to stay put.
            out, _ = self.lstm(torch.cat([x, torch.zeros_like(x[:1])]))
            deviation = self.head(out[:, -1]).squeeze(-1)
            return deviation[:-1] - deviation[-1]

    return Net()
