"""Training path: INT8 forward, bf16 flash backward on the unquantized inputs (straight-through).

The forward is a ``torch.library`` custom op with a fake implementation and a ``register_autograd`` formula, so
``torch.compile`` keeps it in its graph as one opaque call (no graph break) whose output is a fresh contiguous
tensor; the backward formula is plain differentiable torch, traced into the backward graph.

Why not a ``torch.autograd.Function``: Dynamo cannot trace the ``torch.autograd.grad`` in the old one's backward,
so it broke the graph there, and the graph before the break returned q, k and v: views of the fused qkv
projection. AOTAutograd hands such outputs back by
replaying their view chain on the base at run time, and its cache pickles that chain. The chain starts with
the ``_unsafe_view`` that ``F.linear`` applies to a 3-D input, whose ViewMeta serialises its sizes from a
dangling reference (torch 2.11 to 2.13 at least; pytorch/pytorch#185630): the cache stored garbage sizes,
and every warm-cache run died in ``gen_alias_from_base`` replaying them. A custom op is never split from
its inputs and its output aliases nothing, so no compiled graph returns a view for the cache to replay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_trace.attention.kernels import int8_kernel
from moe_trace.attention.modes import TRAINING_MODE


@torch.library.custom_op("moe_trace::int8_attention", mutates_args=())
def int8_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, mode: str) -> Tensor:
    """``softmax(sm_scale * q kᵀ) v`` by the preferred INT8 kernel on q's device (see ``kernels``)."""
    _, kernel = int8_kernel(q.device)
    return kernel(q, k, v, causal, sm_scale, mode).contiguous()


@int8_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float, mode: str) -> Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, v, ctx.causal, ctx.sm_scale, _ = inputs
    ctx.save_for_backward(q, k, v)


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
    # Straight-through: the gradient of 16-bit attention at the same inputs. Rerunning SDPA recomputes the
    # log-sum-exp (and the output its backward needs) in bf16; on CUDA SDPA picks its cuDNN or flash kernels,
    # on CPU its math path. Under torch.compile AOTAutograd traces this into the backward graph as SDPA's own
    # forward and backward ops, which Inductor handles as it does for --attention sdpa.
    q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal, scale=ctx.sm_scale,
                                             enable_gqa=bool(q.shape[1] != k.shape[1]))  # not a SymBool
    return *torch.autograd.grad(out, (q, k, v), grad_out), None, None, None


int8_attention.register_autograd(_backward, setup_context=_setup_context)


def flash_attention_train(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, sm_scale: float | None = None
) -> Tensor:
    """Attention for training: forward in :data:`~moe_trace.attention.TRAINING_MODE`, bf16 backward.

    Same shapes as :func:`~moe_trace.attention.int8_flash_attention` (``sm_scale`` defaults to
    ``1/sqrt(head_dim)``); q, k and v may be views (of a fused projection, say). The output is a new
    contiguous tensor.
    """
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return int8_attention(q, k, v, causal, sm_scale, TRAINING_MODE)
