"""Predictors on series with known answers, the metrics against hand-computed values, the protocol."""

import inspect
import subprocess
import sys

import numpy as np
import pytest

import predictors
from moe_trace import synth
from predictors import evaluate
from predictors.base import Predictor

FAST = [s for s in predictors.available() if s != "lstm"]  # the LSTM has its own test file


def _line(steps: int, start=(0.3, 0.7), slope=(1e-4, -1e-4)) -> np.ndarray:
    t = np.arange(steps)[:, None]
    return np.asarray(start) + t * np.asarray(slope)


def _ar1(steps: int, phi: float, mean: float = 0.5, std: float = 0.02, seed: int = 0) -> np.ndarray:
    """Two experts' proportions ``[x, 1 - x]`` with ``x`` an AR(1) around ``mean``."""
    rng = np.random.default_rng(seed)
    x = np.empty(steps)
    x[0] = mean
    for t in range(1, steps):
        x[t] = mean + phi * (x[t - 1] - mean) + rng.normal(0, std)
    return np.stack([x, 1 - x], axis=1)


@pytest.mark.parametrize("name", FAST)
def test_forecasts_are_proportions_of_the_right_shape(name):
    history = np.random.default_rng(0).dirichlet(np.ones(5), size=(600, 3))
    forecast = predictors.get(name).fit(history).predict(70)
    assert forecast.shape == (70, 3, 5) and (forecast >= 0).all()
    np.testing.assert_allclose(forecast.sum(axis=-1), 1.0)
    assert predictors.get(name).fit(history[:, 0]).predict(4).shape == (4, 5)


@pytest.mark.parametrize("name", FAST)
def test_a_constant_load_is_forecast_exactly(name):
    level = np.array([0.1, 0.2, 0.3, 0.4])
    history = np.broadcast_to(level, (800, 4)) + 0.0
    np.testing.assert_allclose(predictors.get(name).fit(history).predict(50), np.broadcast_to(level, (50, 4)),
                               atol=1e-6)


def test_sliding_window_and_ema_by_hand():
    history = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(predictors.get("sw_avg", window=2).fit(history).predict(1), [[0.25, 0.75]])
    w = np.array([0.25, 0.5, 1.0])  # halflife 1: weights halve per step back
    expected = (w[:, None] * history).sum(axis=0) / w.sum()
    np.testing.assert_allclose(predictors.get("ema", halflife=1).fit(history).predict(2), [expected, expected])


@pytest.mark.parametrize("spec", ["linear:window=3000", "auto"])
def test_a_linear_drift_is_extrapolated(spec):
    history = _line(3000)
    truth = _line(3400)[3000:]
    np.testing.assert_allclose(predictors.from_spec(spec).fit(history).predict(400), truth, atol=1e-9)


def test_autoregressive_predictors_recover_an_ar1_process():
    phi, mean, h = 0.8, 0.5, 5
    history = _ar1(3000, phi, mean)
    last = history[-1, 0]
    truth = mean + phi ** np.arange(1, h + 1) * (last - mean)  # the optimal forecast of x
    for spec in ["arima:order=(1,0,0):block=1:history=3000", "linear:window=3000:lags=1"]:
        forecast = predictors.from_spec(spec).fit(history).predict(h)[:, 0]
        np.testing.assert_allclose(forecast, truth, atol=0.1 * abs(last - mean) + 2e-3, err_msg=spec)


def test_arima_chooses_an_order_by_information_criterion():
    model = predictors.get("arima", block=1, history=2000, orders=((0, 1, 1), (1, 0, 0))).fit(_ar1(2000, 0.8))
    assert model._orders == [(1, 0, 0)]


def test_auto_blend_weights_sum_to_one_and_a_cold_blend_is_the_single_best_candidate():
    history = _ar1(3000, 0.95, std=0.01)
    blend = predictors.get("auto").fit(history)
    weights = blend._weights(500)
    np.testing.assert_allclose(weights.sum(axis=0), 1.0)
    assert (weights >= 0).all()
    pick = predictors.get("auto", temperature=1e-9).fit(history)
    best = pick._weights(500)
    assert set(np.unique(best)) == {0.0, 1.0}  # one-hot at the least backtest score
    grid = (len(pick.windows), len(pick.damping), len(pick.reversion))
    wi, ki, ri = np.unravel_index(best[:, 0].argmax(), grid)
    window, damping, half_life = pick.windows[wi], pick.damping[ki], pick.reversion[ri]
    t = np.arange(len(history) - window, len(history))
    slope = np.polyfit(t, history[-window:], 1)[0]  # the window's least-squares slope per expert
    j = np.arange(500)[:, None]
    level = history[-window:].mean(axis=0) + damping * slope * (len(history) - t.mean())  # at the first step
    uniform = 1 / history.shape[-1]
    reference = uniform + (level - uniform + damping * slope * j) * 0.5 ** (j / half_life)
    np.testing.assert_allclose(pick.predict(500), reference, atol=1e-9)


