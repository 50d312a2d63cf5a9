"""Torch references: an emulation of the INT8 kernel's arithmetic, and exact float64 attention.

The emulation walks the keys in the kernel's blocks and rounds where the kernel rounds, so the kernel must
equal it to float rounding. INT8 products are done in float32, where they are exact: every partial sum is
an integer below 2**24 (127 * 255 * 128 < 2**23).
"""

from __future__ import annotations

import math

import torch

from moe_trace.attention.modes import MODES

LOG2E = math.log2(math.e)
NEG_LARGE = -1.0e30


def _round_per_token(x: torch.Tensor, scale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.floor(x * (127.0 / amax) + 0.5), amax * (scale_factor / 127.0)


def emulate_int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    sm_scale: float,
    mode: str,
    block_n: int,
) -> torch.Tensor:
    """What :func:`~moe_trace.attention.int8_flash_attention` computes, in plain torch (any device)."""
    out_dtype = q.dtype
    group = q.shape[1] // k.shape[1]
    k32 = k.float() - k.mean(dim=2, dtype=torch.float32).unsqueeze(2)
    q_int, q_scale = _round_per_token(q.float(), sm_scale * LOG2E)
    k_int, k_scale = _round_per_token(k32, 1.0)
    k_int, k_scale, v = (t.repeat_interleave(group, dim=1) for t in (k_int, k_scale, v))
    seq_q, seq_k = q.shape[2], k.shape[2]
    rows = torch.arange(seq_q, device=q.device)[:, None]

    m_i = torch.full(q.shape[:3], NEG_LARGE, device=q.device)
    l_i = torch.zeros(q.shape[:3], device=q.device)
    acc = torch.zeros(q.shape, device=q.device)
    for n in range(0, seq_k, block_n):
        cols = torch.arange(n, min(n + block_n, seq_k), device=q.device)
        s = (q_int @ k_int[:, :, cols].transpose(-1, -2)) * k_scale[:, :, cols].transpose(-1, -2)
        if causal:
            s = s.masked_fill(cols[None, :] > rows, float("-inf"))
        m_block = (s.amax(dim=-1) * q_scale[..., 0]).clamp_min(NEG_LARGE)
        m_new = torch.maximum(m_i, m_block)
        alpha = torch.exp2(m_i - m_new)
        v_block = v[:, :, cols].float()
        if MODES[mode].int8_pv:
            p_uint8 = torch.round(torch.exp2(s * q_scale - m_block[..., None]) * 255.0)
            v_amax = v_block.abs().amax(dim=2, keepdim=True).clamp_min(1e-12)
            v_int = torch.floor(v_block * (127.0 / v_amax) + 0.5)
            row_weight = torch.exp2(m_block - m_new) * (1.0 / 255.0)
            acc = acc * alpha[..., None] + (p_uint8 @ v_int) * (row_weight[..., None] * (v_amax / 127.0))
            l_i = l_i * alpha + p_uint8.sum(dim=-1) * row_weight
        else:
            p = torch.exp2(s * q_scale - m_new[..., None])
            acc = acc * alpha[..., None] + p.to(out_dtype).float() @ v_block
            l_i = l_i * alpha + p.sum(dim=-1)
        m_i = m_new
    return (acc / torch.where(l_i > 0, l_i, 1.0)[..., None]).to(out_dtype)


def attention_float64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, sm_scale: float | None = None
) -> torch.Tensor:
    """Exact attention in float64 (grouped-query heads expanded), the accuracy reference."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, is_causal=causal, scale=sm_scale)


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """DESIGN.md's attention accuracy: relative L1, cosine similarity and RMSE against ``ref``."""
    out, ref = out.double().flatten(), ref.double().flatten()
    return {
        "rel_l1": ((out - ref).abs().sum() / ref.abs().sum()).item(),
        "cosine": torch.nn.functional.cosine_similarity(out, ref, dim=0).item(),
        "rmse": (out - ref).pow(2).mean().sqrt().item(),
    }
