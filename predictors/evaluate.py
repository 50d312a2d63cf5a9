"""The evaluation protocol of DESIGN.md ("Figures and how they are defined"), vectorised over layers and experts.

Origins ``t0`` run every ``stride`` steps from ``min_history`` to ``steps - H``; at each, a predictor is fitted
on ``p[:t0]`` only and forecasts ``p[t0 : t0 + H]``. Per origin and layer three errors are recorded:

* ``step_wape``: mean over the H steps of ``sum_e |p_hat - p|``;
* ``step_floor``: the same for the hindsight oracle that predicts the actual mean of ``p`` over the horizon
  (no predictor beats it on average: the mean minimises the summed squared error, and in practice the L1 too);
* ``mean_wape``: ``sum_e |mean_h p_hat - mean_h p|``, the error of the horizon-mean load placement consumes.

They are then averaged over origins and layers per phase: an origin is in the stable phase of a layer if
``t0 >= stable_from[layer]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np

from predictors.base import Predictor, from_spec
from predictors.series import one_thread

METRICS = ("step_wape", "step_floor", "mean_wape")
PHASES = ("all", "transient", "stable")


def origins(n_steps: int, horizon: int, stride: int = 250, min_history: int = 1000) -> np.ndarray:
    """Forecast origins ``t0``: every ``stride`` steps from ``min_history`` while ``t0 + horizon <= n_steps``."""
    if stride < 1 or min_history < 1 or horizon < 1:
        raise ValueError("stride, min_history and horizon must be >= 1")
    return np.arange(min_history, n_steps - horizon + 1, stride, dtype=np.int64)


def step_wape(forecast: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Mean over steps (axis 0) of ``sum_e |forecast - actual|``: one value per layer, or a scalar for 2-D input."""
    return np.abs(forecast - actual).sum(axis=-1).mean(axis=0)


def step_floor(actual: np.ndarray) -> np.ndarray:
    """``step_wape`` of the hindsight oracle that predicts the actual horizon mean at every step."""
    return step_wape(actual.mean(axis=0), actual)


