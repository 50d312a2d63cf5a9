"""The compiled INT8 kernels on a CUDA GPU (Triton everywhere, Gluon on sm_90) against the torch emulation and
float64, and training through the CLI on a warm compile cache (skipped without a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_trace.attention import MODES, flash_attention_train, int8_flash_attention
from moe_trace.attention.gluon_int8_attention import BLOCK_N, gluon_available, gluon_int8_flash_attention
from moe_trace.attention.int8_attention import block_config
from moe_trace.attention.reference import accuracy, attention_float64, emulate_int8_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


KERNEL_CASES = [
    pytest.param(mode, causal, *shape, id=f"{mode}-{'causal' if causal else 'full'}-{'x'.join(map(str, shape))}")
    for mode in sorted(MODES)
    for causal in (False, True)
    for shape in ((8, 8, 1000, 64), (8, 2, 777, 128))
]


def _inputs(heads, kv_heads, seq, head_dim):
    g = torch.Generator(device="cuda").manual_seed(seq + head_dim)
    # Non-symmetric data (a shifted V, a K bias): a wrong P·V operand layout would show.
    q = torch.randn(2, heads, seq, head_dim, device="cuda", generator=g).bfloat16()
    k = (torch.randn(2, kv_heads, seq, head_dim, device="cuda", generator=g) + 0.5).bfloat16()
    v = (torch.rand(2, kv_heads, seq, head_dim, device="cuda", generator=g) * 3 - 1).bfloat16()
    return q, k, v


def _assert_equals_emulation(out, q, k, v, causal, mode, block_n):
    out = out.float()
    expected = emulate_int8_attention(q, k, v, causal, q.shape[-1] ** -0.5, mode, block_n).float()
    torch.testing.assert_close(out, expected, rtol=2**-6, atol=3e-2)
    assert (out - expected).abs().mean() <= 2**-8 * expected.abs().mean()
    bound = 0.015 if mode == "int8" else 0.01
    assert accuracy(out, attention_float64(q, k, v, causal))["rel_l1"] < bound


@pytest.mark.parametrize(("mode", "causal", "heads", "kv_heads", "seq", "head_dim"), KERNEL_CASES)
def test_compiled_kernel_equals_emulation(mode, causal, heads, kv_heads, seq, head_dim):
    q, k, v = _inputs(heads, kv_heads, seq, head_dim)
    out = int8_flash_attention(q, k, v, causal=causal, mode=mode)
    _assert_equals_emulation(out, q, k, v, causal, mode, block_config(head_dim, mode)["block_n"])


@pytest.mark.skipif(
    not gluon_available(),
    reason="needs an sm_90 GPU and Triton with Gluon, in a process whose Triton was not loaded by the interpreter",
)
@pytest.mark.parametrize(("mode", "causal", "heads", "kv_heads", "seq", "head_dim"), KERNEL_CASES)
def test_gluon_kernel_equals_emulation(mode, causal, heads, kv_heads, seq, head_dim):
    q, k, v = _inputs(heads, kv_heads, seq, head_dim)
    out = gluon_int8_flash_attention(q, k, v, causal=causal, mode=mode)
    _assert_equals_emulation(out, q, k, v, causal, mode, BLOCK_N)


def test_compiled_training_path_gradients_equal_sdpa():
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda").bfloat16().requires_grad_() for _ in range(3))
    out = flash_attention_train(q, k, v)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1e-2)


def _cache_entries(cache_dir: Path) -> set[str]:
    """The compiled graphs stored in a TORCHINDUCTOR_CACHE_DIR: AOTAutograd's and Inductor's FX graph caches."""
    return {str(p.relative_to(cache_dir)) for sub in ("aotautograd", "fxgraph") for p in (cache_dir / sub).rglob("*")}


def _train_125m(tmp_path: Path, run: str, steps: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``moe-trace train`` on gpt-125m-moe (16k tokens/step) over random token ids, as a subprocess that must pass."""
    ids = tmp_path / "ids.npy"
    if not ids.exists():
        np.save(ids, np.random.default_rng(0).integers(0, 50257, size=400_000, dtype=np.int32))
    command = [sys.executable, "-m", "moe_trace", "train", "--model", "gpt-125m-moe", "--data", str(ids),
               "--global-batch", "8", "--steps", str(steps), "--eval-every", str(steps), "--checkpoint-every", "0",
               *args, "--out", str(tmp_path / run)]
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    assert result.returncode == 0, f"{run} run failed:\n{result.stderr[-4000:]}"
    return result


@pytest.mark.parametrize("compile_flag", ["--compile", "--no-compile"])
def test_second_training_run_on_a_warm_compile_cache(tmp_path, compile_flag):
    """Issue 11: every warm-cache run with --attention int8 died in AOTAutograd's gen_alias_from_base."""
    entries = []
    for run in ("cold", "warm"):
        result = _train_125m(tmp_path, run, 20, "--attention", "int8", compile_flag,
                             TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cache"))
        assert "val loss nan" not in result.stdout
        entries.append(_cache_entries(tmp_path / "inductor-cache"))
    if compile_flag == "--compile":
        assert any(e.startswith("aotautograd") for e in entries[0]), "the cold run stored no compiled graph"
        assert entries[1] == entries[0], "the warm run compiled afresh instead of loading the cache"


def test_auto_measures_once_and_says_what_it_chose(tmp_path):
    first_lines = []
    for run in ("first", "second"):
        result = _train_125m(tmp_path, run, 3, "--no-record", "--attention", "auto", "--no-compile",
                             MOE_TRACE_CACHE=str(tmp_path / "cache"))
        first_lines.append(result.stdout.splitlines()[0])
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert first_lines[-1] == f"attention {config['model']['attention']} ({config['train']['attention_reason']})"
    print(first_lines[0])
    assert first_lines[0] == first_lines[1]  # the second run read the first one's measurement
    assert " at B8 H12 S2048 D64 causal on " in first_lines[0]
    (stack,) = json.loads((tmp_path / "cache" / "attention_timings.json").read_text()).values()
    assert list(stack) == ["B8 H12 S2048 D64 causal"]
