"""The interface every load predictor follows, and the registry that names them.

A predictor is fitted on a history of load proportions and forecasts the next ``horizon`` steps,
scikit-learn style::

    p_hat = predictors.get("sw_avg", window=1000).fit(history).predict(horizon)

``history`` is ``[steps, experts]`` or ``[steps, layers, experts]`` (float, rows summing to 1); the forecast
has the same trailing shape, ``[horizon, experts]`` or ``[horizon, layers, experts]``, and is a proportion:
non-negative and summing to one per step and layer. Subclasses implement ``_fit`` and ``_predict`` on the
3-D form only; this base class handles the 2-D form, validation and the final projection to proportions.
"""

from __future__ import annotations

import ast
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from moe_trace.trace import proportions

_REGISTRY: dict[str, type[Predictor]] = {}


class Predictor(ABC):
    """Base class: ``fit(history) -> self``, ``predict(horizon) -> proportions``."""

    name: ClassVar[str]
    # Fitting is expensive enough (many small model fits) to be worth spreading over processes.
    parallel: ClassVar[bool] = False

    def fit(self, history: np.ndarray) -> Predictor:
        history = np.asarray(history, dtype=np.float64)
        if history.ndim not in (2, 3) or history.shape[0] == 0 or history.shape[-1] == 0:
            raise ValueError(f"history must be [steps, experts] or [steps, layers, experts], got {history.shape}")
        self._squeeze = history.ndim == 2
        self._fit(history[:, None, :] if self._squeeze else history)
        self._fitted = True
        return self

    def predict(self, horizon: int) -> np.ndarray:
        if not getattr(self, "_fitted", False):
            raise RuntimeError(f"{type(self).__name__}.predict called before fit")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        forecast = to_proportions(self._predict(int(horizon)))
        return forecast[:, 0, :] if self._squeeze else forecast

    @abstractmethod
    def _fit(self, history: np.ndarray) -> None:
        """Fit on ``history[steps, layers, experts]``."""

    @abstractmethod
    def _predict(self, horizon: int) -> np.ndarray:
        """Forecast ``[horizon, layers, experts]`` (projected to proportions by the caller)."""

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def to_proportions(forecast: np.ndarray) -> np.ndarray:
    """Clip at zero and renormalise each ``[..., experts]`` row to sum to one (uniform where all clipped)."""
    return proportions(np.clip(forecast, 0.0, None))


def constant_forecast(level: np.ndarray, horizon: int) -> np.ndarray:
    """Repeat a ``[layers, experts]`` level over ``horizon`` steps (a read-only broadcast view)."""
    return np.broadcast_to(level, (horizon, *level.shape))


def register(name: str):
    """Class decorator: make a predictor available as ``predictors.get(name)``."""

    def decorate(cls: type[Predictor]) -> type[Predictor]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Names of all registered predictors."""
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> Predictor:
    """A new, unfitted predictor by registry name; ``params`` go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown predictor {name!r}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for predictor {name!r}: {e}") from None


def from_spec(spec: str) -> Predictor:
    """Build a predictor from a spec string ``name[:key=value[:key=value...]]``, e.g. ``sw_avg:window=100``.

    Values are Python literals (``ema:halflife=250``, ``arima:order=(2,0,1)``) or bare strings.
    """
    name, *pairs = spec.strip().split(":")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad predictor spec {spec!r}: expected name:key=value")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return get(name, **params)


def split_specs(text: str) -> list[str]:
    """Split a comma list of specs, keeping commas inside parentheses (``arima:order=(1,0,1),sw_avg``)."""
    return [s for s in re.split(r",(?![^()]*\))", text) if s.strip()]