def mean_wape(forecast: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``sum_e |mean_h forecast - mean_h actual|`` per layer (scalar for 2-D input)."""
    return np.abs(forecast.mean(axis=0) - actual.mean(axis=0)).sum(axis=-1)


@dataclass
class Scores:
    """Per-origin, per-layer errors of one predictor at one horizon: each array is ``[origins, layers]``."""

    origins: np.ndarray
    step_wape: np.ndarray
    step_floor: np.ndarray
    mean_wape: np.ndarray


def score(predictor: Predictor, proportions: np.ndarray, horizons: Sequence[int], at: Iterable[int]
          ) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Fit once per origin in ``at`` (ascending) and score each horizon that fits in the trace.

    Returns ``{horizon: [(t0, [3, layers] errors), ...]}``. One predictor instance is fitted at successive
    origins, so a predictor with a warm start (ARIMA) may reuse its previous fit.
    """
    n_steps = len(proportions)
    out: dict[int, list[tuple[int, np.ndarray]]] = {h: [] for h in horizons}
    with one_thread():  # parallelism, where it pays, is over origins in processes
        for t0 in at:
            predictor.fit(proportions[:t0])
            for h in sorted(horizons, reverse=True):  # longest first: a predictor may reuse its longest forecast
                if t0 + h > n_steps:
                    continue
                actual = proportions[t0:t0 + h]
                forecast = predictor.predict(h)
                errors = np.stack([step_wape(forecast, actual), step_floor(actual), mean_wape(forecast, actual)])
                out[h].append((int(t0), errors))
    return out


_SHARED: dict[str, np.ndarray] = {}


def _score_in_worker(spec: str, horizons: Sequence[int], at: list[int]) -> dict[int, list[tuple[int, np.ndarray]]]:
    return score(from_spec(spec), _SHARED["proportions"], horizons, at)


def _set_shared(proportions: np.ndarray) -> None:
    _SHARED["proportions"] = proportions


def evaluate(proportions: np.ndarray, spec: str, horizons: Sequence[int], stride: int = 250,
             min_history: int = 1000, workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> dict[int, Scores]:
    """Run the protocol for one predictor spec (see :func:`predictors.from_spec`) at every horizon.

    Predictors marked ``parallel`` are fitted in ``workers`` processes (default: all cores), each taking
    contiguous runs of origins. ``progress(n)`` is called as ``n`` more origins are done.
    """
    if proportions.ndim != 3:
        raise ValueError(f"proportions must be [steps, layers, experts], got {proportions.shape}")
    predictor = from_spec(spec)  # validates the spec before any work
    all_origins = origins(len(proportions), min(horizons), stride, min_history)
    results: dict[int, list[tuple[int, np.ndarray]]] = {h: [] for h in horizons}

    def merge(part: dict[int, list[tuple[int, np.ndarray]]], n_done: int) -> None:
        for h, rows in part.items():
            results[h].extend(rows)
        if progress is not None:
            progress(n_done)

    workers = workers or os.cpu_count() or 1
    if predictor.parallel and workers > 1 and len(all_origins) > 1:
        # Two contiguous runs of origins per process: few enough that a warm-started model (ARIMA, LSTM)
        # re-estimates rarely, enough to balance the load and to show progress.
        chunks = [c.tolist() for c in np.array_split(all_origins, min(len(all_origins), 2 * workers)) if len(c)]
        with ProcessPoolExecutor(workers, initializer=_set_shared, initargs=(proportions,)) as pool:
            futures = {pool.submit(_score_in_worker, spec, horizons, c): len(c) for c in chunks}
            for future in as_completed(futures):
                merge(future.result(), futures[future])
    else:
        for t0 in all_origins:
            merge(score(predictor, proportions, horizons, [t0]), 1)

    scores = {}
    for h, rows in results.items():
        rows.sort(key=lambda r: r[0])
        errors = np.stack([e for _, e in rows]) if rows else np.empty((0, 3, proportions.shape[1]))
        scores[h] = Scores(np.array([t for t, _ in rows], dtype=np.int64), *errors.transpose(1, 0, 2))
    return scores


def phase_masks(origin_steps: np.ndarray, stable_from: Sequence[int | None]) -> dict[str, np.ndarray]:
    """Boolean ``[origins, layers]`` masks selecting each phase's (origin, layer) pairs."""
    starts = np.array([np.iinfo(np.int64).max if s is None else s for s in stable_from], dtype=np.int64)
    stable = origin_steps[:, None] >= starts[None, :]
    return {"all": np.ones_like(stable), "transient": ~stable, "stable": stable}


def records(spec: str, scores: dict[int, Scores], stable_from: Sequence[int | None],
            per_layer: bool = False) -> list[dict]:
    """DESIGN.md's JSON records ``{predictor, horizon, phase, layer, step_wape, step_floor, mean_wape, n_origins}``.

    Means are over the (origin, layer) pairs of a phase; ``n_origins`` counts the origins with at least one
    layer in the phase. Phases without origins are left out.
    """
    out = []
    for h, s in scores.items():
        for phase, mask in phase_masks(s.origins, stable_from).items():
            groups = [("all", mask)]
            if per_layer:
                groups += [(layer, _only_layer(mask, layer)) for layer in range(mask.shape[1])]
            for layer, m in groups:
                if not m.any():
                    continue
                out.append(dict(predictor=spec, horizon=int(h), phase=phase, layer=layer,
                                **{k: float(getattr(s, k)[m].mean()) for k in METRICS},
                                n_origins=int(m.any(axis=1).sum())))
    return out


def versus_best(rows: Iterable[Mapping[str, Any]], predictor: str, candidates: Iterable[str],
                metric: str = "mean_wape") -> list[dict[str, Any]]:
    """``predictor``'s ``metric`` over the best of ``candidates``, chosen in hindsight per horizon and phase.

    ``rows`` are :func:`records` (e.g. pooled from several ``moe-trace predict --json`` files of one trace and
    protocol); only the whole-model rows (``layer == "all"``) are used. With several windows of ``sw_avg`` as
    candidates this is the ratio to the best fixed window, an oracle no real run has; with one candidate it is
    a plain ratio. Returns ``{horizon, phase, ratio, best, value, best_value}`` for each (horizon, phase) where
    the predictor and at least one candidate have a row.
    """
    table = {(r["predictor"], r["horizon"], r["phase"]): r[metric] for r in rows if r["layer"] == "all"}
    candidates = list(candidates)
    out = []
    for (name, horizon, phase), value in table.items():
        if name != predictor:
            continue
        scored = [(table[c, horizon, phase], c) for c in candidates if (c, horizon, phase) in table]
        if not scored:
            continue
        best_value, best = min(scored)
        out.append(dict(horizon=horizon, phase=phase, ratio=value / best_value, best=best, value=value,
                        best_value=best_value))
    return out


def _only_layer(mask: np.ndarray, layer: int) -> np.ndarray:
    only = np.zeros_like(mask)
    only[:, layer] = mask[:, layer]
    return only
