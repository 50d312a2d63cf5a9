"""predictors.phases: the stable-phase start of synthetic traces with a known switch."""

import json
from pathlib import Path

import numpy as np
import pytest

from moe_trace import synth
from predictors import phases

TOLERANCE = 300  # steps; benchmarks/results/phase_detection.json: mean error 49 steps, at most 179


def _p(**kw):
    counts, _ = synth.generate(layers=3, experts=16, **kw)
    return counts / counts.sum(axis=2, keepdims=True)


@pytest.mark.parametrize(("switch", "drift", "seed"), [(1500, 0.5, 0), (2750, 0.2, 1), (4321, 1.0, 2)])
def test_detects_a_known_switch_within_tolerance(switch, drift, seed):
    starts = phases.stable_from(_p(steps=7000, switch_step=switch, drift=drift, seed=seed))
    assert all(s is not None and abs(s - switch) <= TOLERANCE for s in starts), starts


def test_stable_from_the_start_without_a_transient():
    assert phases.stable_from(_p(steps=4000, switch_step=None, seed=3)) == [0, 0, 0]


def test_never_stable_while_the_load_keeps_moving():
    assert phases.stable_from(_p(steps=4000, switch_step=4000, seed=4)) == [None, None, None]


def test_movement_is_in_noise_units():
    p = _p(steps=6000, switch_step=None, seed=5)
    stat = phases.movement(p)
    assert abs(np.median(stat) - 1.0) < 0.15
    # by default 100-step blocks 5 blocks apart: the rule's defaults, which the online phase policy relies on
    np.testing.assert_array_equal(stat, phases.movement(p, block=phases.DEFAULTS["block"], lag=phases.DEFAULTS["lag"]))


def _switch(steps: int, at: int) -> np.ndarray:
    """One layer of two experts: load 0.7 / 0.3 until step ``at``, then 0.5 / 0.5, with a +-0.01 wobble every step
    (so that blocks of 10 steps have exact means and the same small variance)."""
    p = np.zeros((steps, 1, 2))
    p[:, 0, 0] = np.where(np.arange(steps) < at, 0.7, 0.5) + np.where(np.arange(steps) % 2, 0.01, -0.01)
    p[:, 0, 1] = 1 - p[:, 0, 0]
    return p


@pytest.mark.parametrize("lag", [3, 5])
def test_a_clean_switch_is_stable_from_its_step_by_hand(lag):
    # Statistics k compare blocks k and k + lag: quiet from k = 8 on, so stable from step 80 whatever the lag,
    # and the quiet run lasts to the trace's end: 200 - 80 = 120 steps.
    rule = dict(block=10, lag=lag, threshold=1.5, penalty=2.0)
    assert phases.stable_from(_switch(200, at=80), **rule, min_stable=120) == [80]
    assert phases.stable_from(_switch(200, at=80), **rule, min_stable=121) == [None]


def test_four_statistics_are_enough_and_three_are_not():
    # 5 blocks of 10 steps at lag 1: 4 statistics, all quiet, for 50 steps
    assert phases.stable_from(_switch(50, at=0), block=10, lag=1, min_stable=50) == [0]
    assert phases.stable_from(_switch(40, at=0), block=10, lag=1, min_stable=1) == [None]


def test_the_committed_phase_detection_figures_are_what_the_rule_gives():
    """benchmarks/results/phase_detection.json (README's phase-detection table) holds the rule's answers on seeded
    synthetic traces: a third of its cases, and its traces without a switch and with one at the end, again."""
    result = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "phase_detection.json").read_text())
    shape = result["trace"]

    def answer(**kw):
        counts, _ = synth.generate(layers=shape["layers"], experts=shape["experts"], **kw)
        return phases.stable_from(counts / counts.sum(axis=2, keepdims=True))

    after = shape["steps_after_switch"]
    for case in result["cases"][::3]:
        found = answer(steps=case["switch_step"] + after, switch_step=case["switch_step"], drift=case["drift"],
                       seed=case["seed"])
        assert found == case["stable_from"], case
    for seed, no_switch, at_end in zip(shape["seeds"][:2], result["no_switch"], result["switch_at_end"], strict=False):
        assert answer(steps=after, switch_step=None, seed=seed) == no_switch
        assert answer(steps=after, switch_step=after, seed=seed) == at_end


