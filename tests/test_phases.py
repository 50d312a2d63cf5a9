"""predictors.phases: the stable-phase start of synthetic traces with a known switch."""

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
    stat = phases.movement(_p(steps=6000, switch_step=None, seed=5))
    assert abs(np.median(stat) - 1.0) < 0.15
