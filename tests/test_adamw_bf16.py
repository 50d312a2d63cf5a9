"""adamw_bf16 on CPU: the torch reference against float64 AdamW, the Triton kernel (under Triton's interpreter)
against the reference, stochastic rounding's bias, state-dict round trips and a short training run.

The kernel is imported, and the tests run, under Triton's interpreter (tests/triton_interpreter.py); tests of the
reference path unset ``TRITON_INTERPRET`` (CPU tensors then take the reference). The kernel rounds to bf16 with
integer operations, not the interpreter's float32 -> bf16 conversion, so moments match the reference bit for bit.
"""

import io
import math

import pytest
import torch
from triton_interpreter import interpreted

with interpreted():
    from moe_trace import adamw_bf16_kernel
    from moe_trace.adamw_bf16 import (
        AdamWBF16,
        reference_step_,
        round_bf16_stochastic,
        update_float32,
        update_scalars,
    )

BETAS = (0.9, 0.95)
SHAPES = [(1,), (7,), (4097,), (3, 5000)]  # one element, under a vector, past a chunk's half, a full chunk + tail


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    with interpreted():  # the optimizer reads it at each step
        yield


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _adamw_float64(p, grads, lrs, weight_decay, eps, grad_scales):
    """Textbook AdamW (decoupled weight decay, bias-corrected moments) in float64."""
    beta1, beta2 = BETAS
    p, m, v = p.double(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, (grad, lr, scale) in enumerate(zip(grads, lrs, grad_scales, strict=True), start=1):
        g = grad.double() / scale
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    return p, m, v


def test_reference_without_rounding_is_adamw():
    """In float32 storage (no rounding to bf16) the reference is AdamW to float32 precision: weight decay, bias
    correction (steps 1..6, where it matters most), a changing learning rate and grad_scale included."""
    generator = torch.Generator().manual_seed(0)
    p0 = torch.randn(1000, generator=generator)
    grads = [torch.randn(1000, generator=generator) * (t + 1) for t in range(6)]
    lrs, scales, weight_decay, eps = [1e-2 * 0.8**t for t in range(6)], [1.0, 2.5, 1.0, 4.0, 3.0, 1.5], 0.1, 1e-8
    p, m, v = p0.clone(), torch.zeros(1000), torch.zeros(1000)
    for t, (grad, lr, scale) in enumerate(zip(grads, lrs, scales, strict=True), start=1):
        s = update_scalars(lr, *BETAS, eps, weight_decay, t)
        reference_step_(p, grad, m, v, s, grad_scale=torch.tensor(scale), generator=None)
    expected = _adamw_float64(p0, grads, lrs, weight_decay, eps, scales)
    for got, want in zip((p, m, v), expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    assert (p - p0).abs().mean() > 1e-2  # the steps moved the weights far beyond the tolerance


def _bf16_neighbours(x):
    """The bf16 values just below and above float32 ``x`` in magnitude (equal when ``x`` is a bf16 value)."""
    bits = x.view(torch.int32)
    toward_zero = bits & -(1 << 16)
    away = torch.where(bits & 0xFFFF == 0, toward_zero, toward_zero + (1 << 16))
    return toward_zero.view(torch.float32).bfloat16(), away.view(torch.float32).bfloat16()


def _groups(seed):
    """Tensors of SHAPES in two groups with different weight decay, and per-step gradients (step 2 leaves one
    tensor without a gradient, so its bias correction lags the others from then on)."""
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).bfloat16()) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=generator).bfloat16() for shape in SHAPES] for _ in range(3)]
    grads[1][1] = None
    return params, grads


def _optimizer(params, **kwargs):
    return AdamWBF16([{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}],
                     lr=3e-2, betas=BETAS, **kwargs)


