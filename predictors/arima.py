"""ARIMA (statsmodels), one model per (layer, expert) series, fitted on block means.

Per-step proportions are mostly noise (ANCHORS.md: ~16-20 % per step at 16k tokens), so each series is
averaged over blocks of ``block`` steps first: a fit then sees ``history / block`` points instead of
``history`` (100x fewer at the default) and costs ~10-40 ms instead of seconds, and a horizon of 1000-2000
steps is 10-20 block steps ahead. The block forecast is held for the steps of each block.

Cost control for evaluation, where one predictor is fitted at origin after origin: orders and parameters
are re-estimated only when the history crosses a multiple of ``refit_every`` steps (see
``series.estimation_cut``; ``0``: at every fit); in between, a fit only takes the new data, and the
forecast runs the Kalman filter over all of it with the last parameters (~2-3 ms a series).
With ``order=None`` the order is chosen per layer from ``orders`` by the information criterion
``criterion``, summed over the layer's ``select_series`` most variable experts.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from predictors.base import Predictor, register
from predictors.series import block_means, estimation_cut, one_thread, repeat_blocks

DEFAULT_ORDERS = ((1, 0, 0), (2, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1))


@register("arima")
class Arima(Predictor):
    """Per-series ARIMA on ``block``-step means of the last ``history`` steps."""

    parallel = True

    def __init__(self, order: tuple[int, int, int] | None = None, block: int = 100, history: int = 5000,
                 orders: tuple[tuple[int, int, int], ...] = DEFAULT_ORDERS, criterion: str = "aic",
                 select_series: int = 2, refit_every: int = 5000):
        if int(block) < 1 or int(history) < 2 * int(block) or criterion not in ("aic", "bic", "hqic"):
            raise ValueError("need block >= 1, history >= 2 * block and criterion in aic, bic, hqic")
        self.order = None if order is None else _order(order)
        self.block, self.history = int(block), int(history)
        self.orders = tuple(_order(o) for o in orders)
        self.criterion, self.select_series, self.refit_every = criterion, int(select_series), int(refit_every)
        self._estimated_at: int | None = None

    def _fit(self, history: np.ndarray) -> None:
        self._series = block_means(history, self.block, self.history)  # [n, layers, experts]
        self._forecast = np.empty((0, *self._series.shape[1:]))
        cut = estimation_cut(len(history), self.refit_every)
        if cut == self._estimated_at and self._params.shape == self._series.shape[1:]:
            return
        estimation = block_means(history[:cut], self.block, self.history)
        n_layers, n_experts = estimation.shape[1:]
        with _quiet_single_threaded():
            self._orders = [self.order or self._select_order(estimation[:, layer]) for layer in range(n_layers)]
            self._params = np.empty((n_layers, n_experts), dtype=object)
            for (layer, expert), _ in np.ndenumerate(self._params):
                y = estimation[:, layer, expert]
                if _estimable(y, self._orders[layer]):  # else: hold the last block mean
                    self._params[layer, expert] = _try(lambda y=y, o=self._orders[layer]: _model(y, o).fit(
                        cov_type="none", low_memory=True).params)
        self._estimated_at = cut

    def _select_order(self, layer_series: np.ndarray) -> tuple[int, int, int]:
        """The order from ``orders`` with the least summed criterion over the most variable experts.

        Orders a series is too short for are not tried; with none left, the simplest order is returned and
        ``_fit`` holds the last block mean (it applies the same test).
        """
        picks = np.argsort(layer_series.var(axis=0))[::-1][:self.select_series]
        candidates = [o for o in self.orders if all(_estimable(layer_series[:, e], o) for e in picks)]
        if not candidates:
            return min(self.orders, key=sum)
        scores = [sum(_try(lambda e=e, o=o: getattr(_model(layer_series[:, e], o).fit(cov_type="none",
                                                                                      low_memory=True),
                                                    self.criterion), default=np.inf) for e in picks)
                  for o in candidates]
        return candidates[int(np.argmin(scores))]

    def _predict(self, horizon: int) -> np.ndarray:
        n_blocks = -(-horizon // self.block)
        if len(self._forecast) < n_blocks:  # forecast once for the longest horizon asked
            forecast = np.broadcast_to(self._series[-1], (n_blocks, *self._series.shape[1:])).copy()
            # The Kalman filter over the series padded with missing values forecasts in the same pass.
            padding = np.full(n_blocks, np.nan)
            with _quiet_single_threaded():
                for (layer, expert), params in np.ndenumerate(self._params):
                    if params is not None:
                        padded = np.concatenate([self._series[:, layer, expert], padding])
                        filtered = _try(lambda y=padded, o=self._orders[layer], p=params: _model(y, o).filter(
                            p, cov_type="none").fittedvalues[-n_blocks:])
                        if filtered is not None:
                            forecast[:, layer, expert] = filtered
            self._forecast = forecast
        return repeat_blocks(self._forecast[:n_blocks], self.block, horizon)


def _order(value) -> tuple[int, int, int]:
    """An ARIMA order ``(p, d, q)`` of non-negative integers, or ValueError."""
    try:
        order = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        order = ()
    if len(order) != 3 or min(order) < 0:
        raise ValueError(f"an ARIMA order is (p, d, q) with p, d, q >= 0, got {value!r}")
    return order


def _estimable(y: np.ndarray, order: tuple[int, int, int]) -> bool:
    """Whether statsmodels can estimate ``order`` on ``y``: a few more points than parameters, and not constant
    (on fewer it fails inside its start-parameter search with errors other than its own)."""
    return len(y) > sum(order) + 2 and np.ptp(y) > 0


def _model(y: np.ndarray, order: tuple[int, int, int]):
    from statsmodels.tsa.arima.model import ARIMA

    return ARIMA(y, order=order, trend="c" if order[1] == 0 else "n")


def _try(compute, default=None):
    """``compute()``, or ``default`` where statsmodels gives up on a degenerate series."""
    try:
        return compute()
    except (np.linalg.LinAlgError, ValueError):
        return default


@contextmanager
def _quiet_single_threaded() -> Iterator[None]:
    """One BLAS thread (see ``one_thread``) and no statsmodels warnings: thousands of small fits chatter."""
    import statsmodels.tsa.arima.model  # noqa: F401  (its import adds "always" filters: import before ignoring)

    with warnings.catch_warnings(), one_thread():
        warnings.simplefilter("ignore")
        yield
