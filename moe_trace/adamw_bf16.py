"""AdamW over bf16 weights with bf16 moments and stochastically rounded weight updates (``--optimizer adamw_bf16``).

Each update is computed in float32 from the bf16 weight, gradient and moments. The moments are stored back to
bf16 rounded to nearest; the weight *stochastically*: 16 uniform random bits are added to the low half of the
float32 result's bit pattern before it is truncated to bf16, so an update far below bf16's resolution still moves
the weight by the right amount on average instead of vanishing. Per element, with ``t`` the parameter's step::

    g = grad / grad_scale                      (grad_scale: an optional 0-dim device tensor, see below)
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g            (exp_avg)
    v = beta2 * v + (1 - beta2) * g * g        (exp_avg_sq)
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

the same update as torchao's ``_AdamW(bf16_stochastic_round=True)``, whose state it keeps (``step``: a float32
CPU scalar per parameter; ``exp_avg``, ``exp_avg_sq``: bf16 like the parameter), so its checkpoints load here.

On CUDA the whole step is one Triton launch per parameter group (:mod:`moe_trace.adamw_bf16_kernel`): 14 bytes
of memory traffic a parameter. Elsewhere (CPU) :func:`reference_step_` does it in plain torch.

``grad_scale``: like torch's fused AdamW, the optimizer reads ``self.grad_scale`` (a 0-dim float32 tensor on the
parameters' device, or None) and divides every gradient by it inside the update, so gradient clipping needs no
pass of its own over the gradients (set it to ``max(1, total_norm / max_norm)``). Nothing in :meth:`step`
waits on the device.

Random bits come from a per-step seed drawn from the optimizer's own generator (seeded from
``torch.initial_seed()`` and saved in its state dict, so a resumed run rounds as the uninterrupted one would).
The kernel turns the seed and each element's position into bits with Philox; the CPU reference draws them
from a torch generator seeded alike: the two paths round the same values with different bits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

# Seeds in [2**62, 2**63): always a 64-bit integer to Triton (a seed that fit 32 bits would compile another
# variant of the kernel), and seed + launch index never overflows.
_SEED_BASE = 1 << 62


class UpdateScalars(NamedTuple):
    """The per-step constants of one group's update, computed on the host in float64; both paths take them as
    float32, so the reference and the kernel do the same float32 arithmetic."""

    decay: float  # 1 - lr * weight_decay
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1**t)
    inv_sqrt_bc2: float  # 1 / sqrt(1 - beta2**t)


def update_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   step: float) -> UpdateScalars:
    """:class:`UpdateScalars` for step ``step`` (counted from 1)."""
    return UpdateScalars(decay=1.0 - lr * weight_decay, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2,
                         one_minus_beta2=1.0 - beta2, eps=eps, step_size=lr / (1.0 - beta1**step),
                         inv_sqrt_bc2=1.0 / math.sqrt(1.0 - beta2**step))


def update_float32(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: UpdateScalars,
                   grad_scale: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The new weight and moments in float32, before any rounding to the stored dtypes.

    Operation for operation what the kernel computes (it multiplies by the reciprocal of ``grad_scale``, and
    multiplies by ``inv_sqrt_bc2`` rather than dividing by ``sqrt(bc2)``), so under Triton's interpreter, which
    rounds every float32 operation as torch does on the CPU, the two agree to the bit.
    """
    g = grad.float()
    if grad_scale is not None:
        g = g * (1.0 / grad_scale.float())
    p32 = p.float() * s.decay
    m32 = exp_avg.float() * s.beta1 + g * s.one_minus_beta1
    v32 = exp_avg_sq.float() * s.beta2 + (g * g) * s.one_minus_beta2
    denom = v32.sqrt() * s.inv_sqrt_bc2 + s.eps
    return p32 - (m32 / denom) * s.step_size, m32, v32


