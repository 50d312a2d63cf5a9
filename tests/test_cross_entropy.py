"""Fused cross-entropy on CPU: the Triton kernel under Triton's interpreter against F.cross_entropy.

The kernel is imported, and the tests run, under Triton's interpreter (tests/triton_interpreter.py).
The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest, so bf16 gradients may differ
from the reference by one unit in the last place: the bf16 tolerance is one ulp (2**-7 relative).
"""

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted

with interpreted():
    from moe_trace.cross_entropy import (
        cross_entropy,
        cross_entropy_loss_and_grad,
        linear_cross_entropy,
        linear_cross_entropy_and_grads,
    )


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    with interpreted():  # the launch configuration reads it per call
        yield


# rows, vocab, padded_vocab. The interpreter's column block is 256 (moe_trace.cross_entropy._launch_config):
# several blocks with a ragged tail, one block, no padding, a whole block of padding, a single row.
SHAPES = [(37, 1000, 1024), (5, 300, 384), (3, 77, 128), (16, 512, 512), (4, 250, 512), (1, 2, 2)]
# scale 30 puts logits in the hundreds: a naive exp overflows float32, the online max must not.
SCALES = [1.0, 30.0]


def _logits_and_targets(rows, vocab, padded_vocab, dtype, scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, padded_vocab, generator=generator) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return logits, targets


def _reference(logits, targets, vocab):
    """The loss and gradient the model computed before: F.cross_entropy on the float32 upcast."""
    logits = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(logits[:, :vocab].float(), targets)
    loss.backward()
    return loss.detach(), logits.grad


def _fused(logits, targets, vocab):
    logits = logits.detach().clone().requires_grad_()
    loss = cross_entropy(logits, targets, vocab)
    loss.backward()
    return loss.detach(), logits.grad


def _assert_matches_reference(logits, targets, vocab, loss_atol=1e-5):
    """The fused loss and gradient equal :func:`_reference`'s; returns the fused pair for further checks."""
    (loss, grad), (expected_loss, expected) = _fused(logits, targets, vocab), _reference(logits, targets, vocab)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=loss_atol)
    _assert_grad_close(grad, expected)
    return loss, grad


def _assert_grad_close(grad, expected):
    assert grad.dtype == expected.dtype and grad.shape == expected.shape
    # bf16: one ulp. float32: exp(x - lse) with |x| in the hundreds carries lse's float32 rounding.
    rtol = 2.0**-7 if grad.dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.float(), expected.float(), rtol=rtol, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grad_match_f_cross_entropy(shape, dtype, scale):
    rows, vocab, padded_vocab = shape
    logits, targets = _logits_and_targets(rows, vocab, padded_vocab, dtype, scale)
    loss, grad = _assert_matches_reference(logits, targets, vocab)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.all(grad[:, vocab:] == 0)


def test_target_at_the_row_maximum_and_in_the_last_real_column():
    rows, vocab, padded_vocab = 4, 300, 384
    logits, _ = _logits_and_targets(rows, vocab, padded_vocab, torch.float32, 1.0)
    targets = torch.tensor([vocab - 1, 0, 257, 256])
    logits[torch.arange(rows), targets] = 50.0  # the target dominates: loss ~ 0, gradient ~ 0
    _assert_matches_reference(logits, targets, vocab, loss_atol=1e-7)


def test_padding_logits_do_not_leak_into_the_loss():
    logits, targets = _logits_and_targets(6, 100, 128, torch.float32, 1.0)
    logits[:, 100:] = 1e4  # would dominate the log-sum-exp if the kernel read past `vocab`
    _assert_matches_reference(logits, targets, 100)


def test_backward_scales_by_the_upstream_gradient():
    logits, targets = _logits_and_targets(9, 200, 256, torch.bfloat16, 1.0)
    fused = logits.clone().requires_grad_()
    (cross_entropy(fused, targets, 200) * 0.25).backward()
    reference = logits.clone().requires_grad_()
    (F.cross_entropy(reference[:, :200].float(), targets) * 0.25).backward()
    _assert_grad_close(fused.grad, reference.grad)


def test_logits_are_not_modified():
    logits, targets = _logits_and_targets(7, 300, 384, torch.bfloat16, 3.0)
    before = logits.clone()
    cross_entropy(logits.requires_grad_(), targets, 300).backward()
    assert torch.equal(logits.detach(), before)


def test_strided_rows():
    # logits a column slice of a wider buffer: the kernel must follow the row stride, not assume padded_vocab.
    wide, targets = _logits_and_targets(11, 300, 512, torch.float32, 2.0)
    logits = wide[:, :384]
    assert logits.stride(0) == 512
    _assert_matches_reference(logits, targets, 300)


