"""Which INT8 attention kernel runs a call: the fastest measured of those that run on the device.

Every kernel here has the signature ``kernel(q, k, v, causal, sm_scale, mode) -> out`` of
:func:`~moe_trace.attention.int8_flash_attention`. The portable Triton kernel runs everywhere (on CPU under
Triton's interpreter, or as the torch emulation); the Gluon kernel (``gluon_int8_attention``) is written for
Hopper's warp-specialised wgmma and is offered only on compute capability 9.0 where it imports.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moe_trace.attention.int8_attention import int8_flash_attention

Int8Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float, str], torch.Tensor]

# Training's kernel is the first of these that runs on the device. Triton first: at the models' training shapes
# (B8 H12/H16 S2048 D64 causal, H200) the Gluon kernel's int8_qk forward is slower, 174 and 182 TFLOP/s against
# Triton's 200 and 236 (benchmarks/results/attention_gluon.json). Put "gluon" first once it measures faster.
PREFERENCE = ("triton", "gluon")


def _triton_kernel(q, k, v, causal: bool, sm_scale: float, mode: str) -> torch.Tensor:
    return int8_flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, mode=mode)


@functools.cache
def _gluon_kernel() -> Int8Kernel | None:
    """The Gluon kernel, or None where its module or Triton's Gluon does not import (CPU builds, old Triton)."""
    try:
        from moe_trace.attention.gluon_int8_attention import gluon_available, gluon_int8_flash_attention
    except ImportError:
        return None
    return gluon_int8_flash_attention if gluon_available() else None


def int8_kernels(device: torch.device | str) -> dict[str, Int8Kernel]:
    """The INT8 kernels that can run on ``device``, by name ("triton", "gluon"), in :data:`PREFERENCE` order."""
    device = torch.device(device)
    kernels: dict[str, Int8Kernel] = {"triton": _triton_kernel}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and _gluon_kernel() is not None:
        kernels["gluon"] = _gluon_kernel()
    return {name: kernels[name] for name in PREFERENCE if name in kernels}


def int8_kernel(device: torch.device | str) -> tuple[str, Int8Kernel]:
    """``(name, kernel)`` of the kernel training uses on ``device``: the first of :func:`int8_kernels`."""
    return next(iter(int8_kernels(device).items()))