def test_auto_blend_is_no_worse_than_its_single_pick_on_a_noisy_drift(small_trace):
    errors = {}
    for spec in ["auto", "auto:temperature=1e-9"]:
        scores = evaluate.evaluate(small_trace, spec, [400], stride=100, min_history=400)[400]
        errors[spec] = scores.mean_wape.mean()
    assert errors["auto"] <= errors["auto:temperature=1e-9"]


def test_metrics_by_hand():
    actual = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])  # 2 steps, 1 layer, 2 experts
    forecast = np.array([[[0.6, 0.4]], [[0.6, 0.4]]])
    np.testing.assert_allclose(evaluate.step_wape(forecast, actual), [(0.2 + 0.8) / 2])
    np.testing.assert_allclose(evaluate.step_floor(actual), [(0.5 + 0.5) / 2])  # oracle: mean [0.75, 0.25]
    np.testing.assert_allclose(evaluate.mean_wape(forecast, actual), [0.15 + 0.15])
    assert evaluate.origins(3000, 1000, 250, 1000).tolist() == [1000, 1250, 1500, 1750, 2000]


def test_metrics_by_hand_where_mean_median_and_sum_differ():
    # 3 steps, 2 layers, 2 experts. Layer 0's load on expert 0 is x = [0.1, 0.2, 0.9] (mean 0.4, median 0.2,
    # sum 1.2), forecast f = [0.0, 0.25, 0.65] (mean 0.3, median 0.25, sum 0.9); expert 1 holds the rest, so
    # every sum over experts is twice expert 0's error. Layer 1 is forecast exactly.
    x, f = np.array([0.1, 0.2, 0.9]), np.array([0.0, 0.25, 0.65])
    actual = np.stack([np.stack([x, 1 - x], axis=-1), np.full((3, 2), 0.5)], axis=1)
    forecast = np.stack([np.stack([f, 1 - f], axis=-1), np.full((3, 2), 0.5)], axis=1)
    # step errors 2 |f - x| = [0.2, 0.1, 0.5]: their mean (not median 0.2, not sum 0.8)
    np.testing.assert_allclose(evaluate.step_wape(forecast, actual), [0.8 / 3, 0.0], atol=1e-12)
    # the oracle predicts the horizon mean 0.4: 2 |x - 0.4| = [0.6, 0.4, 1.0], mean 2/3 (the median 0.2 gives 0.533)
    np.testing.assert_allclose(evaluate.step_floor(actual), [2 / 3, 0.0], atol=1e-12)
    # 2 |mean f - mean x| = 2 |0.3 - 0.4| (medians give 0.1, sums 0.6)
    np.testing.assert_allclose(evaluate.mean_wape(forecast, actual), [0.2, 0.0], atol=1e-12)
    # one layer as [steps, experts]: the same figures, as scalars
    assert evaluate.step_wape(forecast[:, 0], actual[:, 0]) == pytest.approx(0.8 / 3)
    assert evaluate.step_floor(actual[:, 0]) == pytest.approx(2 / 3)
    assert evaluate.mean_wape(forecast[:, 0], actual[:, 0]) == pytest.approx(0.2)


class _Spy(Predictor):
    """Forecasts the true future of ``series`` from where its history ends, and records every history it saw."""

    name = "spy"

    def __init__(self, series: np.ndarray):
        self.series, self.seen, self.asked = series, [], []

    def _fit(self, history):
        self.seen.append(history.copy())

    def _predict(self, horizon):
        start = len(self.seen[-1])
        self.asked.append((start, horizon))
        return self.series[start: start + horizon]


