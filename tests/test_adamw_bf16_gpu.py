"""adamw_bf16's Triton kernel compiled on a CUDA GPU (skipped without one): the same float32 arithmetic as the torch
reference on the same device, unbiased rounding, one compiled variant whatever the learning rate, no host sync.

Triton fixes interpreter-or-compiled when a kernel is decorated: if tests/test_adamw_bf16.py ran first in the same
process, moe_trace.adamw_bf16_kernel holds the interpreted kernel and these tests skip (run this file on its own:
``python -m pytest tests/test_adamw_bf16_gpu.py``).
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BETAS = (0.9, 0.95)
SHAPES = [(1,), (7,), (4097,), (3, 5000), (8192,), (3, 40977)]


@pytest.fixture(autouse=True)
def _compiled_kernel():
    pytest.importorskip("triton", reason="needs Triton")
    import triton

    from moe_trace.adamw_bf16_kernel import _adamw_bf16_kernel

    if not isinstance(_adamw_bf16_kernel, triton.runtime.JITFunction):
        pytest.skip("moe_trace.adamw_bf16_kernel was imported under TRITON_INTERPRET=1 (run this file on its own)")


def _inputs(seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)

    def draw(shape, scale=1.0):
        return (torch.randn(shape, device="cuda", generator=generator) * scale).bfloat16()

    return [(draw(s), draw(s), draw(s, 0.1), draw(s, 0.01).abs()) for s in SHAPES]


def _in_bf16_neighbours(p, p32):
    """Whether every bf16 value of ``p`` is one of the two bf16 values around its float32 ``p32``."""
    bits = p32.view(torch.int32) & -(1 << 16)
    return bool(((p.float() == bits.view(torch.float32)) | (p.float() == (bits + (1 << 16)).view(torch.float32))).all())


@pytest.mark.parametrize("stochastic", [False, True])
def test_kernel_equals_the_reference_on_the_gpu(stochastic):
    """IEEE division and square root, no fused multiply-adds: the kernel computes the reference's float32 values
    to the bit, so the moments (and, rounded to nearest, the weights) are equal; rounded stochastically, each
    weight is one of the two bf16 neighbours of the reference's."""
    from moe_trace.adamw_bf16 import update_float32, update_scalars
    from moe_trace.adamw_bf16_kernel import KernelTable, launch

    inputs = _inputs()
    s = update_scalars(1e-2, *BETAS, 1e-8, 0.1, 3)
    scale = torch.tensor(2.5, device="cuda")
    expected = [update_float32(p, g, m, v, s, scale) for p, g, m, v in inputs]
    p, g, m, v = ([t.clone() for t in ts] for ts in zip(*inputs, strict=True))
    table = KernelTable(p, m, v)
    table.set_grads([t.data_ptr() for t in g])
    launch(table, s, scale, (1 << 62) + 1, stochastic)
    for (p32, m32, v32), p_new, m_new, v_new in zip(expected, p, m, v, strict=True):
        assert torch.equal(m_new, m32.bfloat16()) and torch.equal(v_new, v32.bfloat16())
        if not stochastic:
            assert torch.equal(p_new, p32.bfloat16())
            continue
        assert _in_bf16_neighbours(p_new, p32)


def test_stochastic_rounding_is_unbiased_on_the_gpu():
    from moe_trace.adamw_bf16 import AdamWBF16

    p = torch.nn.Parameter(torch.ones(1 << 22, device="cuda", dtype=torch.bfloat16))
    optimizer = AdamWBF16([p], lr=0.3 * 2**-8, weight_decay=1.0, betas=BETAS)  # decay alone: 1 -> 1 - 0.3 / 256
    p.grad = torch.zeros_like(p)
    optimizer.step()
    assert set(p.detach().float().unique().tolist()) == {1 - 2**-8, 1.0}
    standard_error = (0.3 * 0.7 / p.numel()) ** 0.5 * 2**-8
    assert abs(p.detach().double().mean().item() - (1 - 0.3 * 2**-8)) < 4 * standard_error


def test_a_schedule_runs_one_compiled_kernel_without_a_host_sync():
    """A new learning rate, grad_scale, seed and gradient buffers every step, and a step where one parameter has
    no gradient (its step count lags from then on: a second launch for its group): every update is the reference's,
    one compiled variant of the kernel serves them all, and nothing in step() waits on the device (torch's sync
    debug mode raises on a synchronizing call)."""
    from moe_trace import adamw_bf16_kernel, optim
    from moe_trace.adamw_bf16 import update_float32, update_scalars

    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.GELU(), torch.nn.LayerNorm(300),
                                torch.nn.Linear(300, 7)).cuda()
    optim.cast_parameters(model, "adamw_bf16")
    optimizer = optim.build("adamw_bf16", model, 1e-3, 0.1, torch.device("cuda"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))

    def compiled():
        return sum(len(c[0]) if isinstance(c, tuple) else len(c)
                   for c in adamw_bf16_kernel._adamw_bf16_kernel.device_caches.values())

    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    lagging = model[0].bias
    variants = []
    for step in range(6):
        model(x).float().square().mean().backward()
        if step == 3:
            lagging.grad = None
        scale = torch.tensor(1.0 + step, device="cuda")
        expected = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = optimizer.state[p]
                m, v = (state["exp_avg"], state["exp_avg_sq"]) if state else (torch.zeros_like(p),) * 2
                t = state["step"].item() + 1 if state else 1
                s = update_scalars(group["lr"], *optim.BETAS, group["eps"], group["weight_decay"], t)
                expected[p] = update_float32(p, p.grad, m, v, s, scale)
        optimizer.grad_scale = scale
        if step > 0:  # the first step compiles
            torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for p, (p32, m32, v32) in expected.items():
            assert torch.equal(optimizer.state[p]["exp_avg"], m32.bfloat16())
            assert torch.equal(optimizer.state[p]["exp_avg_sq"], v32.bfloat16())
            assert _in_bf16_neighbours(p, p32)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        variants.append(compiled())
    assert len(set(variants)) == 1
    assert [optimizer.state[p]["step"].item() for p in model.parameters()] == [6, 5, 6, 6, 6, 6]
