"""The compiled fused cross-entropy on a CUDA GPU: the kernel at GPT-2's vocabulary, inside torch.compile,
and in GPT.forward against the F.cross_entropy path (skipped without a GPU).

Triton fixes interpreter-or-compiled when a kernel is decorated: if tests/test_cross_entropy.py ran first in
the same process, moe_trace.cross_entropy holds the interpreted kernel and these tests skip (run this file on
its own: ``python -m pytest tests/test_cross_entropy_gpu.py``).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _compiled_kernel():
    pytest.importorskip("triton", reason="needs Triton")
    import triton

    from moe_trace.cross_entropy import _cross_entropy_loss_and_grad_kernel

    if not isinstance(_cross_entropy_loss_and_grad_kernel, triton.runtime.JITFunction):
        pytest.skip("moe_trace.cross_entropy was imported under TRITON_INTERPRET=1 (run this file on its own)")


def _gpt2_logits(rows, dtype=torch.bfloat16, scale=4.0, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(rows, 50304, device="cuda", generator=generator) * scale).to(dtype)
    targets = torch.randint(0, 50257, (rows,), device="cuda", generator=generator)
    return logits, targets


def _loss_and_grad(loss_fn, logits, targets):
    logits = logits.detach().clone().requires_grad_()
    loss = loss_fn(logits, targets)
    loss.backward()
    return loss.detach(), logits.grad


def _reference(logits, targets):
    return F.cross_entropy(logits[:, :50257].float(), targets)


def _fused(logits, targets):
    from moe_trace.cross_entropy import cross_entropy

    return cross_entropy(logits, targets, 50257)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_kernel_equals_f_cross_entropy_at_gpt2_vocabulary(dtype, scale):
    logits, targets = _gpt2_logits(1000, dtype, scale)  # 1000 rows: not a multiple of anything
    loss, grad = _loss_and_grad(_fused, logits, targets)
    expected_loss, expected_grad = _loss_and_grad(_reference, logits, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    # Both round a float32 gradient to the logits' dtype: at most one ulp (2**-7 relative in bf16) apart.
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=rtol, atol=1e-6 * expected_grad.abs().max())
    assert torch.all(grad[:, 50257:] == 0)


def test_inductor_keeps_the_kernel_in_the_graph():
    logits, targets = _gpt2_logits(512)
    compiled = torch.compile(_fused, fullgraph=True)  # fails on a graph break
    loss, grad = _loss_and_grad(compiled, logits, targets)
    expected_loss, expected_grad = _loss_and_grad(_fused, logits, targets)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


def test_gpt_fused_loss_equals_f_cross_entropy_path(monkeypatch):
    import moe_trace.model as model_module
    from moe_trace.model import GPT, make_config

    torch.manual_seed(0)
    model = GPT(make_config("gpt-tiny-moe", vocab_size=4000)).cuda()  # 4000 real rows of 4096: padded
    idx = torch.randint(0, 4000, (4, 128), device="cuda")
    targets = torch.randint(0, 4000, (4, 128), device="cuda")

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx, targets)
        loss.backward()
        return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    logits, loss, grads = loss_and_grads()
    monkeypatch.setattr(model_module, "TRITON_AVAILABLE", False)
    expected_logits, expected_loss, expected_grads = loss_and_grads()

    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)  # the fused loss leaves them intact
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        # Same logits, gradients of the logits at most one bf16 ulp apart; bf16 GEMMs downstream.
        error = (grad - expected_grads[name]).norm() / expected_grads[name].norm().clamp_min(1e-12)
        assert error < 1e-2, name
