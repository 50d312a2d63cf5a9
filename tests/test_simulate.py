"""Trace replay: hand-computed imbalance and step time, no peeking, what the hindsight oracle does beat, the CLI
contract."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from moe_trace import synth, trace
from moe_trace.cli import main
from placement import policies, simulator
from placement.cost import CostModel
from placement.dispatch import gpu_tokens, imbalance
from placement.migration import align
from placement.planners import Plan
from placement.policies import Setting

COST = CostModel(hidden=64, n_blocks=2, n_moe_blocks=1, seq_len=16, tokens_per_step=8)


def test_static_imbalance_and_step_time_by_hand():
    # 4 experts on 2 GPUs, contiguous: GPU 0 hosts experts 0, 1 and GPU 1 hosts 2, 3.
    counts = np.array([[[3, 1, 2, 2]], [[5, 1, 1, 1]]])  # [steps, layers=1, experts]
    setting = Setting(gpus=2, redundant=0, cost=COST)
    [record] = simulator.simulate(counts, [policies.Static()], setting)
    # step 0: GPUs 4 and 4 -> 1.0; step 1: GPUs 6 and 2, mean 4 -> 1.5
    assert record["mean_imbalance"] == pytest.approx(1.25)
    assert record["p99_imbalance"] == pytest.approx(1.0 + 0.5 * 0.99)  # linear interpolation between the two
    busiest = np.array([4.0, 6.0])
    expert_s = busiest * 6 * COST.expert_params / COST.matmul_flops  # linear model: forward + backward FLOPs
    a2a_s = 4 * (busiest * 2 * COST.hidden / 2 / COST.a2a_bandwidth + COST.a2a_latency)  # half the tokens cross
    hand = COST.rest_time_s(2, local_experts=2) + expert_s + a2a_s
    assert record["est_step_time_s"] == pytest.approx(hand.mean())
    # its parts: the placement-independent rest by the cost model, the MoE layers by hand, no migration
    assert record["est_step_parts_s"] == pytest.approx({"dense": COST.dense_time_s(2),
                                                        "optimizer": COST.optimizer_time_s(2),
                                                        "moe_layers": (expert_s + a2a_s).mean(), "migration": 0.0})
    assert record["migrations"] == 0 and record["moved_bytes"] == 0 and record["step_time_vs_static"] == 1.0


def test_replicated_expert_split_by_hand():
    # Expert 0 on both GPUs, expert 1 on GPU 0, expert 2 on GPU 1; counts [4, 3, 1].
    plan = Plan(np.array([[0, 1, 0, 2]]), np.array([[2, 1, 1]]), gpus=2)
    counts = np.array([[[4, 3, 1]]])
    np.testing.assert_allclose(gpu_tokens(counts, plan, "even")[0, 0], [3 + 2, 1 + 2])
    np.testing.assert_allclose(gpu_tokens(counts, plan, "balanced")[0, 0], [4, 4])  # 1 to GPU 0, 3 to GPU 1


def test_migrations_are_counted_and_charged():
    counts = np.array([[[9, 1, 1, 1]]] * 4 + [[[1, 1, 1, 9]]] * 4)
    setting = Setting(gpus=2, redundant=0, cost=COST)
    # Longest-first on 2 GPUs x 2 slots: [9, 1, 1, 1] -> {0, 3} {1, 2}; [1, 1, 1, 9] -> {3, 2} {0, 1}.
    first, second = setting.plan(np.array([[9.0, 1, 1, 1]])), setting.plan(np.array([[1.0, 1, 1, 9]]))
    assert [set(g) for g in first.slot_expert.reshape(2, 2)] == [{0, 3}, {1, 2}]
    outcome = simulator.replay(counts, [(0, first), (4, setting.plan(np.array([[1.0, 1, 1, 9]]), first))], setting)
    np.testing.assert_allclose(outcome["imbalance"], 10 / 6)  # 10 tokens vs 2 at every step
    assert outcome["migrations"].tolist() == [0, 0, 0, 0, 2, 0, 0, 0]  # each GPU receives one expert
    stall = outcome["step_time_s"][4] - outcome["step_time_s"][5]
    assert stall == pytest.approx(COST.bytes_per_expert / COST.link_bandwidth)
    np.testing.assert_allclose(outcome["stall_s"], [0, 0, 0, 0, stall, 0, 0, 0])
    parts = simulator.summarise(outcome, slice(None), COST.bytes_per_expert)["est_step_parts_s"]
    assert parts["migration"] == pytest.approx(stall / 8)
    assert sum(parts.values()) == pytest.approx(outcome["step_time_s"].mean())
    assert {frozenset(g) for g in second.slot_expert.reshape(2, 2)} == {frozenset({2, 3}), frozenset({0, 1})}


@pytest.fixture(scope="module")
def drifting():
    counts, meta = synth.generate(layers=3, experts=16, steps=2400, tokens_per_step=65536, switch_step=1200,
                                  concentration=2.0, drift=0.8, seed=3)
    return counts, meta


def test_oracle_beats_the_policies_that_plan_from_the_past_at_their_cadence(drifting):
    """The oracle is no lower bound (see ``placement.policies``); what it does beat is the contiguous plan and EPLB's
    history, in every phase, and nothing gets below the imbalance bound of ``placement.bounds``."""
    counts, meta = drifting
    setting = Setting(gpus=4, redundant=4, cost=CostModel.from_meta(meta))
    records = simulator.simulate(counts, policies.get("all"), setting, stable_from=1200)
    _assert_oracle_beats_static_and_history({r["policy"]: r for r in records}, ("transient", "stable"))
    for r in records:
        for figures in (r, *r["phases"].values()):
            assert figures["mean_imbalance"] >= figures["mean_imbalance_bound"] - 1e-12, r["policy"]
    assert {r["policy"]: r["replans"] for r in records if r["policy"] in ("static", "history")} == {
        "static": 0, "history": 2}  # steps 1000 and 2000


def test_oracle_beats_static_and_history_on_the_recorded_trace():
    # traces/gpt-125m-moe on 8 GPUs, one spare slot each (the README's simulate example); `moe-trace phases`
    # finds every layer stable from step 3700. There `phase` beats the oracle (mean imbalance 1.061 vs 1.077).
    recorded = trace.load("traces/gpt-125m-moe")
    setting = Setting(gpus=8, redundant=8, cost=CostModel.from_meta(recorded.meta))
    records = simulator.simulate(recorded.counts, policies.get("static,history,oracle"), setting, stable_from=3700)
    _assert_oracle_beats_static_and_history({r["policy"]: r for r in records}, ("transient", "stable"))
    # The same replay made the 16k (recorded) row of benchmarks/results/placement_batch_curve_linear.json.
    committed = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" /
                            "placement_batch_curve_linear.json").read_text())
    [row] = [r for r in committed["results"] if r["model"] == "gpt-125m-moe" and r["noise"] == "recorded"]
    assert row["gpus"] == 8 and row["redundant"] == 8 and row["stable_from"] == 3700 and row["cost_model"] == "linear"
    expected = {r["policy"]: r for r in row["records"]}
    for record in records[:2]:
        for figure in ("mean_imbalance", "p99_imbalance", "migrations", "moved_bytes", "est_step_time_s"):
            assert record[figure] == pytest.approx(expected[record["policy"]][figure], rel=1e-12), figure


def _assert_oracle_beats_static_and_history(records, phases):
    for phase in ("all", *phases):
        figures = {name: r if phase == "all" else r["phases"][phase] for name, r in records.items()}
        for figure in ("mean_imbalance", "p99_imbalance", "est_step_time_s"):
            assert figures["oracle"][figure] < min(figures["static"][figure], figures["history"][figure]), (
                phase, figure)


def test_oracle_replans_only_to_a_plan_faster_than_the_one_in_force(drifting):
    """At each re-plan the oracle's new plan, migration stall included, replays its next ``every`` steps no slower
    than keeping the plan in force (it chose it per layer as the fastest of its hindsight candidates)."""
    counts, meta = drifting
    setting = Setting(gpus=4, redundant=4, cost=CostModel.from_meta(meta))
    oracle = policies.Oracle()
    schedule = oracle.schedule(counts, counts / counts.sum(axis=2, keepdims=True), setting)
    assert len(schedule) > 5
    for (_, old), (t, new) in itertools.pairwise(schedule):
        window = counts[t: t + oracle.every]
        keep = simulator.replay(window, [(0, old)], setting)["step_time_s"].sum()
        move = simulator.replay(window, [(0, old), (0, new)], setting)
        assert move["migrations"][0] > 0
        assert move["step_time_s"].sum() <= keep * (1 + 1e-12), t


def test_every_policy_runs_on_a_trace_shorter_than_its_cadence():
    counts = np.random.default_rng(0).poisson(50, size=(5, 2, 8))
    records = simulator.simulate(counts, policies.get("all"), Setting(gpus=2, redundant=2, cost=COST))
    assert [r["policy"] for r in records] == list(policies.POLICIES)
    assert all(1.0 <= r["mean_imbalance"] <= r["p99_imbalance"] for r in records)


@pytest.mark.parametrize("policy", [policies.History(every=300, window=300), policies.Predict(every=100),
                                    policies.PhaseAware(transient_every=100, stable_every=300)])
def test_policies_do_not_read_the_future(drifting, policy):
    counts, meta = drifting
    setting = Setting(gpus=4, redundant=4, cost=CostModel.from_meta(meta))
    cut = 1000
    altered = counts.copy()
    altered[cut:] = altered[cut:, :, ::-1]  # a different future

    def schedule(c):
        p = c / c.sum(axis=2, keepdims=True)
        return [(t, plan.slot_expert) for t, plan in policy.schedule(c, p, setting) if t <= cut]

    for (t1, a), (t2, b) in zip(schedule(counts), schedule(altered), strict=True):
        assert t1 == t2 and np.array_equal(a, b)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory, drifting):
    counts, meta = drifting
    return str(trace.write(tmp_path_factory.mktemp("t") / "trace", counts, meta))


def test_simulate_cli_json(trace_path, tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", trace_path, "--gpus", "4", "--policy", "static,history,oracle", "--json", str(out)]) == 0
    assert "static" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["policy"] for r in records] == ["static", "history", "oracle"]
    for r in records:
        assert {"policy", "gpus", "redundant", "mean_imbalance", "p99_imbalance", "migrations", "moved_bytes",
                "est_step_time_s"} <= r.keys()
        assert r["gpus"] == 4 and r["redundant"] == 4
        # The lower bound holds for every policy, over the run and per phase.
        assert 1.0 <= r["mean_imbalance_bound"] <= r["mean_imbalance"]
        assert r["p99_imbalance_bound"] <= r["p99_imbalance"]
        for figures in r["phases"].values():
            assert figures["p99_imbalance_bound"] <= figures["p99_imbalance"]


def test_place_cli_json(trace_path, tmp_path):
    out = tmp_path / "place.json"
    assert main(["place", trace_path, "--gpus", "4", "--redundant", "4", "--at", "1500", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["slots_per_gpu"] == 5 and len(result["layers"]) == 3
    for layer in result["layers"]:
        hosted = [e for gpu in layer["gpus"] for e in gpu]
        assert sorted(set(hosted)) == list(range(16)) and len(hosted) == 20
        assert layer["history_imbalance"] <= layer["static_imbalance"]


@pytest.mark.parametrize("argv", [
    ["simulate", "{trace}", "--gpus", "0"],
    ["simulate", "{trace}", "--gpus", "4", "--policy", "nope"],
    ["simulate", "{trace}", "--gpus", "4", "--predictor", "nope"],
    ["simulate", "{trace}", "--gpus", "4", "--replan-every", "0"],
    ["simulate", "{trace}", "--gpus", "4", "--link-gbps", "-1"],
    ["simulate", "/no/such/trace", "--gpus", "4"],
    ["place", "{trace}", "--gpus", "4", "--at", "99999"],
    ["place", "{trace}", "--gpus", "4", "--at", "100", "--window", "0"],
    ["place", "{trace}", "--gpus", "2", "--redundant", "-3", "--at", "100"],
])
def test_bad_input_exits_2_with_one_line(trace_path, capsys, argv):
    assert main([a.format(trace=trace_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err and "Traceback" not in err


def test_step_noise_measures_per_step_noise_not_drift():
    rng = np.random.default_rng(0)
    drift = np.linspace(0.0, 5.0, 4000)[:, None, None] * np.ones((1, 2, 3))  # a mean that moves a lot
    np.testing.assert_allclose(policies.step_noise(drift), 0.0, atol=1e-12)
    noisy = drift + rng.normal(0.0, [0.1, 0.2, 0.4], size=(4000, 2, 3))
    np.testing.assert_allclose(policies.step_noise(noisy), np.broadcast_to([0.1, 0.2, 0.4], (2, 3)), rtol=0.05)
    assert not policies.step_noise(noisy[:1]).any()


def test_window_step_noise_is_step_noise_of_each_window():
    rng = np.random.default_rng(1)
    series = np.cumsum(rng.normal(0.0, 0.1, size=(900, 2, 3)), axis=0) + rng.normal(0.0, 0.3, size=(900, 2, 3))
    series[200:700, 1, 2] = 0.25  # a stretch with no noise at all
    starts, stops = [0, 0, 5, 200, 250, 899, 30, 10], [900, 1, 7, 700, 600, 900, 830, 10]
    for window, start, stop in zip(policies.window_step_noise(series, starts, stops), starts, stops, strict=True):
        np.testing.assert_allclose(window, policies.step_noise(series[start: stop]), rtol=1e-12, atol=1e-15)
    assert (policies.window_step_noise(series, [250], [600])[0, 1, 2] == 0.0).all()


def test_candidate_replays_do_not_depend_on_gpu_numbering_or_batching():
    # Policies replay candidate plans before aligning them to the plan in force, many windows per dispatch call.
    counts, _ = synth.generate(layers=3, experts=24, steps=200, tokens_per_step=4096, concentration=0.5, seed=2)
    setting = Setting(gpus=6, redundant=6, cost=COST)
    props = counts / counts.sum(axis=2, keepdims=True)
    plans = [setting.plan(props[i: i + 50].mean(axis=0)) for i in range(0, 200, 50)]
    windows = [counts[i: i + 40] for i in range(0, 160, 40)]
    pairs = [[plans[i], plans[(i + 1) % 4]] for i in range(4)]
    batched = policies._layer_time(windows, pairs, setting)
    for i in range(4):
        one = policies._layer_time([windows[i]], [pairs[i]], setting)[0]
        renumbered = policies._layer_time([windows[i]], [[align(plans[3 - i], p) for p in pairs[i]]], setting)[0]
        np.testing.assert_array_equal(batched[i], one)
        np.testing.assert_array_equal(renumbered, one)


def test_phase_checks_on_multiples_of_its_cadence():
    counts, _ = synth.generate(layers=2, experts=8, steps=6000, tokens_per_step=16384, switch_step=1500, seed=0)
    policy = policies.PhaseAware()
    checks = policy.checks(counts / counts.sum(axis=2, keepdims=True))
    assert checks[0] == (10, False) and checks[-1][0] < 6000
    for (t, stable), (following, _) in itertools.pairwise(checks):
        cadence = policy.stable_every if stable else policy.transient_every
        assert following == (t // cadence + 1) * cadence
    assert any(stable for _, stable in checks) and not checks[10][1]


def test_planning_for_the_tail_replicates_the_noisy_expert():
    # Expert 0 alternates 2 and 18 tokens (mean 10), expert 1 is steady at 10.5: the mean plan gives the
    # redundant slot to expert 1; planning on mean + std gives it to expert 0, whose busy steps it can absorb.
    counts = np.array([[[2, 10.5, 5, 5, 5, 5]], [[18, 10.5, 5, 5, 5, 5]]] * 50)
    props = counts / counts.sum(axis=2, keepdims=True)
    noise, mean = policies.step_noise(props), props.mean(axis=0)
    for z, replicas in ((0.0, [1, 2, 1, 1, 1, 1]), (1.0, [2, 1, 1, 1, 1, 1])):
        plan = Setting(gpus=3, redundant=1, cost=COST, tail_z=z).plan(mean, noise=noise)
        assert plan.replicas[0].tolist() == replicas
    np.testing.assert_array_equal(Setting(3, 1, COST).plan(mean).slot_expert,
                                  Setting(3, 1, COST, tail_z=0.0).plan(mean, noise=noise).slot_expert)


def test_tail_plans_lower_the_p99_on_noisy_traces():
    # Plan on 1000 steps of a stable synthetic trace, replay the next 1000: over five traces, planning for
    # mean + std lowers the p99 imbalance (and not at the mean's expense).
    p99, mean = {0.0: [], 1.0: []}, {0.0: [], 1.0: []}
    for seed in range(5):
        counts, _ = synth.generate(layers=4, experts=32, steps=2000, tokens_per_step=16384, switch_step=None,
                                   concentration=2.0, seed=seed)
        history = counts[:1000] / counts[:1000].sum(axis=2, keepdims=True)
        for z in p99:
            plan = Setting(gpus=8, redundant=8, cost=COST, tail_z=z).plan(history.mean(axis=0),
                                                                          noise=policies.step_noise(history))
            imb = imbalance(gpu_tokens(counts[1000:], plan))
            p99[z].append(np.percentile(imb, 99))
            mean[z].append(imb.mean())
    assert np.mean(p99[1.0]) < 0.97 * np.mean(p99[0.0])
    assert np.mean(mean[1.0]) <= np.mean(mean[0.0])


def test_backtest_choice_by_hand():
    # Forecaster 0 always predicts (0.5, 0.5), forecaster 1 (1, 0); outcomes are (1, 0), then (0.5, 0.5) twice.
    forecasts = np.array([[[0.5, 0.5]], [[1.0, 0.0]]])[None].repeat(3, axis=0)  # [checks, forecasters, layers, E]
    actual = np.array([[[1.0, 0.0]], [[0.5, 0.5]], [[0.5, 0.5]]])
    # window 1: check j follows the last outcome alone; checks 0 and 1 keep forecaster 0 (nothing known / tie
    # impossible yet at 0); the outcome of check 0 favours 1, those of checks 1 and 2 favour 0.
    assert policies.backtest_choice(forecasts, actual, 1)[:, 0].tolist() == [0, 1, 0, 0]
    # window 2: forecaster 0 until two outcomes are known, then a tie over checks 0-1 (0 wins), then 0.
    assert policies.backtest_choice(forecasts, actual, 2)[:, 0].tolist() == [0, 0, 0, 0]
    assert policies.backtest_choice(forecasts[:1], actual[:1], 1)[:, 0].tolist() == [0, 1]
    assert policies.backtest_choice(forecasts, actual, 5)[:, 0].tolist() == [0, 0, 0, 0]


def test_phase_forecasts_each_layer_with_the_memory_its_noise_supports():
    # Layer 0: a fixed skew under heavy per-step noise (long memory averages it out). Layer 1: nearly noiseless,
    # its skew flips between two experts every 100 steps (a short memory follows the flips).
    rng = np.random.default_rng(0)
    steps, experts = 1000, 4
    props = np.empty((steps, 2, experts))
    props[:, 0] = rng.dirichlet(np.array([8.0, 4, 4, 4]), size=steps)
    flips = (np.arange(steps) // 100) % 2 == 0
    props[:, 1] = np.where(flips[:, None], [0.55, 0.15, 0.15, 0.15], [0.15, 0.55, 0.15, 0.15])
    policy = policies.PhaseAware()
    checks = [(t, False) for t in range(25, steps, 25)]
    starts = [max(0, t - policy.history) for t, _ in checks]
    forecasts = policy.forecasts(props, checks, starts)
    options = np.stack([[policies._predict_mean(spec, props[s: t], 25) for spec in policy.transient_predictors]
                        for (t, _), s in zip(checks, starts, strict=True)])  # [checks, forecasters, layers, E]
    late = slice(policy.backtest + 4, None)
    np.testing.assert_allclose(forecasts[late, 0], options[late, 0, 0])  # the half-life 25
    np.testing.assert_allclose(forecasts[late, 1], options[late, 1, 1])  # the half-life 10
    np.testing.assert_allclose(forecasts[: policy.backtest], options[: policy.backtest, 0])  # too early to choose
