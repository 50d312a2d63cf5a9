"""Expert-load predictors, the evaluation protocol and phase classification.

``predictors.get(name, **params)`` builds a predictor by name; ``predictors.available()`` lists them.
Imports no torch (the LSTM imports it when fitted) and reads traces only through ``moe_trace.trace``.
"""

from predictors import arima, auto, averages, linear, lstm  # noqa: F401  (importing a predictor module registers it)
from predictors.base import Predictor, available, from_spec, get, register, split_specs, to_proportions

__all__ = ["Predictor", "available", "from_spec", "get", "register", "split_specs", "to_proportions"]