def test_kernel_equals_the_reference_to_the_bit_when_rounding_to_nearest(monkeypatch):
    """Several tensors of odd sizes in two groups, grad_scale set: with the weight rounded to nearest the kernel
    and the reference give the same weights and moments, bit for bit, over three steps."""
    results, launches = [], []
    monkeypatch.setattr(adamw_bf16_kernel, "launch",
                        lambda *args, _real=adamw_bf16_kernel.launch: (launches.append(1), _real(*args)))
    for interpret in (True, False):
        if not interpret:
            monkeypatch.delenv("TRITON_INTERPRET")
        params, grads = _groups(seed=1)
        optimizer = _optimizer(params, stochastic_round=False)
        launches.clear()
        for step, step_grads in enumerate(grads):
            optimizer.grad_scale = torch.tensor(1.0 + step)
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g
            optimizer.step()
        # One launch a group a step, and two for group 1 in step 3 (one tensor's step count lags there).
        assert len(launches) == (7 if interpret else 0)
        results.append([(p.detach().clone(), optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"],
                         optimizer.state[p]["step"]) for p in params])
    for kernel, reference in zip(*results, strict=True):
        for a, b in zip(kernel, reference, strict=True):
            assert torch.equal(a, b)
    assert [r[3].item() for r in results[0]] == [3.0, 2.0, 3.0, 3.0]


def test_kernel_rounds_the_reference_weight_to_one_of_its_bf16_neighbours():
    """Stochastic rounding: each step the kernel's moments equal the reference's exactly and each weight is one of
    the two bf16 neighbours of the reference's float32 weight, both neighbours being taken."""
    params, grads = _groups(seed=2)
    position = {id(p): i for i, p in enumerate(params)}
    optimizer = _optimizer(params)
    took = {"toward_zero": 0, "away": 0}
    for step, step_grads in enumerate(grads):
        scale = torch.tensor(2.0 + step)
        expected = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = step_grads[position[id(p)]]
                if g is None:
                    expected.append(None)
                    continue
                state = optimizer.state[p]
                m, v = (state["exp_avg"], state["exp_avg_sq"]) if state else (torch.zeros_like(p),) * 2
                t = state["step"].item() + 1 if state else 1
                s = update_scalars(group["lr"], *BETAS, group["eps"], group["weight_decay"], t)
                expected.append((p, update_float32(p, g, m, v, s, scale)))
        optimizer.grad_scale = scale
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        optimizer.step()
        for item in filter(None, expected):
            p, (p32, m32, v32) = item
            assert torch.equal(optimizer.state[p]["exp_avg"], m32.bfloat16())
            assert torch.equal(optimizer.state[p]["exp_avg_sq"], v32.bfloat16())
            toward_zero, away = _bf16_neighbours(p32)
            assert ((p == toward_zero) | (p == away)).all()
            took["toward_zero"] += int(((p == toward_zero) & (toward_zero != away)).sum())
            took["away"] += int(((p == away) & (toward_zero != away)).sum())
    assert min(took.values()) > 1000


def _assert_unbiased(rounded, value, low, high):
    """Every result is ``low`` or ``high`` and their mean is ``value`` within four standard errors."""
    assert set(rounded.float().unique().tolist()) <= {low, high}
    fraction_high = (value - low) / (high - low)
    standard_error = math.sqrt(fraction_high * (1 - fraction_high) / rounded.numel())
    assert abs(rounded.double().mean().item() - value) < 4 * standard_error * (high - low)


@pytest.mark.parametrize("sign", [1, -1])
def test_reference_stochastic_rounding_is_unbiased(sign):
    value = sign * (1 + 0.3 * 2**-7)  # between the bf16 neighbours 1 and 1 + 2**-7, 30 % of the way up
    x = torch.full((200_000,), value, dtype=torch.float32)
    rounded = round_bf16_stochastic(x, torch.Generator().manual_seed(0))
    low, high = sorted((sign * 1.0, sign * (1 + 2**-7)))
    _assert_unbiased(rounded, torch.tensor(value).item(), low, high)


