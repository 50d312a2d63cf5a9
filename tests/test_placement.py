"""Planners and dispatcher: plans are valid, greedy is measured against the exact solver, tokens are conserved."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from moe_trace.errors import UsageError
from placement import planners
from placement.bounds import imbalance_lower_bound
from placement.dispatch import gpu_tokens, imbalance, water_fill
from placement.migration import align, arrivals
from placement.planners import PlacementError, Plan


def skewed_loads(layers: int, experts: int, seed: int, concentration: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(experts, concentration), size=layers) * 1e4


def makespan(loads: np.ndarray, plan: Plan, rule: str = "even") -> np.ndarray:
    """Per layer: the busiest GPU's load when each layer's mean loads are dispatched under ``plan``."""
    return gpu_tokens(loads[None], plan, rule)[0].max(axis=-1)


def assert_valid(plan: Plan, loads: np.ndarray, gpus: int, slots_per_gpu: int, n_replicas: int | None) -> None:
    """Shapes, every expert placed, replica counts equal to slot counts; ``n_replicas`` per layer if given."""
    layers, experts = loads.shape
    assert plan.slot_expert.shape == (layers, gpus * slots_per_gpu)
    assert plan.replicas.shape == (layers, experts)
    for row, replicas in zip(plan.slot_expert, plan.replicas, strict=True):
        hosted = row[row >= 0]
        assert n_replicas is None or len(hosted) == n_replicas
        np.testing.assert_array_equal(np.bincount(hosted, minlength=experts), replicas)  # counts consistent
    assert (plan.replicas >= 1).all()  # every expert placed
    assert (plan.replicas <= gpus).all()


@pytest.mark.parametrize("experts,gpus,redundant", [(16, 4, 0), (16, 4, 4), (16, 8, 8), (128, 32, 32),
                                                    (12, 5, 3), (16, 32, 32), (64, 8, 24)])
@pytest.mark.parametrize("method", ["contiguous", "greedy", "eplb"])
def test_plans_are_valid(method, experts, gpus, redundant):
    loads = skewed_loads(3, experts, seed=experts + gpus)
    slots = planners.slots_per_gpu_for(experts, gpus, redundant)
    plan = planners.plan(loads, gpus, redundant=redundant, method=method)
    assert_valid(plan, loads, gpus, slots, experts + redundant if method == "eplb" else experts)
    assert plan.slot_expert.dtype == plan.replicas.dtype == np.int64
    if method == "eplb":  # replicas of an expert sit on distinct GPUs
        assert (plan.slot_counts() <= 1).all()


def test_no_redundant_copies_unless_asked():
    loads = skewed_loads(2, 8, seed=1)
    for method, planner in planners.PLANNERS.items():
        unasked = planner(loads, 4, 2)
        np.testing.assert_array_equal(unasked.slot_expert, planner(loads, 4, 2, 0).slot_expert)
        assert (unasked.replicas == 1).all(), method
    assert planners.plan(loads, 4).slot_expert.shape == (2, 8)


def test_one_gpu_and_one_expert_are_plans_too():
    for method in ("contiguous", "greedy", "eplb", "exact"):
        np.testing.assert_array_equal(planners.plan(np.ones((2, 3)), gpus=1, method=method).slot_expert,
                                      [[0, 1, 2]] * 2)
        np.testing.assert_array_equal(planners.plan(np.ones((1, 1)), gpus=1, method=method).slot_expert, [[0]])


def test_contiguous_by_hand():
    # expert e on GPU e * gpus // experts (megablocks' sharding): 5 experts on 2 GPUs of 3 slots -> 3 + 2
    plan = planners.contiguous(np.ones((2, 5)), gpus=2, slots_per_gpu=3)
    np.testing.assert_array_equal(plan.slot_expert, [[0, 1, 2, 3, 4, -1]] * 2)
    np.testing.assert_array_equal(planners.contiguous(np.ones((1, 4)), 2, 2).slot_expert, [[0, 1, 2, 3]])


def test_even_slots_per_gpu_by_hand():
    assert planners.even_slots_per_gpu(16, 4, 0) == 4
    assert planners.even_slots_per_gpu(16, 4, 4) == 5
    assert planners.even_slots_per_gpu(3, 4, 1) == 1  # 4 copies of 3 experts, one per GPU
    assert planners.even_slots_per_gpu(4, 2, 4) == 4  # every expert on every GPU
    for experts, gpus, redundant, hint in ((16, 4, 1, "--redundant 0 or 4"), (16, 4, 6, "--redundant 4 or 8"),
                                           (3, 4, 0, "--redundant 1)")):
        with pytest.raises(PlacementError, match=re.escape(hint)):
            planners.even_slots_per_gpu(experts, gpus, redundant)
    with pytest.raises(PlacementError, match="at most 4"):
        planners.even_slots_per_gpu(4, 2, 6)


def test_pack_doubles_up_only_where_every_gpu_with_room_holds_the_expert():
    # Layer 0: a third copy of expert 1 on two GPUs must go where there is room (GPU 1, which holds it); layer 1
    # places its copies on distinct GPUs in the same round.
    loads = np.array([[1000.0, 300.0], [5.0, 5.0]])
    plan = planners.pack(loads, np.array([[1, 3], [2, 2]]), gpus=2, slots_per_gpu=2)
    np.testing.assert_array_equal(plan.slot_expert, [[0, 1, 1, 1], [0, 1, 0, 1]])


def test_exact_by_hand():
    # Fewer experts than GPUs: one GPU stays idle.
    np.testing.assert_array_equal(planners.exact(np.array([[3.0, 1.0]]), gpus=3, slots_per_gpu=1).replicas, [[1, 1]])
    # A spare slot copies the hot expert onto both GPUs: 11 tokens split 5.5 / 5.5 under the balanced rule.
    for scale in (1.0, 1e-9, 1e9):  # the optimum does not depend on the loads' unit
        loads = np.array([[10.0, 1.0], [1.0, 10.0]]) * scale
        plan = planners.exact(loads, gpus=2, slots_per_gpu=2, redundant=1)
        np.testing.assert_array_equal(plan.replicas, [[2, 1], [1, 2]])
        assert plan.slot_expert.dtype == plan.replicas.dtype == np.int64
        np.testing.assert_allclose(makespan(loads, plan, "balanced"), [5.5 * scale] * 2)
        loads = skewed_loads(2, 6, seed=2, concentration=1.0) * scale
        np.testing.assert_allclose(makespan(loads, planners.exact(loads, 2, 3)) / scale,
                                   [brute_force_makespan(load / scale, 2, 3) for load in loads], rtol=1e-6)


def test_eplb_replicates_the_heaviest_expert():
    loads = np.array([[100.0, 10, 10, 10, 10, 10, 10, 10]])
    plan = planners.eplb(loads, gpus=4, slots_per_gpu=3, redundant=4)
    assert plan.replicas[0, 0] == 4  # 100 / 4 = 25 per replica is still the heaviest; the rest keep one
    assert makespan(loads, plan)[0] == pytest.approx(45.0)  # 25 + 2 x 10 on each GPU


def brute_force_makespan(load: np.ndarray, gpus: int, slots_per_gpu: int) -> float:
    best = np.inf
    for assignment in itertools.product(range(gpus), repeat=len(load)):
        per_gpu = np.bincount(assignment, minlength=gpus)
        if per_gpu.max() <= slots_per_gpu:
            best = min(best, np.bincount(assignment, weights=load, minlength=gpus).max())
    return best


@pytest.mark.parametrize("experts,gpus,slots", [(6, 3, 2), (7, 3, 3), (8, 2, 8)])
def test_exact_solver_matches_brute_force_and_bounds_greedy(experts, gpus, slots):
    loads = skewed_loads(4, experts, seed=experts * gpus, concentration=1.0)
    exact = makespan(loads, planners.exact(loads, gpus, slots))
    greedy = makespan(loads, planners.greedy(loads, gpus, slots))
    for layer, load in enumerate(loads):
        assert exact[layer] == pytest.approx(brute_force_makespan(load, gpus, slots), rel=1e-6)
    assert (greedy >= exact - 1e-6).all()


def test_greedy_within_graham_bound_of_exact():
    # Without a binding slot limit, longest-first packing is within 4/3 - 1/(3 gpus) of optimal (Graham 1969).
    gpus, experts = 3, 9
    loads = skewed_loads(6, experts, seed=7, concentration=2.0)
    exact = makespan(loads, planners.exact(loads, gpus, experts))
    greedy = makespan(loads, planners.greedy(loads, gpus, experts))
    assert (greedy <= (4 / 3 - 1 / (3 * gpus)) * exact + 1e-6).all()


def test_exact_with_replicas_is_a_lower_bound_for_eplb():
    loads = skewed_loads(3, 6, seed=3, concentration=0.3)
    exact = planners.exact(loads, gpus=3, slots_per_gpu=3, redundant=3)
    assert_valid(exact, loads, 3, 3, n_replicas=None)
    assert (exact.replicas.sum(axis=1) <= 6 + 3).all()
    # The solver's split of tokens over replicas is free; its optimum is the total load over GPUs when it can
    # level them, which every planner + dispatcher pair is at least.
    eplb = planners.eplb(loads, gpus=3, slots_per_gpu=3, redundant=3)
    for rule in ("even", "balanced"):
        assert (makespan(loads, eplb, rule) >= loads.sum(axis=1) / 3 - 1e-6).all()
    assert (makespan(loads, exact, "balanced") <= makespan(loads, planners.greedy(loads, 3, 3), "even") + 1e-6).all()


def test_water_fill_levels_the_lowest_bins():
    level = np.array([[5.0, 1.0, 3.0, 10.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 9.0, 9.0]])
    amount = np.array([6.0, 8.0, 0.0])
    share = water_fill(level, amount)
    assert (share >= 0).all()
    np.testing.assert_allclose(share.sum(axis=1), amount)
    np.testing.assert_allclose(level[0] + share[0], [5.0, 5.0, 5.0, 10.0])
    np.testing.assert_allclose(level[1] + share[1], [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_allclose(share[2], 0.0)


def test_water_fill_along_any_axis_matches_the_last_axis():
    rng = np.random.default_rng(3)
    for bins in (1, 2, 3, 4, 7):
        level, amount = rng.integers(0, 5, size=(6, bins, 5)).astype(float), rng.uniform(0, 9, size=(6, 5))
        np.testing.assert_array_equal(water_fill(level, amount, axis=1),
                                      water_fill(level.transpose(0, 2, 1), amount).transpose(0, 2, 1))


def _balanced_one_step(counts: np.ndarray, plan: Plan, layer: int, heaviness: np.ndarray) -> np.ndarray:
    """The balanced rule written out for one step and layer: even split, then two passes in which each replicated
    expert, heaviest first (by ``heaviness``: its tokens over all dispatched steps), pours its tokens into its least
    loaded GPUs."""
    tokens = gpu_tokens(counts[None, None, layer], Plan(plan.slot_expert[layer: layer + 1],
                                                         plan.replicas[layer: layer + 1], plan.gpus), "even")[0, 0]
    hosts = plan.hosts()[layer]
    share = {e: np.where(hosts[:, e], plan.slot_counts()[layer, :, e] / plan.replicas[layer, e] * counts[layer, e], 0)
             for e in np.flatnonzero(hosts.sum(axis=0) > 1)}
    for _ in range(2):
        for e in sorted(share, key=lambda e: -heaviness[e]):
            on = np.flatnonzero(hosts[:, e])
            tokens[on] -= share[e][on]
            share[e][on] = water_fill(tokens[on][None], np.array([counts[layer, e]]))[0]
            tokens[on] += share[e][on]
    return tokens


def test_balanced_dispatch_is_the_rule_applied_step_by_step():
    rng = np.random.default_rng(4)
    for gpus, experts, redundant in ((4, 12, 4), (8, 20, 12), (3, 5, 6)):
        loads = skewed_loads(3, experts, seed=gpus, concentration=0.3)
        plan = planners.eplb(loads, gpus, planners.slots_per_gpu_for(experts, gpus, redundant), redundant)
        counts = rng.poisson(loads / loads.sum(axis=1, keepdims=True) * 400, size=(6, 3, experts)).astype(float)
        _assert_balanced_rule_step_by_step(counts, plan, atol=1e-9)


def test_balanced_dispatch_of_fractional_loads_with_tied_heaviness_is_the_rule_applied_step_by_step():
    # Loads as proportions (the planners' predicted loads): replicated experts lighter than one token in all,
    # and 24 experts with many equal totals, which the rule takes in expert order.
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 3, size=(6, 2, 24)) / 10
    plan = planners.eplb(counts.mean(axis=0), 8, planners.slots_per_gpu_for(24, 8, 12), 12)
    assert len(np.unique(counts.sum(axis=0))) < 24 and ((plan.replicas > 1) & (counts.sum(axis=0) < 1)).any()
    _assert_balanced_rule_step_by_step(counts, plan, atol=1e-12)


def _assert_balanced_rule_step_by_step(counts: np.ndarray, plan, atol: float) -> None:
    """``gpu_tokens(..., "balanced")`` equals the rule applied by hand to each step and layer."""
    tokens = gpu_tokens(counts, plan, "balanced")
    for step in range(counts.shape[0]):
        for layer in range(counts.shape[1]):
            by_hand = _balanced_one_step(counts[step], plan, layer, counts[:, layer].sum(axis=0))
            np.testing.assert_allclose(tokens[step, layer], by_hand, rtol=1e-12, atol=atol)


def test_imbalance_by_hand():
    tokens = np.array([[3.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(imbalance(tokens), [1.5, 2.0, 1.0])  # an idle step counts as balanced


def test_dispatch_conserves_tokens_and_balanced_never_worse_than_even():
    rng = np.random.default_rng(0)
    loads = skewed_loads(4, 32, seed=1)
    counts = rng.poisson(loads / loads.sum(axis=1, keepdims=True) * 5000, size=(300, 4, 32))
    plan = planners.eplb(loads, gpus=8, slots_per_gpu=5, redundant=8)
    even, balanced = gpu_tokens(counts, plan, "even"), gpu_tokens(counts, plan, "balanced")
    for tokens in (even, balanced):
        np.testing.assert_allclose(tokens.sum(axis=-1), counts.sum(axis=-1))
        assert (tokens >= -1e-9).all()
    assert (imbalance(balanced) <= imbalance(even) + 1e-12).all()
    assert imbalance(balanced).mean() < imbalance(even).mean()


def test_align_keeps_loads_and_reduces_migrations():
    loads = skewed_loads(3, 32, seed=5)
    before = planners.eplb(loads, gpus=8, slots_per_gpu=5, redundant=8)
    drifted = loads * np.random.default_rng(6).uniform(0.8, 1.2, size=loads.shape)
    after = planners.eplb(drifted, gpus=8, slots_per_gpu=5, redundant=8)
    shuffled = Plan(after.slot_expert.reshape(3, 8, 5)[:, ::-1].reshape(3, 40), after.replicas, 8)
    aligned = align(before, shuffled)
    np.testing.assert_allclose(np.sort(gpu_tokens(drifted[None], aligned)[0], axis=-1),
                               np.sort(gpu_tokens(drifted[None], shuffled)[0], axis=-1))
    assert arrivals(before, aligned).sum() <= arrivals(before, shuffled).sum()
    assert arrivals(before, align(before, before)).sum() == 0


@pytest.mark.parametrize("call", [
    lambda: planners.plan(np.ones((2, 16)), gpus=4, slots_per_gpu=4, redundant=1),  # 17 replicas > 16 slots
    lambda: planners.plan(-np.ones((2, 8)), gpus=2),
    lambda: planners.plan(np.ones(8), gpus=2, slots_per_gpu=4),
    lambda: planners.plan(np.ones((2, 8)), gpus=0),
    lambda: planners.plan(np.ones((2, 8)), gpus=0, slots_per_gpu=8),
    lambda: planners.plan(np.ones((2, 4)), gpus=4, slots_per_gpu=0),
    lambda: planners.plan(np.ones((2, 4)), gpus=2, slots_per_gpu=4, redundant=-1),
    lambda: planners.plan(np.ones((2, 0)), gpus=2, slots_per_gpu=4),
    lambda: planners.plan(np.ones((2, 8)), gpus=2, method="magic"),
    lambda: planners.exact(np.ones((1, 128)), gpus=64, slots_per_gpu=3),
    lambda: gpu_tokens(np.ones((3, 2, 7)), planners.plan(np.ones((2, 8)), gpus=2)),
    lambda: imbalance_lower_bound(-np.ones((2, 8)), gpus=2, redundant=2),
    lambda: imbalance_lower_bound(np.ones((2, 8)), gpus=0, redundant=2),
])
def test_bad_input_is_a_usage_error(call):
    with pytest.raises(PlacementError) as info:
        call()
    assert isinstance(info.value, UsageError) and "\n" not in str(info.value)


def test_imbalance_lower_bound_by_hand():
    counts = np.array([[90.0, 5, 5], [10, 10, 10]])
    # 2 GPUs (mean 50): a second replica of expert 0 carries 45 each, under the mean -> 1.0.
    np.testing.assert_allclose(imbalance_lower_bound(counts, gpus=2, redundant=1), [1.0, 1.0])
    # No spare slot: expert 0 alone puts 90 on one GPU -> 90 / 50.
    np.testing.assert_allclose(imbalance_lower_bound(counts, gpus=2, redundant=0), [1.8, 1.0])
    # 4 GPUs (mean 25 and 7.5), one spare: expert 0 split in two still puts 45 on a GPU, and of three experts
    # of 10 two stay whole (10 / 7.5); three spares bring them to 22.5 and 5, under the means.
    np.testing.assert_allclose(imbalance_lower_bound(counts, gpus=4, redundant=1), [1.8, 4 / 3])
    np.testing.assert_allclose(imbalance_lower_bound(counts, gpus=4, redundant=3), [1.0, 1.0])
    assert imbalance_lower_bound(counts[None], gpus=4, redundant=0).shape == (1, 2)


def test_imbalance_lower_bound_never_above_the_exact_optimum():
    # The exact solver re-plans each row for its own loads with tokens split freely: the bound must not exceed it.
    loads = skewed_loads(6, 6, seed=11, concentration=0.3)
    for gpus, redundant in ((3, 0), (3, 3), (4, 2)):
        slots = planners.slots_per_gpu_for(6, gpus, redundant)
        optimum = makespan(loads, planners.exact(loads, gpus, slots, redundant), "balanced") / (loads.sum(1) / gpus)
        bound = imbalance_lower_bound(loads, gpus, redundant)
        assert (bound <= optimum + 1e-6).all()
        assert (bound >= 1.0).all()