def test_parameters_scale_with_short_traces_by_hand():
    assert phases.parameters_for(phases.SHORT_TRACE) == phases.parameters_for(5000) == phases.DEFAULTS
    assert phases.parameters_for(1999) == {**phases.DEFAULTS, "block": 99, "min_stable": 999}
    assert phases.parameters_for(1000) == {**phases.DEFAULTS, "block": 50, "min_stable": 500}
    assert phases.parameters_for(150) == {**phases.DEFAULTS, "block": 10, "min_stable": 75}  # blocks of 10 at least
    assert phases.parameters_for(1) == {**phases.DEFAULTS, "block": 10, "min_stable": 1}


# Two layers of two experts, blocks of 2 steps (the 7th step is not a whole block): block means 0.5, 0.6, 0.8 of
# expert 0 in layer 0 (expert 1 mirrors it), within-block variances 0.02, 0.005, 0.08 (median 0.02); layer 1
# constant but for its last block (median variance 0: no movement).
HAND = np.zeros((7, 2, 2))
HAND[:, 0, 0] = [0.4, 0.6, 0.55, 0.65, 0.6, 1.0, 0.99]
HAND[:, 1, 0] = [0.5, 0.5, 0.5, 0.5, 0.6, 0.4, 0.5]
HAND[:, :, 1] = 1 - HAND[:, :, 0]
NOISE = 2 * np.sqrt(4 * 0.02 / (np.pi * 2))  # sum over the two experts of sqrt(4 v / (pi block))


def test_movement_by_hand():
    np.testing.assert_allclose(phases.movement(HAND, block=2, lag=1), [[0.2 / NOISE, 0.0], [0.4 / NOISE, 0.0]])
    np.testing.assert_allclose(phases.movement(HAND, block=2, lag=2), [[0.6 / NOISE, 0.0]])
    assert phases.movement(HAND, block=2, lag=3).shape == (0, 2)  # three blocks: nothing lag 3 blocks back
    assert phases.movement(np.full((7, 2, 3), 1 / 3), block=2, lag=3).shape == (0, 2)  # [statistics, layers]


def test_distance_to_quiet_by_hand():
    # the mean statistic over the last min_stable // block statistics, at least one
    np.testing.assert_allclose(phases.distance_to_quiet(HAND, block=2, lag=1, min_stable=1), [0.4 / NOISE, 0.0])
    np.testing.assert_allclose(phases.distance_to_quiet(HAND, block=2, lag=1, min_stable=5), [0.3 / NOISE, 0.0])
    assert np.isnan(phases.distance_to_quiet(HAND, block=2, lag=3)).all()
    assert phases.distance_to_quiet(np.full((7, 2, 3), 1 / 3), block=2, lag=3).shape == (2,)  # one per layer


def test_quiet_start_by_hand():
    stat = np.array([5.0, 4.0, 1.0, 1.5, 1.0, 1.5])  # statistics k = 0..5 of blocks of 100, lag 5
    # The last segment [2, 6) (mean 1.25) is quiet: from block 2 to the end of block 5 + 5, 900 steps.
    assert phases._quiet_start(stat, [2, 6], threshold=1.5, block=100, lag=5, min_stable=900) == 200
    assert phases._quiet_start(stat, [2, 6], threshold=1.5, block=100, lag=5, min_stable=901) is None
    assert phases._quiet_start(stat, [2, 4, 6], threshold=1.5, block=100, lag=5, min_stable=100) == 200
    assert phases._quiet_start(stat, [2, 4, 6], threshold=1.25, block=100, lag=5, min_stable=100) is None
    assert phases._quiet_start(stat, [1, 6], threshold=1.5, block=100, lag=5, min_stable=100) is None  # mean 1.8
    assert phases._quiet_start(stat, [1, 6], threshold=1.81, block=10, lag=5, min_stable=100) == 10