@pytest.mark.parametrize("stride,min_history", [(7, 5), (1, 1)])
def test_a_predictor_sees_exactly_the_steps_before_each_origin(monkeypatch, stride, min_history):
    # Every step's proportions are distinct, so a history identifies the steps it holds.
    steps = 60
    series = np.random.default_rng(0).dirichlet(np.ones(3), size=(steps, 2))
    spy = _Spy(series)
    monkeypatch.setattr(evaluate, "from_spec", lambda spec: spy)
    horizons = [1, 4, 9]
    scores = evaluate.evaluate(series, "spy", horizons, stride=stride, min_history=min_history, workers=1)
    expected = evaluate.origins(steps, min(horizons), stride, min_history)
    assert [len(h) for h in spy.seen] == expected.tolist()  # one fit per origin, on steps [0, t0)
    for history in spy.seen:
        np.testing.assert_array_equal(history, series[:len(history)])
    assert sorted(spy.asked) == sorted((t0, h) for t0 in expected for h in horizons if t0 + h <= steps)
    for h in horizons:
        s = scores[h]
        np.testing.assert_array_equal(s.origins, evaluate.origins(steps, h, stride, min_history))
        # Forecasting the true future from t0 is exact only if the scored steps are [t0, t0 + h).
        np.testing.assert_allclose(s.step_wape, 0.0, atol=1e-12)
        np.testing.assert_allclose(s.mean_wape, 0.0, atol=1e-12)
        for t0, floor in zip(s.origins, s.step_floor, strict=True):
            np.testing.assert_allclose(floor, evaluate.step_floor(series[t0: t0 + h]))


def test_the_protocol_defaults_are_designs():
    # DESIGN.md: origins every 250 steps from step 1000, in the library (benchmarks call it) as on the command line.
    for function in (evaluate.origins, evaluate.evaluate):
        params = inspect.signature(function).parameters
        assert (params["stride"].default, params["min_history"].default) == (250, 1000), function.__name__


def test_records_split_origins_by_phase():
    s = evaluate.Scores(origins=np.array([100, 200, 300]), step_wape=np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                        step_floor=np.ones((3, 2)), mean_wape=np.zeros((3, 2)))
    rows = {(r["phase"], r["layer"]): r for r in evaluate.records("x", {10: s}, [200, None], per_layer=True)}
    assert rows[("all", "all")]["step_wape"] == pytest.approx(3.5)
    assert rows[("stable", "all")]["step_wape"] == pytest.approx(4.0)  # layer 0 at origins 200, 300
    assert rows[("stable", "all")]["n_origins"] == 2
    assert rows[("transient", "all")]["step_wape"] == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert rows[("transient", 1)]["step_wape"] == pytest.approx(4.0)
    assert ("stable", 1) not in rows
    assert {r["layer"] for r in evaluate.records("x", {10: s}, [200, None])} == {"all"}  # per layer on request
    # A layer without origins in a phase does not hide the next layer's.
    rows = {(r["phase"], r["layer"]) for r in evaluate.records("x", {10: s}, [None, 200], per_layer=True)}
    assert ("stable", 0) not in rows and ("stable", 1) in rows


@pytest.fixture(scope="module")
def small_trace():
    counts, _ = synth.generate(layers=2, experts=6, steps=2400, tokens_per_step=2048, seq_len=256,
                               switch_step=800, seed=11)
    return counts / counts.sum(axis=2, keepdims=True)


def test_no_predictor_beats_the_floor_on_average(small_trace):
    specs = [s for s in FAST if s != "arima"] + [
        "arima:order=(1,0,1):block=20:refit_every=800", "sw_avg:window=50", "linear:window=300:block=20:lags=2"]
    for spec in specs:
        scores = evaluate.evaluate(small_trace, spec, [200, 400], stride=100, min_history=400)
        for h, s in scores.items():
            assert s.step_wape.mean() >= s.step_floor.mean(), (spec, h)
            assert len(s.origins) == len(evaluate.origins(2400, h, 100, 400))


def test_a_horizon_longer_than_any_origin_allows_has_no_scores(small_trace):
    # 2400 steps, origins from 2000: the 300-step horizon fits once, the 1000-step one never (and does not crash)
    scores = evaluate.evaluate(small_trace, "sw_avg:window=50", [300, 1000], stride=200, min_history=2000, workers=1)
    assert scores[300].origins.tolist() == [2000]
    empty = scores[1000]
    assert empty.origins.dtype == np.int64 and empty.origins.shape == (0,)
    assert empty.step_wape.shape == empty.step_floor.shape == empty.mean_wape.shape == (0, 2)  # [origins, layers]


