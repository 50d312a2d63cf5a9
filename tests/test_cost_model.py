"""The measured cost model: interpolation of a calibration grid, its edges, loading errors and the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_trace import synth, trace
from moe_trace.cli import main
from moe_trace.errors import UsageError
from placement import calibration, policies, simulator
from placement.cost import CostModel
from placement.policies import Setting

ANCHORS = Path(__file__).parents[1] / "benchmarks" / "results" / "expert_cost_anchors.json"
META = {"model": "gpt-125m-moe", "moe_layers": [1, 3], "seq_len": 2048, "tokens_per_step": 16384}


def write_calibration(path: Path, curves: dict[tuple[int, int, int], dict[int, float]],
                      all_to_all: list[tuple[int, float]] | None = None, **extra) -> Path:
    """A calibration file with ``curves[(hidden, ffn, local experts)] = {tokens: ms}`` on the even split."""
    points = [{"hidden": h, "ffn": f, "local_experts": n, "split": "even", "tokens": t, "gpu_ms": ms}
              for (h, f, n), curve in curves.items() for t, ms in curve.items()]
    payload = {"kind": "moe-trace expert cost calibration", "format": 1, "device": "test", "expert": points,
               "all_to_all": None if all_to_all is None else
               {"gpus": 2, "points": [{"remote_bytes_per_gpu": b, "ms": ms} for b, ms in all_to_all]}, **extra}
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def grid(tmp_path):
    # Two local-expert counts; the 2-expert curve has a noisy dip at 2048 tokens that must not make more tokens
    # cheaper.
    return calibration.load(write_calibration(tmp_path / "grid.json", {
        (768, 3072, 2): {256: 0.1, 1024: 0.2, 2048: 0.19, 4096: 0.4},
        (768, 3072, 4): {256: 0.3, 1024: 0.3, 4096: 0.6},
    }))


def test_measured_points_are_reproduced_and_monotone(grid):
    expert = grid.expert_time(768, 3072)
    np.testing.assert_allclose(expert.seconds_for([256, 1024, 4096], 2), [1e-4, 2e-4, 4e-4])
    assert expert.seconds_for(2048, 2) == pytest.approx(2e-4)  # the dip is lifted to the running maximum
    tokens = np.linspace(0, 10000, 1001)
    for n in (1, 2, 3, 4, 6):
        assert (np.diff(expert.seconds_for(tokens, n)) >= 0).all()


def test_edges_floor_below_and_last_slope_above(grid):
    expert = grid.expert_time(768, 3072)
    assert expert.seconds_for(0, 2) == pytest.approx(1e-4)  # the floor: weights are read whatever the tokens
    # above 4096 the 2-expert curve continues with the slope of its last segment (2048 -> 4096: 0.2 ms per 2048)
    assert expert.seconds_for(8192, 2) == pytest.approx(4e-4 + 2 * 2e-4)
    # 1 expert was not measured: the smallest measured count stands for it
    np.testing.assert_allclose(expert.seconds_for([256, 4096], 1), expert.seconds_for([256, 4096], 2))


def test_local_experts_interpolate_linearly_and_extrapolate_upward(grid):
    expert = grid.expert_time(768, 3072)
    tokens = np.array([256.0, 1024.0, 3000.0, 4096.0])
    middle = (expert.seconds_for(tokens, 2) + expert.seconds_for(tokens, 4)) / 2
    np.testing.assert_allclose(expert.seconds_for(tokens, 3), middle)
    beyond = expert.seconds_for(tokens, 8)
    assert (beyond >= expert.seconds_for(tokens, 4)).all()
    assert beyond[0] == pytest.approx(3e-4 + 4 * (3e-4 - 1e-4) / 2)  # the 2 -> 4 slope per expert, carried on


def test_an_unmeasured_shape_is_scaled_from_the_nearest_by_flops(grid):
    small = grid.expert_time(384, 1536)
    assert small.source == "H768 F3072"
    np.testing.assert_allclose(small.seconds_for([256, 4096], 2), np.array([1e-4, 4e-4]) / 4)
    assert "scaled from H768 F3072" in CostModel.from_meta({**META, "model": "gpt-tiny-moe"}, grid).name


def test_linear_model_is_the_flop_rate_model():
    cost = CostModel.from_meta(META)
    assert cost.name == "linear"
    tokens = np.array([1000.0, 3000.0])
    np.testing.assert_allclose(cost.expert_time_s(tokens, 3), tokens * 6 * cost.expert_params / cost.matmul_flops)


def test_shapes_from_the_trace_metadata():
    preset = CostModel.from_meta(META)
    assert (preset.hidden, preset.n_blocks, preset.vocab) == (768, 12, 50304)  # the preset's (padded vocabulary)
    unknown = CostModel.from_meta({"model": "mine", "moe_layers": [0, 2, 4], "seq_len": None, "tokens_per_step": 8})
    # an unknown model: hidden 1024 (gpt-350m-moe's), two blocks per MoE layer, sequences of 2048
    assert (unknown.hidden, unknown.n_blocks, unknown.n_moe_blocks, unknown.seq_len) == (1024, 6, 3, 2048)
    given = CostModel.from_meta({**META, "hidden": 96, "n_blocks": 7, "vocab_size": 1000}, a2a_bandwidth=1e9,
                                link_bandwidth=None)
    assert (given.hidden, given.n_blocks, given.seq_len, given.tokens_per_step) == (96, 7, 2048, 16384)
    assert given.vocab == 1000
    assert (given.a2a_bandwidth, given.link_bandwidth) == (1e9, CostModel.link_bandwidth)  # None: the default


def test_dense_time_and_migration_stall_by_hand():
    cost = CostModel(hidden=64, n_blocks=3, n_moe_blocks=1, seq_len=16, tokens_per_step=8, dense_flops=1e12,
                     link_bandwidth=1e9)
    # per token: attention projections 4 h^2 in each of 3 blocks, a dense FFN 2 h (4 h) in the 2 blocks without
    # experts; 6 FLOPs per parameter (forward + backward) plus causal attention 6 x blocks x h x seq_len
    params = 4 * 64 * 64 * 3 + 2 * 64 * 256 * 2
    assert cost.dense_time_s(2) == pytest.approx(8 / 2 * (6 * params + 6 * 3 * 64 * 16) / 1e12)
    # with a vocabulary, the LM head: 6 FLOPs per weight of its [vocab, h] matrix per token
    headed = replace(cost, vocab=100)
    assert headed.dense_time_s(2) - cost.dense_time_s(2) == pytest.approx(8 / 2 * 6 * 100 * 64 / 1e12)
    # the optimizer step: 40 bytes per weight on the GPU (dense, embeddings, and 2 expert slots in the MoE layer)
    weights = params + (100 + 16) * 64 + 2 * 1 * 2 * 64 * 256
    assert headed.optimizer_time_s(2) == pytest.approx(weights * 40 / headed.hbm_bandwidth)
    assert headed.rest_time_s(2, 2) == headed.dense_time_s(2) + headed.optimizer_time_s(2)
    # an expert's weights, gradient and Adam state: 2 h (4 h) parameters x 16 bytes; the busiest receiver per layer
    assert cost.bytes_per_expert == 2 * 64 * 256 * 16
    arrivals = np.array([[1, 0, 2], [0, 1, 0]])  # [layers, gpus]
    assert cost.migration_time_s(arrivals) == pytest.approx((2 + 1) * cost.bytes_per_expert / 1e9)
    assert cost.migration_time_s(np.zeros((0, 3))) == 0.0


def test_step_time_uses_the_measured_expert_and_all_to_all_times(tmp_path):
    cal = calibration.load(write_calibration(tmp_path / "c.json", {(768, 3072, 2): {256: 0.1, 4096: 0.5}},
                                             all_to_all=[(1 << 10, 0.02), (1 << 30, 5.0)]))
    cost = CostModel.from_meta(META, cal)
    busiest = np.array([[2176.0, 4096.0]])  # [steps, layers]
    expert = np.array([0.3e-3, 0.5e-3])
    remote = busiest[0] * 2 * 768 * 7 / 8
    a2a = 4 * np.interp(remote, [1 << 10, 1 << 30], [0.02e-3, 5e-3])
    assert cost.step_time_s(busiest, 8, 2)[0] == pytest.approx(cost.rest_time_s(8, 2) + (expert + a2a).sum())
    # beyond one host the all-to-all crosses the network: the linear NIC model
    nic = 4 * (busiest[0] * 2 * 768 * 15 / 16 / cost.a2a_bandwidth + cost.a2a_latency)
    assert cost.step_time_s(busiest, 16, 2)[0] == pytest.approx(cost.rest_time_s(16, 2) + (expert + nic).sum())
    assert "all-to-all measured" in cost.name


def test_where_time_does_not_depend_on_tokens_placement_buys_nothing(tmp_path):
    # A flat expert curve and a flat all-to-all: no plan is faster than static, so the phase policy never migrates.
    flat = calibration.load(write_calibration(tmp_path / "flat.json", {(1024, 4096, n): {256: 0.5, 65536: 0.5}
                                                                       for n in (1, 4)},
                                              all_to_all=[(1, 0.05), (1 << 30, 0.05)]))
    counts, meta = synth.generate(layers=2, experts=8, steps=600, tokens_per_step=16384, switch_step=200,
                                  concentration=0.5, seed=1)
    setting = Setting(gpus=4, redundant=4, cost=CostModel.from_meta(meta, flat))
    records = {r["policy"]: r for r in simulator.simulate(counts, [policies.Static(), policies.PhaseAware()],
                                                          setting)}
    assert records["phase"]["migrations"] == 0
    assert records["phase"]["step_time_vs_static"] == pytest.approx(1.0)
    assert records["phase"]["mean_imbalance"] == pytest.approx(records["static"]["mean_imbalance"])


def test_bad_calibration_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no calibration file"):
        calibration.load(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="cannot read"):
        calibration.load(tmp_path / "broken.json")
    empty = write_calibration(tmp_path / "empty.json", {(768, 3072, 2): {256: -1.0}})
    with pytest.raises(UsageError, match="no measured expert times"):
        calibration.load(empty)


def test_measured_without_a_shipped_calibration_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MEASURED", tmp_path / "h200.json")
    assert calibration.default_spec() == "linear" and calibration.resolve(None) is None
    with pytest.raises(UsageError, match=r"expert_cost\.py"):
        calibration.resolve("measured")
    write_calibration(tmp_path / "h200.json", {(768, 3072, 2): {256: 0.1, 4096: 0.4}})
    assert calibration.default_spec() == "measured"
    assert calibration.resolve(None).label == "measured:h200"


def test_simulate_records_name_their_cost_model(tmp_path, capsys):
    counts, meta = synth.generate(layers=2, experts=8, steps=300, tokens_per_step=16384, seed=0)
    trace.write(tmp_path / "t", counts, meta)
    figures = {}
    for cost in ("linear", str(ANCHORS)):
        assert main(["simulate", str(tmp_path / "t"), "--gpus", "4", "--policy", "static,history", "--cost", cost,
                     "--json", "-"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert {r["cost_model"] for r in records} == {"linear" if cost == "linear" else
                                                      "measured:expert_cost_anchors.json, provisional "
                                                      "(H1024 F4096; all-to-all linear 50 GB/s)"}
        figures[cost] = records[0]["est_step_time_s"]
    assert figures["linear"] != figures[str(ANCHORS)]


def test_a_missing_cost_file_is_one_line_and_exit_2(tmp_path):
    counts, meta = synth.generate(layers=1, experts=4, steps=20, tokens_per_step=1024, seed=0)
    trace.write(tmp_path / "t", counts, meta)
    result = subprocess.run([sys.executable, "-m", "moe_trace", "simulate", str(tmp_path / "t"), "--gpus", "2",
                             "--cost", str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no calibration file" in result.stderr


def test_the_provisional_anchor_file_reproduces_anchors_points():
    cal = calibration.load(ANCHORS)
    assert cal.provisional
    np.testing.assert_allclose(cal.expert_time(768, 3072).seconds_for([256, 2048, 16384], 2), [0.11e-3, 0.235e-3,
                                                                                                 1.06e-3])
    np.testing.assert_allclose(cal.expert_time(1024, 4096).seconds_for([256, 4096], 16), [0.55e-3, 0.69e-3])


def test_importing_placement_does_not_import_torch():
    code = "import sys, placement, placement.calibration, placement.cost; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
