"""A 16-bit FlashAttention forward in Triton, built like the INT8 kernel: the same-compiler baseline."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moe_trace.attention.int8_attention import LOG2E, NEG_LARGE, key_ranges, mask_scores


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, offs_m, K, V, stride_kn, stride_vn, seq_k, n_start, n_end, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, HEAD_DIM)
    for n in tl.range(n_start, n_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = n + tl.arange(0, BLOCK_N)
        if MASKED:
            kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < seq_k, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < seq_k, other=0.0)
        else:
            kt = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None])
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :])
        s = tl.dot(q, kt)  # the scale is applied inside exp2's argument: one FMA per score
        if MASKED:
            s = mask_scores(s, cols, offs_m, seq_k, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bf16_attention_kernel(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_os,
    num_heads, kv_group, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_m < seq_q
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=in_seq[:, None])
    K += b * stride_kb + (h // kv_group) * stride_kh
    V += b * stride_vb + (h // kv_group) * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_LARGE, dtype=tl.float32)
    n_full, n_end = key_ranges(start_m, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, offs_m, K, V, stride_kn, stride_vn, seq_k, 0, n_full, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, WARP_SPECIALIZE,
    )  # fmt: skip
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, offs_m, K, V, stride_kn, stride_vn, seq_k, n_full, n_end, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, False,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=in_seq[:, None],
    )  # fmt: skip


def bf16_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    block_m: int = 128,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    warp_specialize: bool = False,
) -> torch.Tensor:
    """16-bit attention, same interface as :func:`~moe_trace.attention.int8_flash_attention` (CUDA).

    The default tiles are the fastest of benchmarks/attention.py's sweep on an H100 (``block_n`` 64 for
    head_dim 64, 128 above). ``warp_specialize`` as in :func:`~moe_trace.attention.int8_attention.attend_quantized`.
    """
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, seq_q, head_dim = q.shape
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    block_n = (64 if head_dim <= 64 else 128) if block_n is None else block_n
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _bf16_attention_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, heads // k.shape[1], seq_q, k.shape[2], sm_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, WARP_SPECIALIZE=warp_specialize,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
