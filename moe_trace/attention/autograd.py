"""Training path: INT8 forward, bf16 flash backward on the unquantized inputs (straight-through)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_trace.attention.int8_attention import int8_flash_attention
from moe_trace.attention.modes import TRAINING_MODE


class _Int8FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.causal = causal
        return int8_flash_attention(q, k, v, causal=causal, mode=TRAINING_MODE)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # Straight-through: the gradient of 16-bit attention at the same inputs. Rerunning SDPA recomputes
        # the log-sum-exp (and the output the backward needs) in bf16; on CUDA SDPA picks its flash or
        # cuDNN kernels, on CPU its math path.
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal, enable_gqa=q.shape[1] != k.shape[1])
        grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
        return grad_q, grad_k, grad_v, None


def flash_attention_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Attention for training: forward in :data:`~moe_trace.attention.TRAINING_MODE`, bf16 backward.

    Same shapes as :func:`~moe_trace.attention.int8_flash_attention` (``sm_scale = 1/sqrt(head_dim)``).
    """
    return _Int8FlashAttention.apply(q, k, v, causal)
