"""INT8 attention on CPU: the Triton kernels under Triton's interpreter against the torch references.

The kernels are imported, and the tests run, under Triton's interpreter (tests/triton_interpreter.py).
Two interpreter quirks (Triton 3.9) shape the tolerances: it multiplies bfloat16 tl.dot operands wrongly
(the kernel upcasts them to float32 there, same values), and it truncates float32 -> bfloat16 where the
GPU rounds to nearest, so bfloat16 outputs may differ from the emulation by one unit in the last place.
"""

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted

with interpreted():
    from moe_trace.attention import MODES, TRAINING_MODE, flash_attention_train, int8_flash_attention
    from moe_trace.attention.bf16_attention import bf16_flash_attention
    from moe_trace.attention.int8_attention import block_config
    from moe_trace.attention.quantize import quantize_per_token, quantize_v_blocks
    from moe_trace.attention.reference import accuracy, attention_float64, emulate_int8_attention


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    with interpreted():  # int8_flash_attention reads it at each call
        yield


def _qkv(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype=torch.bfloat16, dist="normal", seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.rand(*shape, generator=g) * 2 - 1 if dist == "uniform" else torch.randn(*shape, generator=g)

    q = draw(batch, heads, seq_q, head_dim)
    k, v = draw(batch, kv_heads, seq_k, head_dim), draw(batch, kv_heads, seq_k, head_dim)
    if dist == "outlier":  # a large bias on a few K channels, a few huge Q rows
        k[..., :4] += 20.0
        q[:, :, ::37] *= 30.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = [  # batch, heads, kv_heads, seq_q, seq_k, head_dim: ragged tails, GQA, cross lengths
    (1, 2, 2, 200, 200, 64),
    (2, 4, 2, 77, 77, 32),
    (1, 2, 1, 130, 70, 128),
    (1, 1, 1, 1, 1, 64),
]


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_equals_emulation(mode, causal, shape, dtype):
    q, k, v = _qkv(*shape, dtype=dtype, seed=sum(shape) + 2 * causal + len(mode))
    sm_scale = 0.7 / shape[-1] ** 0.5
    out = int8_flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, mode=mode).float()
    block_n = block_config(shape[-1], mode)["block_n"]
    expected = emulate_int8_attention(q, k, v, causal, sm_scale, mode, block_n).float()
    # Float rounding may move a value across a rounding boundary of the INT8 grid now and then: one step of
    # one P entry moves an output by about |v_i - v_j| / 255 / l, most in rows with few keys (atol); on
    # average the two agree to rounding. In bfloat16 the interpreter also truncates the 16-bit P of mode
    # int8_qk (and the output), a bias of up to one unit that the GPU, rounding to nearest, does not have.
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(out, expected, rtol=2 * ulp, atol=3e-2)
    assert (out - expected).abs().mean() <= (1.5 if dtype == torch.bfloat16 else 0.5) * ulp * expected.abs().mean()


# Relative L1 bounds against float64. Issue 4's goals are for normal inputs (int8 <= 1.5 %, training mode
# <= 1.0 %); uniform and outlier inputs get bounds that keep today's margins.
BOUNDS = {
    ("int8", "normal"): 0.015, ("int8", "uniform"): 0.015, ("int8", "outlier"): 0.020,
    ("int8_qk", "normal"): 0.010, ("int8_qk", "uniform"): 0.010, ("int8_qk", "outlier"): 0.015,
}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dist", ["normal", "uniform", "outlier"])
@pytest.mark.parametrize("causal", [False, True])
def test_accuracy_against_float64(mode, dist, causal):
    q, k, v = _qkv(1, 2, 2, 384, 384, 64, dist=dist, seed=7)
    out = int8_flash_attention(q, k, v, causal=causal, mode=mode)
    stats = accuracy(out, attention_float64(q, k, v, causal))
    assert stats["rel_l1"] <= BOUNDS[mode, dist], stats
    assert stats["cosine"] > 0.999, stats


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("causal", [False, True])
def test_degenerate_rows_stay_finite(mode, causal):
    q, k, v = _qkv(1, 2, 2, 150, 150, 64, seed=5)
    q[:, 0, :40] = 0.0  # constant score rows: uniform attention
    k[:, 1] = 3.0  # every key equal
    v[:, 0, :, :8] = 2.0  # constant channels
    q[:, 1, 100:] *= 1e3  # near one-hot rows
    out = int8_flash_attention(q, k, v, causal=causal, mode=mode)
    assert torch.isfinite(out).all()
    ref = attention_float64(q, k, v, causal)
    assert accuracy(out, ref)["rel_l1"] < 0.02
    constant = out[:, 0, :, :8].float()
    torch.testing.assert_close(constant, torch.full_like(constant, 2.0), rtol=2**-7, atol=0)