def round_bf16_stochastic(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (float32) to bf16, rounded up in magnitude with probability (dropped low 16 bits) / 2**16: unbiased."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # The low 16 bits are zero after the mask, so the conversion to bf16 is exact. NaN keeps being NaN.
    rounded = ((bits + noise) & -(1 << 16)).view(torch.float32)
    return torch.where(x.isnan(), x, rounded).to(torch.bfloat16)


def reference_step_(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, s: UpdateScalars,
                    grad_scale: Tensor | None = None, generator: torch.Generator | None = None,
                    stochastic: bool = True) -> None:
    """One update of ``p``, ``exp_avg`` and ``exp_avg_sq`` in place, in plain torch (any device, any float dtype).

    A bf16 ``p`` is rounded stochastically with bits from ``generator`` (to nearest if not ``stochastic``);
    float32 tensors store the float32 results exactly (the tests compare that against float64 AdamW).
    """
    p32, m32, v32 = update_float32(p, grad, exp_avg, exp_avg_sq, s, grad_scale)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)
    if stochastic and p.dtype == torch.bfloat16:
        p.copy_(round_bf16_stochastic(p32, generator))
    else:
        p.copy_(p32)


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``): then CPU tensors take the
    kernel path too (the tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class _Bucket(NamedTuple):
    """Parameters of one group with the same step count (so the same bias corrections): one launch."""

    first: int  # a position in the group's parameters whose step count stands for the bucket's
    kernel: list[int]  # positions the kernel updates (through ``table``)
    reference: list[int]  # positions the torch reference updates
    table: Any  # moe_trace.adamw_bf16_kernel.KernelTable, or None without kernel positions


class _GroupPlan:
    """What one group's step does, kept from step to step while the same parameters have gradients and no
    parameter or state tensor was replaced, so a step does little more on the host than read the gradients'
    addresses. The group's step counts live in one float32 CPU tensor whose elements are the parameters'
    ``state["step"]`` (views): one increment a step for the whole group."""

    def __init__(self, optimizer: AdamWBF16, params: list[Tensor], present: list[int], use_kernel: bool) -> None:
        self.present, self.use_kernel = present, use_kernel
        for i in present:
            optimizer._init_state(params[i])
        states = [optimizer.state.get(p) or {} for p in params]  # .get: no empty state for a gradient-less one
        self.steps = torch.tensor([float(state.get("step", 0.0)) for state in states], dtype=torch.float32)
        for state, view in zip(states, self.steps.unbind(0), strict=True):
            if state:
                state["step"] = view
        self.present_index = torch.tensor(present) if len(present) < len(params) else None
        self.ptrs = [params[i].data_ptr() for i in present]
        self.states = [states[i] for i in present]
        self.tensors = [(state["step"], state["exp_avg"], state["exp_avg_sq"]) for state in self.states]
        by_step: dict[float, list[int]] = {}
        for i in present:  # parameters that missed a step's gradient have fewer steps
            by_step.setdefault(float(self.steps[i]), []).append(i)
        self.buckets = []
        for positions in by_step.values():
            kernel = [i for i in positions if use_kernel and _kernel_can_update(params[i], states[i])]
            table = None
            if kernel:
                from moe_trace.adamw_bf16_kernel import KernelTable

                table = KernelTable([params[i] for i in kernel], [states[i]["exp_avg"] for i in kernel],
                                    [states[i]["exp_avg_sq"] for i in kernel])
            self.buckets.append(_Bucket(positions[0], kernel, [i for i in positions if i not in kernel], table))

    def still_valid(self, params: list[Tensor], present: list[int], use_kernel: bool) -> bool:
        return (present == self.present and use_kernel == self.use_kernel
                and [params[i].data_ptr() for i in present] == self.ptrs
                and all(state.get("step") is step and state.get("exp_avg") is m and state.get("exp_avg_sq") is v
                        for state, (step, m, v) in zip(self.states, self.tensors, strict=True)))

    def count_step(self) -> list[float]:
        """Add one to the step count of every parameter with a gradient; every parameter's count."""
        if self.present_index is None:
            self.steps += 1
        else:
            self.steps[self.present_index] += 1
        return self.steps.tolist()


def _kernel_can_read(t: Tensor) -> bool:
    """A contiguous bf16 tensor at a 16-byte aligned address (the kernel's vector loads); anything else (a strided
    view, say) takes the reference."""
    return t.dtype == torch.bfloat16 and t.is_contiguous() and t.data_ptr() % 16 == 0


def _kernel_can_update(p: Tensor, state: dict[str, Tensor]) -> bool:
    """The parameter and its moments; the gradient is checked at each step."""
    return all(_kernel_can_read(t) for t in (p, state["exp_avg"], state["exp_avg_sq"]))


class AdamWBF16(torch.optim.Optimizer):
    """AdamW for bf16 parameters: bf16 moments, stochastically rounded weights (see the module docstring).

    ``stochastic_round=False`` rounds the weights to nearest instead (for tests). ``amsgrad`` is refused.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, stochastic_round: bool = True) -> None:
        if not lr >= 0.0 or not eps >= 0.0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        self._plans: dict[int, _GroupPlan] = {}  # by group index
        super().__init__(params, defaults)
        self.stochastic_round = stochastic_round
        self.grad_scale: Tensor | None = None
        self._rng = torch.Generator().manual_seed(torch.initial_seed())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["amsgrad"]:
            raise ValueError("adamw_bf16 does not support amsgrad")
        for p in group["params"]:
            if p.dtype != torch.bfloat16:
                raise ValueError(f"adamw_bf16 needs bfloat16 parameters, got {p.dtype} "
                                 "(moe_trace.optim.cast_parameters casts them)")
        self._plans.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self._rng.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop("rng", None)  # absent from torchao's checkpoints: keep this optimizer's own
        super().load_state_dict(state_dict)
        if rng is not None:
            self._rng.set_state(rng)
        for group in self.param_groups:
            group["lr"] = float(group["lr"])  # torchao keeps lr as a CPU tensor
            if group.get("amsgrad"):
                raise ValueError("adamw_bf16 does not support amsgrad")
            group.setdefault("amsgrad", False)
        for state in self.state.values():
            if "step" in state:  # a float32 CPU scalar, as torchao keeps it: read without a device sync
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device="cpu").reshape(())
        self._plans.clear()

    def _next_seed(self) -> int:
        return _SEED_BASE + int(torch.randint(0, _SEED_BASE, (), generator=self._rng))

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seed = self._next_seed()  # drawn every step, whatever the path, so both paths see the same seeds
        launches = 0
        generators: dict[torch.device, torch.Generator] = {}
        grad_scale = self.grad_scale
        if grad_scale is not None and grad_scale.dtype != torch.float32:
            grad_scale = grad_scale.float()
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            present = [i for i, g in enumerate(grads) if g is not None]
            if not present:
                continue
            device = params[present[0]].device
            if grad_scale is not None and (grad_scale.device != device or grad_scale.numel() != 1):
                raise ValueError(f"grad_scale must be one value on {device}, got {tuple(grad_scale.shape)} on "
                                 f"{grad_scale.device}")
            use_kernel = device.type == "cuda" or interpreting()
            plan = self._plans.get(index)
            if plan is None or not plan.still_valid(params, present, use_kernel):
                plan = self._plans[index] = _GroupPlan(self, params, present, use_kernel)
            steps = plan.count_step()
            beta1, beta2 = group["betas"]
            for bucket in plan.buckets:
                s = update_scalars(float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
                                   steps[bucket.first])
                reference = bucket.reference
                if bucket.table is not None:
                    kernel_grads = [grads[i] for i in bucket.kernel]
                    if all(_kernel_can_read(g) for g in kernel_grads):
                        from moe_trace.adamw_bf16_kernel import launch

                        bucket.table.set_grads([g.data_ptr() for g in kernel_grads])
                        launch(bucket.table, s, grad_scale, seed + launches, self.stochastic_round)
                        launches += 1
                    else:  # an odd gradient this step (autograd's match their parameter's layout)
                        reference = bucket.kernel + reference
                for i in reference:
                    p, state = params[i], self.state[params[i]]
                    if p.device not in generators:
                        generators[p.device] = torch.Generator(p.device).manual_seed(seed)
                    reference_step_(p, grads[i], state["exp_avg"], state["exp_avg_sq"], s, grad_scale,
                                    generators[p.device], self.stochastic_round)
        return loss