def test_kernel_stochastic_rounding_is_unbiased_and_its_bits_differ_across_the_chunk():
    """Weight decay alone (zero gradients) takes weights of 1 to 1 - 0.3 * 2**-8, 30 % of the way between the bf16
    neighbours 1 - 2**-8 and 1: the kernel's rounding is unbiased, and no two of a chunk's eight blocks of Philox
    draws (four words, two halves each), nor two chunks, round alike."""
    p = torch.nn.Parameter(torch.ones(3 * adamw_bf16_kernel.CHUNK, dtype=torch.bfloat16))
    optimizer = AdamWBF16([p], lr=0.3 * 2**-8, weight_decay=1.0, betas=BETAS)
    p.grad = torch.zeros_like(p)
    optimizer.step()
    _assert_unbiased(p.detach(), 1 - 0.3 * 2**-8, 1 - 2**-8, 1.0)
    blocks = p.detach().view(-1, adamw_bf16_kernel.SUB)
    assert len({tuple(block.tolist()) for block in blocks}) == len(blocks)


def _train_steps(optimizer, params, steps, first=0):
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).bfloat16()
        optimizer.grad_scale = torch.tensor(1.0 + step % 3)
        optimizer.step()


def test_state_dict_round_trip_resumes_exactly(reference_path):
    """Saved after 3 steps and loaded into a fresh optimizer (built under another seed), 2 more steps give the
    weights and state of 5 straight steps, bit for bit: the rounding's generator travels in the state dict."""
    torch.manual_seed(0)
    params, _ = _groups(seed=3)
    straight = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = _optimizer(params)
    _train_steps(optimizer, params, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(0)
    whole = _optimizer(straight)
    _train_steps(whole, straight, 5)

    torch.manual_seed(1234)  # a fresh optimizer's own generator would differ
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    optimizer = _optimizer(resumed)
    optimizer.load_state_dict(saved["optimizer"])
    _train_steps(optimizer, resumed, 2, first=3)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[a][key], whole.state[b][key])


def test_a_torchao_state_dict_loads(reference_path):
    """torchao's _AdamW keeps lr as a CPU tensor and amsgrad in its groups, step as a float32 CPU scalar, bf16
    moments, and no generator: such a checkpoint loads, and the learning-rate scheduler keeps working."""
    p = torch.nn.Parameter(torch.randn(10).bfloat16())
    torchao_state = {
        "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.full((10,), 0.1, dtype=torch.bfloat16),
                      "exp_avg_sq": torch.full((10,), 0.01, dtype=torch.bfloat16)}},
        "param_groups": [{"lr": torch.tensor(5e-3), "betas": BETAS, "eps": 1e-8, "weight_decay": 0.1,
                          "amsgrad": False, "params": [0]}],
    }
    optimizer = AdamWBF16([p], lr=1e-3, betas=BETAS)
    optimizer.load_state_dict(torchao_state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    p.grad = torch.ones_like(p)
    state = torchao_state["state"][0]
    # Step 8's bias corrections, from the loaded moments.
    s = update_scalars(optimizer.param_groups[0]["lr"], *BETAS, 1e-8, 0.1, 8)
    p32, m32, v32 = update_float32(p, p.grad, state["exp_avg"], state["exp_avg_sq"], s)
    optimizer.step()
    scheduler.step()
    assert optimizer.state[p]["step"].item() == 8.0
    assert torch.equal(optimizer.state[p]["exp_avg"], m32.bfloat16())
    assert torch.equal(optimizer.state[p]["exp_avg_sq"], v32.bfloat16())
    toward_zero, away = _bf16_neighbours(p32)
    assert ((p == toward_zero) | (p == away)).all()


def test_the_optimizer_trains_a_small_model(reference_path):
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = torch.sin(x @ torch.randn(16, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).bfloat16()
    optimizer = AdamWBF16(model.parameters(), lr=1e-2, betas=BETAS, weight_decay=0.01)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        AdamWBF16([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], amsgrad=True)
    with pytest.raises(ValueError, match="bfloat16"):
        AdamWBF16([torch.nn.Parameter(torch.zeros(3))])