def test_fully_masked_key_blocks_and_single_query():
    """Causal rows with whole key blocks masked (query 0 sees one key) and ragged tails give no NaN."""
    q, k, v = _qkv(1, 1, 1, 67, 67, 32, seed=11)
    for mode in MODES:
        out = int8_flash_attention(q, k, v, causal=True, mode=mode)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0, 0, 0].float(), v[0, 0, 0].float(), rtol=0.02, atol=0.02)


def test_quantizers_round_to_nearest_and_correct_the_unsigned_offset():
    x = torch.randn(2, 3, 100, 64).bfloat16()
    mean = x.float().mean(dim=2)
    xq, scale = quantize_per_token(x, 2.0, mean=mean)
    err = (xq.float() * scale[..., None] / 2.0 - (x.float() - mean[:, :, None])).abs()
    assert (err <= scale[..., None] / 2.0 / 2 * 1.0001).all()
    vt, v_scale, offset = quantize_v_blocks(x, 64)
    assert vt.shape == (2, 3, 64, 128) and (vt[..., 100:] == 0).all()
    blocks = vt.float().reshape(2, 3, 64, 2, 64)
    torch.testing.assert_close(offset, 128.0 * blocks.sum(-1).transpose(-1, -2), rtol=0, atol=0)
    deq = (blocks * v_scale.transpose(-1, -2)[..., None]).reshape(2, 3, 64, 128)[..., :100].transpose(-1, -2)
    assert ((deq - x.float()).abs() <= v_scale.amax() / 2 * 1.0001).all()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_training_path_gradients_equal_sdpa(kv_heads):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, kv_heads, 96, 96, 32, seed=13))
    out = flash_attention_train(q, k, v, causal=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=kv_heads != 4)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), grad_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1e-2)
    assert accuracy(out, ref)["rel_l1"] < 0.015
    assert TRAINING_MODE in MODES


def test_cpu_without_interpreter_uses_the_emulation(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 80, 80, 64, seed=17)
    kernel = int8_flash_attention(q, k, v, causal=True, mode="int8")
    monkeypatch.delenv("TRITON_INTERPRET")
    emulated = int8_flash_attention(q, k, v, causal=True, mode="int8")
    torch.testing.assert_close(emulated, kernel, rtol=2**-6, atol=1e-2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q, k, v, "int4"), "unknown attention mode"),
        (lambda q, k, v: (q.float(), k, v, "int8"), "bfloat16 or float16"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48], "int8"), "head_dim"),
        (lambda q, k, v: (q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1), "int8"), "multiple"),
        (lambda q, k, v: (q, k, v[:, :, :5], "int8"), "shapes do not match"),
    ],
)
def test_bad_inputs_raise(change, message):
    q, k, v, mode = change(*_qkv(1, 2, 2, 8, 8, 64))
    with pytest.raises(ValueError, match=message):
        int8_flash_attention(q, k, v, mode=mode)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_baseline_kernel_is_exact_to_half_precision(causal):
    """The benchmarks' same-compiler baseline (float16 here: the interpreter's bfloat16 products are wrong)."""
    q, k, v = _qkv(1, 4, 2, 150, 150, 64, dtype=torch.float16, seed=19)
    stats = accuracy(bf16_flash_attention(q, k, v, causal, block_m=64, block_n=32), attention_float64(q, k, v, causal))
    assert stats["rel_l1"] < 1e-3, stats


def test_gluon_kernel_module_imports_and_declines_without_an_sm90_gpu(monkeypatch):
    from moe_trace.attention import gluon_int8_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gluon_int8_attention.gluon_available() is False
    q, k, v = _qkv(1, 2, 2, 64, 64, 64)
    with pytest.raises(RuntimeError, match="sm_90"):
        gluon_int8_attention.gluon_int8_flash_attention(q, k, v, mode="int8_qk")