def test_torch_compile_keeps_the_op_in_the_graph():
    # fullgraph=True fails on a graph break; aot_eager traces the fake implementation and the autograd formula.
    logits, targets = _logits_and_targets(13, 300, 384, torch.bfloat16, 1.0)

    def loss_fn(logits, targets):
        return 2.0 * cross_entropy(logits, targets, 300)

    compiled = logits.clone().requires_grad_()
    loss = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(compiled, targets)
    loss.backward()
    eager = logits.clone().requires_grad_()
    expected = loss_fn(eager, targets)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=0, atol=0)


def test_opcheck():
    # The custom op's registrations (schema, fake implementation, autograd) agree with its real behaviour.
    logits, targets = _logits_and_targets(5, 100, 128, torch.float32, 1.0)
    torch.library.opcheck(cross_entropy_loss_and_grad, (logits.requires_grad_(), targets, 100))


@pytest.mark.parametrize("logits_shape, targets_shape, vocab", [
    ((4, 8), (3,), 8),       # one target per row
    ((2, 4, 8), (2, 4), 8),  # rows must be flattened by the caller
    ((4, 8), (4,), 9),       # vocab past the padded width
    ((4, 8), (4,), 0),
])
def test_rejects_bad_shapes(logits_shape, targets_shape, vocab):
    with pytest.raises(ValueError):
        cross_entropy(torch.zeros(logits_shape), torch.zeros(targets_shape, dtype=torch.int64), vocab)


@pytest.mark.parametrize("upstream", [1.0, 0.25])
def test_linear_cross_entropy_matches_the_head_then_the_loss(upstream):
    # The head's backward, done in the forward and scaled by the upstream gradient in the backward, equals
    # autograd through F.linear and F.cross_entropy (float32: no rounding between the two orders).
    generator = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(37, 24, generator=generator), torch.randn(384, 24, generator=generator)
    targets = torch.randint(0, 300, (37,), generator=generator)
    fused_hidden, fused_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, logits = linear_cross_entropy(fused_hidden, fused_weight, targets, 300)
    (loss * upstream).backward()
    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logits = F.linear(ref_hidden, ref_weight)
    ref_loss = F.cross_entropy(ref_logits[:, :300], targets)
    (ref_loss * upstream).backward()
    torch.testing.assert_close(logits, ref_logits.detach(), rtol=0, atol=0)
    assert not logits.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(fused_weight.grad[300:] == 0)  # padding rows of the head learn nothing


def test_linear_cross_entropy_runs_in_the_autocast_dtype():
    # Under autocast the GEMMs take bf16 copies; gradients come back in the inputs' float32.
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(16, 32, generator=generator).requires_grad_()
    weight = torch.randn(256, 32, generator=generator).requires_grad_()
    targets = torch.randint(0, 250, (16,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = linear_cross_entropy(hidden, weight, targets, 250)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.detach().bfloat16() @ weight.detach().bfloat16().T, rtol=0, atol=0)
    reference = hidden.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(reference, weight.detach())[:, :250], targets).backward()
    assert (hidden.grad - reference.grad).norm() / reference.grad.norm() < 2e-2  # bf16 GEMMs


def test_linear_cross_entropy_compiles_and_passes_opcheck():
    generator = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(5, 8, generator=generator), torch.randn(128, 8, generator=generator)
    targets = torch.randint(0, 100, (5,), generator=generator)
    torch.library.opcheck(linear_cross_entropy_and_grads,
                          (hidden.requires_grad_(), weight.requires_grad_(), targets, 100, torch.float32))

    def loss_fn(hidden, weight):
        return 3.0 * linear_cross_entropy(hidden, weight, targets, 100)[0]

    compiled, eager = (hidden.detach().clone().requires_grad_() for _ in range(2))
    torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(compiled, weight).backward()
    loss_fn(eager, weight).backward()
    torch.testing.assert_close(compiled.grad, eager.grad, rtol=0, atol=0)


@pytest.mark.parametrize("hidden_shape, weight_shape, targets_shape, vocab", [
    ((4, 8), (16, 6), (4,), 16),   # widths differ
    ((4, 8), (16, 8), (3,), 16),   # one target per row
    ((4, 8), (16, 8), (4,), 17),   # vocab past the head
])
def test_linear_cross_entropy_rejects_bad_shapes(hidden_shape, weight_shape, targets_shape, vocab):
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.zeros(hidden_shape), torch.zeros(weight_shape),
                             torch.zeros(targets_shape, dtype=torch.int64), vocab)


def test_linear_cross_entropy_without_gradients_gives_the_same_loss_and_logits():
    # Evaluation (no_grad) skips the head's backward GEMMs; what it returns is what training's forward returns.
    generator = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(9, 16, generator=generator), torch.randn(128, 16, generator=generator)
    targets = torch.randint(0, 120, (9,), generator=generator)
    loss, logits = linear_cross_entropy(hidden.requires_grad_(), weight.requires_grad_(), targets, 120)
    with torch.no_grad():
        eval_loss, eval_logits = linear_cross_entropy(hidden, weight, targets, 120)
    torch.testing.assert_close(eval_loss, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(eval_logits, logits, rtol=0, atol=0)
