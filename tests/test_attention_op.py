"""The training attention as a custom op on CPU (the torch emulation): registration, autograd, torch.compile.

The op exists so that compile caches cannot break it (moe_trace/attention/autograd.py says how they did); the
warm-cache training runs themselves are GPU tests (tests/test_attention_gpu.py).
"""

import pytest
import torch
import torch.nn.functional as F

from moe_trace.attention import TRAINING_MODE, flash_attention_train
from moe_trace.attention.autograd import int8_attention
from moe_trace.model import CausalSelfAttention, ModelConfig


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the emulation: the interpreter would take minutes


def _fused_qkv(batch=2, heads=2, seq=24, head_dim=16, seed=0):
    """q, k, v as the model makes them: views of one [batch, seq, 3, heads, head_dim] projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, 3, heads, head_dim, generator=g).bfloat16().requires_grad_()
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


def test_op_registration_passes_opcheck():
    _, (q, k, v) = _fused_qkv()
    assert not q.is_contiguous()
    results = torch.library.opcheck(int8_attention, (q, k, v, True, 0.25, TRAINING_MODE))
    assert set(results.values()) == {"SUCCESS"}, results


def test_output_is_fresh_and_contiguous_and_gradients_are_sdpa_s():
    qkv, (q, k, v) = _fused_qkv()
    out = flash_attention_train(q, k, v)
    assert out.is_contiguous() and out.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    (expected,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), qkv, grad_out)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)  # straight-through: SDPA's gradient, bit for bit


def test_block_compiles_without_graph_break_and_matches_eager():
    torch.manual_seed(0)
    block = CausalSelfAttention(ModelConfig(hidden=32, heads=2, seq_len=24, attention="int8")).bfloat16()
    x = torch.randn(2, 24, 32).bfloat16()
    eager_out = block(x)
    eager_grads = torch.autograd.grad(eager_out.float().square().sum(), list(block.parameters()))
    # fullgraph: a graph break at the attention (what made compile caches replay views of qkv) is an error.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    grads = torch.autograd.grad(out.float().square().sum(), list(block.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for grad, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-2, atol=1e-3)
