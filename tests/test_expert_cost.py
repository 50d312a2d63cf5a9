"""benchmarks/expert_cost.py times the layer's own expert work, and writes a calibration the cost model loads."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_trace.moe import MoELayer

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "expert_cost.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("expert_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["even", "half", "one"])
@pytest.mark.parametrize("tokens,experts", [(256, 1), (1000, 3), (4096, 32)])
def test_splits_conserve_tokens(kind, tokens, experts):
    counts = _benchmark().split(tokens, experts, kind)
    assert len(counts) == experts and sum(counts) == tokens and min(counts) >= 0
    if kind == "even":
        assert max(counts) - min(counts) <= 1
    if kind == "one":
        assert counts[0] == tokens


def test_timed_work_is_the_layers_expert_work():
    # The benchmark's forward + backward equals MoELayer's for the same routing, gradients included.
    bench = _benchmark()
    torch.manual_seed(0)
    layer = MoELayer(hidden=16, ffn=24, num_experts=3, top_k=1).double()
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    chosen = (layer.router(x).softmax(-1)).topk(1)
    ours = bench.expert_work(x, chosen.indices, chosen.values, layer.tokens_per_expert, layer.w1, layer.w2)
    torch.testing.assert_close(ours, out)
    upstream = torch.randn_like(out)
    expected = torch.autograd.grad(out, [layer.w1, layer.w2], upstream)
    got = torch.autograd.grad(ours, [layer.w1, layer.w2], upstream)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_writes_a_calibration_the_cost_model_loads(tmp_path):
    from placement import calibration

    out = tmp_path / "quick.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-all-to-all", "--out", str(out)], check=True,
                   cwd=SCRIPT.parents[1])
    cal = calibration.load(out)
    assert cal.provisional and all(p["gpu_ms"] and p["wall_ms"] for p in cal.expert)
    assert cal.expert_time(768, 3072).seconds_for(512, 2) > 0