def test_origins_refuse_empty_steps():
    for stride, min_history, horizon in ((0, 10, 10), (10, 0, 10), (10, 10, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            evaluate.origins(100, horizon, stride, min_history)


def test_processes_give_the_same_scores_as_one(small_trace):
    spec = "arima:order=(1,0,0):block=20:history=1000"
    serial = evaluate.evaluate(small_trace, spec, [400], stride=200, min_history=400, workers=1)[400]
    parallel = evaluate.evaluate(small_trace, spec, [400], stride=200, min_history=400, workers=2)[400]
    np.testing.assert_array_equal(serial.origins, parallel.origins)
    np.testing.assert_allclose(serial.mean_wape, parallel.mean_wape, rtol=1e-6)


def test_registry_and_specs():
    assert {"sw_avg", "ema", "linear", "arima", "auto", "lstm"} <= set(predictors.available())
    assert predictors.from_spec("sw_avg:window=100").window == 100
    assert predictors.from_spec("arima:order=(2,0,1)").order == (2, 0, 1)
    assert predictors.split_specs("sw_avg,arima:order=(1,0,1),ema:halflife=5") == [
        "sw_avg", "arima:order=(1,0,1)", "ema:halflife=5"]
    for bad in ["nope", "sw_avg:window", "sw_avg:colour=3", "sw_avg:window=0"]:
        with pytest.raises(ValueError):
            predictors.from_spec(bad)
    with pytest.raises(ValueError):
        predictors.get("sw_avg").fit(np.ones(5))


def test_importing_predictors_does_not_import_torch():
    code = "import sys, predictors, predictors.evaluate, predictors.phases; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_versus_best_picks_the_best_candidate_per_horizon_and_phase():
    def row(predictor, horizon, phase, value, layer="all"):
        return dict(predictor=predictor, horizon=horizon, phase=phase, layer=layer, step_wape=1.0, step_floor=1.0,
                    mean_wape=value, n_origins=1)

    # Candidates' rows and a horizon without candidates come first: neither may end the search.
    rows = [row("w1", 10, "stable", 0.4), row("auto", 20, "stable", 0.5), row("auto", 10, "stable", 0.3),
            row("auto", 10, "transient", 0.8), row("w2", 10, "stable", 0.2), row("w1", 10, "transient", 1.0),
            row("w2", 10, "transient", 2.0), row("w2", 10, "stable", 0.01, layer=0)]  # per-layer rows ignored
    out = {(r["horizon"], r["phase"]): r for r in evaluate.versus_best(rows, "auto", ["w1", "w2"])}
    assert set(out) == {(10, "stable"), (10, "transient")}  # no candidate at horizon 20
    assert out[10, "stable"] == dict(horizon=10, phase="stable", ratio=pytest.approx(1.5), best="w2", value=0.3,
                                     best_value=0.2)
    assert out[10, "transient"] == dict(horizon=10, phase="transient", ratio=pytest.approx(0.8), best="w1",
                                        value=0.8, best_value=1.0)


def test_auto_follows_a_load_that_reverts_to_uniform():
    """A share decaying toward 1/E (what the load-balancing loss does): the pull beats windows and trends."""
    steps = np.arange(4000)
    share = 0.5 + 0.3 * 0.5 ** (steps / 1000)
    p = np.stack([share, 1 - share], axis=-1)[:, None, :]
    history, future = p[:3000], p[3000:]

    def horizon_mean_error(spec_kwargs: dict) -> float:
        forecast = predictors.get("auto", **spec_kwargs).fit(history).predict(1000)
        np.testing.assert_allclose(forecast.sum(axis=-1), 1.0)
        return float(np.abs(forecast.mean(axis=0) - future.mean(axis=0)).sum())

    assert horizon_mean_error({}) < 0.2 * horizon_mean_error({"reversion": (float("inf"),)})


def test_auto_needs_the_no_pull_candidate():
    with pytest.raises(ValueError):
        predictors.get("auto", reversion=(1000.0,))


@pytest.mark.parametrize("name", predictors.available())
@pytest.mark.parametrize("steps", [1, 2, 3, 150, 250, 399])
@pytest.mark.parametrize("kind", ["noisy", "constant", "one-hot"])
def test_every_predictor_forecasts_from_a_short_or_constant_history(name, steps, kind):
    """However little (or flat) the history, a forecast of proportions comes back, never an exception."""
    if kind == "noisy":
        history = np.random.default_rng(steps).dirichlet(np.ones(4), size=(steps, 2))
    elif kind == "constant":
        history = np.broadcast_to([0.1, 0.2, 0.3, 0.4], (steps, 2, 4)) + 0.0
    else:  # one expert takes every token: the degenerate series statsmodels dislikes most
        history = np.broadcast_to([1.0, 0.0, 0.0, 0.0], (steps, 2, 4)) + 0.0
    forecast = predictors.get(name).fit(history).predict(120)
    assert forecast.shape == (120, 2, 4) and np.isfinite(forecast).all()
    np.testing.assert_allclose(forecast.sum(axis=-1), 1.0)
