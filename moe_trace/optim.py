"""The optimizers training can use, and the GPU memory each one's training state takes per parameter.

``adamw`` keeps float32 weights, gradients and moments (torch's fused AdamW): exact, 16 bytes a parameter.
The lean options keep the weights (and so the gradients) in bf16 and compute each update in float32, then
round the new weight to bf16 *stochastically*: an update far below bf16's resolution still moves the weight
by the right amount on average instead of vanishing:

- ``adamw_bf16``: bf16 moments; 8 bytes a parameter. This project's own (:mod:`moe_trace.adamw_bf16`): on CUDA
  one Triton launch a parameter group updates every tensor; on CPU a plain-torch reference.
- ``adamw8bit``: 8-bit block-quantized moments (block 256, one float32 scale a block; tensors under 4096
  values keep bf16 moments); about 6 bytes a parameter. torchao's, compiled per parameter (CUDA only).

``auto`` takes the most exact option whose state fits (:func:`moe_trace.memory.choose_optimizer`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moe_trace.errors import UsageError


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    bytes_per_parameter: float  # weights + gradients + optimizer state
    weight_dtype: torch.dtype
    needs_torchao: bool


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("adamw", 16, torch.float32, needs_torchao=False),
    "adamw_bf16": OptimizerSpec("adamw_bf16", 8, torch.bfloat16, needs_torchao=False),
    "adamw8bit": OptimizerSpec("adamw8bit", 2 + 2 + 2 * (1 + 4 / 256), torch.bfloat16, needs_torchao=True),
}
CHOICES = ("auto", *OPTIMIZERS)
BETAS = (0.9, 0.95)


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_available(name: str, device: torch.device) -> None:
    """Refuse, in one line, an optimizer this machine cannot run."""
    spec = OPTIMIZERS[name]
    if name == "adamw_bf16" and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UsageError("--optimizer adamw_bf16 needs Triton on a GPU (pip install 'moe-trace[gpu]'); "
                         "use --optimizer adamw")
    if spec.needs_torchao and device.type != "cuda":
        raise UsageError(f"--optimizer {name} needs a CUDA GPU (its torchao update is compiled per parameter, "
                         "minutes on a CPU); use --optimizer adamw")
    if spec.needs_torchao and not torchao_available():
        raise UsageError(f"--optimizer {name} needs torchao (pip install 'moe-trace[lean]'); use --optimizer adamw")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and stacked expert weights); none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build(name: str, model: torch.nn.Module, lr: float, weight_decay: float,
          device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``, whose parameters must already have its ``weight_dtype``."""
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=device.type == "cuda")
    check_available(name, device)
    if name == "adamw_bf16":
        from moe_trace.adamw_bf16 import AdamWBF16

        return AdamWBF16(groups, lr=lr, betas=BETAS)
    from torchao import optim as ao

    return ao.AdamW8bit(groups, lr=lr, betas=BETAS, bf16_stochastic_round=True)


def cast_parameters(model: torch.nn.Module, name: str) -> None:
    """Give the parameters (not the buffers: a router bias accumulates tiny steps) the optimizer's dtype."""
    dtype = OPTIMIZERS[name].weight_dtype
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def clip_gradients(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.nn.Parameter], max_norm: float,
                   total_norm: torch.Tensor) -> None:
    """Clip the gradients to norm ``max_norm`` given their norm ``total_norm``, as ``clip_grad_norm_`` does.

    An optimizer that divides every gradient by a device scalar inside its own update (torch's fused AdamW and
    :class:`moe_trace.adamw_bf16.AdamWBF16` read ``grad_scale``, the attribute ``GradScaler`` sets) gets the
    clip coefficient there: that saves a pass reading and writing every gradient (1.2 ms of gpt-125m-moe's 45 ms
    step on an H200, whose parameters are 82 % expert weights). Any other optimizer gets the gradients scaled.
    """
    if _divides_by_grad_scale(optimizer):
        # 1 / clip_grad_norm_'s coefficient max_norm / (norm + 1e-6), clamped to at most 1.
        optimizer.grad_scale = ((total_norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)


def _divides_by_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    from moe_trace.adamw_bf16 import AdamWBF16

    return isinstance(optimizer, AdamWBF16) or (isinstance(optimizer, torch.optim.AdamW)
                                                and bool(optimizer.defaults.get("fused")))
