"""The LSTM predictor (torch, CPU): proportions out, a constant load held, training on another run's trace."""

import numpy as np

import predictors
from moe_trace import synth, trace


def _p(steps, seed):
    counts, _ = synth.generate(layers=2, experts=4, steps=steps, tokens_per_step=2048, seq_len=256,
                               switch_step=None, seed=seed)
    return counts / counts.sum(axis=2, keepdims=True)


def test_forecasts_are_proportions_and_a_constant_load_is_held():
    model = predictors.get("lstm", block=20, context=8, hidden=8, epochs=1).fit(_p(1200, 0))
    forecast = model.predict(90)
    assert forecast.shape == (90, 2, 4) and (forecast >= 0).all()
    np.testing.assert_allclose(forecast.sum(axis=-1), 1.0)
    level = np.array([0.1, 0.2, 0.3, 0.4])
    constant = predictors.get("lstm", block=20, context=8, hidden=8, epochs=1).fit(np.tile(level, (600, 1)))
    np.testing.assert_allclose(constant.predict(40), np.tile(level, (40, 1)), atol=0.02)


def test_trained_on_another_trace_forecasts_near_the_stable_mean(tmp_path):
    counts, meta = synth.generate(layers=2, experts=4, steps=3000, tokens_per_step=2048, seq_len=256,
                                  switch_step=None, seed=1)
    path = trace.write(tmp_path / "other", counts, meta)
    history = _p(3000, 2)
    model = predictors.get("lstm", block=50, context=10, hidden=8, epochs=2, train_on=str(path)).fit(history)
    forecast = model.predict(500).mean(axis=0)
    target = history[-1000:].mean(axis=0)
    assert np.abs(forecast - target).sum(axis=-1).max() < 0.1
