"""INT8 FlashAttention forward in Triton (after INT-FlashAttention, arXiv 2409.16997).

S = Q·Kᵀ runs on INT8 tensor cores with per-token scales (Q's scale also carries ``sm_scale * log2 e``,
so scores arrive in the base-2 domain); the online softmax is FP32. In mode ``"int8"`` P·V is INT8 too:
each key block's P is taken against that block's own row maximum, so its largest entry per row is 1, and
quantized over the unsigned range [0, 255] (stored as ``P_uint8 - 128`` in a signed byte, corrected by a
per-block term precomputed with V); V has one scale per channel of each key block. The block's
``exp2(m_block - m_running) / 255`` is applied to the [BLOCK_M, HEAD_DIM] result, not to P. In mode
``"int8_qk"`` P·V is a 16-bit product on the original V.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moe_trace.attention.modes import MODES
from moe_trace.attention.quantize import quantize_per_token, quantize_v_blocks

LOG2E = math.log2(math.e)
NEG_LARGE = tl.constexpr(-1.0e30)  # a finite "-inf" for running maxima: exp2(m_old - m_new) stays defined
# 1.5 * 2**23: a float32 of this size has unit spacing, so adding an integer below 2**22 to it puts the integer in
# the low mantissa bits. Integer <-> float conversions run at a quarter of the FP32 rate on Hopper (the same
# pipe as exp2), so the kernel converts through these bit patterns with full-rate adds instead.
MAGIC = tl.constexpr(12582912.0)
MAGIC_BITS = tl.constexpr(0x4B400000)


@triton.jit
def _int32_to_float(x):
    """Exact for |x| < 2**22; an integer add and a float add instead of a conversion."""
    return (x + MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def key_ranges(start_m, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """``(n_full, n_end)`` for query block ``start_m``: keys below ``n_full`` are seen in full by every row of the
    block and need no mask; ``n_full .. n_end`` (the causal diagonal, the ragged end of the keys) do."""
    n_end = tl.minimum(seq_k, (start_m + 1) * BLOCK_M) if CAUSAL else seq_k
    n_full = (tl.minimum(n_end, start_m * BLOCK_M) if CAUSAL else n_end) // BLOCK_N * BLOCK_N
    return n_full, n_end


@triton.jit
def mask_scores(s, cols, offs_m, seq_k, CAUSAL: tl.constexpr):
    """Scores of keys past ``seq_k`` (and, if causal, after the query) set to -inf."""
    visible = cols[None, :] < seq_k
    if CAUSAL:
        visible &= cols[None, :] <= offs_m[:, None]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, q_scale, offs_m,
    K, K_scale, V, V_scale, V_offset,
    stride_vn, stride_vd, seq_k, n_start, n_end,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    INT8_PV: tl.constexpr, UPCAST_DOT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    offs_d = tl.arange(0, HEAD_DIM)
    for n in tl.range(n_start, n_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = n + tl.arange(0, BLOCK_N)
        # Kᵀ as [HEAD_DIM, BLOCK_N], contiguous along HEAD_DIM: K-major, as INT8 wgmma wants.
        if MASKED:
            kt = tl.load(K + cols[None, :] * HEAD_DIM + offs_d[:, None], mask=cols[None, :] < seq_k, other=0)
            k_scale = tl.load(K_scale + cols, mask=cols < seq_k, other=0.0)
        else:
            kt = tl.load(K + cols[None, :] * HEAD_DIM + offs_d[:, None])
            k_scale = tl.load(K_scale + cols)
        # Scores without Q's (positive) scale; it is applied inside exp2's argument, one FMA per score.
        s = _int32_to_float(tl.dot(q, kt, out_dtype=tl.int32)) * k_scale[None, :]
        if MASKED:
            s = mask_scores(s, cols, offs_m, seq_k, CAUSAL)
        m_block = tl.maximum(tl.max(s, axis=1) * q_scale, NEG_LARGE)
        m_new = tl.maximum(m_i, m_block)
        alpha = tl.math.exp2(m_i - m_new)
        if INT8_PV:
            p = tl.math.exp2(s * q_scale[:, None] - m_block[:, None])  # in [0, 1], each row's largest entry 1
            # p * 255 rounded to the nearest integer u lands in the low bits of p_bits; their low byte, read as
            # a signed byte, is u - 128 (the unsigned range shifted into int8). Masked keys: u = 0.
            p_bits = p * 255.0 + (MAGIC + 128.0)
            p_centered = p_bits.to(tl.int32, bitcast=True).to(tl.int8)
            # V as [BLOCK_N, HEAD_DIM] from the transposed copy: contiguous along keys, K-major again.
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd)
            block = n // BLOCK_N
            v_scale = tl.load(V_scale + block * HEAD_DIM + offs_d)
            # sum_j u_j v_j = (P·V with u - 128) + 128 * sum_j v_j, the second term precomputed per block.
            pv_bits = (tl.dot(p_centered, v, out_dtype=tl.int32) + MAGIC_BITS).to(tl.float32, bitcast=True)
            v_offset = tl.load(V_offset + block * HEAD_DIM + offs_d)
            pv = pv_bits - (MAGIC - v_offset[None, :])
            row_weight = tl.math.exp2(m_block - m_new) * (1.0 / 255.0)
            acc = acc * alpha[:, None] + pv * (row_weight[:, None] * v_scale[None, :])
            # sum(u), exact in FP32: the normaliser uses the same quantized weights as P·V.
            l_i = l_i * alpha + tl.sum(p_bits - (MAGIC + 128.0), axis=1) * row_weight
        else:
            p = tl.math.exp2(s * q_scale[:, None] - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_ptrs = V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0) if MASKED else tl.load(v_ptrs)
            p = p.to(v.dtype)
            if UPCAST_DOT:  # Triton's interpreter multiplies bfloat16 wrongly (3.9); the values are the same
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = tl.dot(p, v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _int8_attention_kernel(
    Q, Q_scale, K, K_scale, V, V_scale, V_offset, Out,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_os,
    num_heads, kv_group, seq_q, seq_k, num_v_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INT8_PV: tl.constexpr, UPCAST_DOT: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    start_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    bh_kv = b * (num_heads // kv_group) + h // kv_group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_m < seq_q
    q = tl.load(Q + (bh * seq_q + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], mask=in_seq[:, None], other=0)
    q_scale = tl.load(Q_scale + bh * seq_q + offs_m, mask=in_seq, other=1.0)

    K += bh_kv * seq_k * HEAD_DIM
    K_scale += bh_kv * seq_k
    V += b * stride_vb + (h // kv_group) * stride_vh
    if INT8_PV:
        V_scale += bh_kv * num_v_blocks * HEAD_DIM
        V_offset += bh_kv * num_v_blocks * HEAD_DIM

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_LARGE, dtype=tl.float32)
    n_full, n_end = key_ranges(start_m, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, q_scale, offs_m, K, K_scale, V, V_scale, V_offset, stride_vn, stride_vd, seq_k,
        0, n_full, HEAD_DIM, BLOCK_N, False, CAUSAL, INT8_PV, UPCAST_DOT, WARP_SPECIALIZE,
    )  # fmt: skip
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q, q_scale, offs_m, K, K_scale, V, V_scale, V_offset, stride_vn, stride_vd, seq_k,
        n_full, n_end, HEAD_DIM, BLOCK_N, True, CAUSAL, INT8_PV, UPCAST_DOT, False,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=in_seq[:, None],
    )  # fmt: skip


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_config(head_dim: int, mode: str) -> dict[str, int]:
    """Tiles and launch parameters, the fastest of benchmarks/attention.py's sweep on an H100 (S=4096).

    ``block_n`` also sets the blocks of V's scales and of P's row maxima, so the emulation takes it too.
    """
    if MODES[mode].int8_pv:
        tiles = (128, 128, 8, 3)
    elif head_dim <= 64:
        tiles = (128, 128, 4, 3)
    else:
        tiles = (128, 64, 4, 4)
    return dict(zip(("block_m", "block_n", "num_warps", "num_stages"), tiles, strict=True)) | {"warp_specialize": False}


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose from {sorted(MODES)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, seq, head_dim]")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    (batch, heads, _, head_dim), (kb, kv_heads, seq_k, kd) = q.shape, k.shape
    if v.shape != k.shape or kb != batch or kd != head_dim:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"head_dim must be 16, 32, 64 or 128, got {head_dim}")
    if seq_k == 0 or q.shape[2] == 0:
        raise ValueError("sequence length must be positive")


def int8_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    mode: str = "int8",
) -> torch.Tensor:
    """Attention ``softmax(sm_scale * q kᵀ) v`` through the INT8 Triton kernel; see :data:`MODES`.

    q ``[batch, heads, seq_q, head_dim]``, k and v ``[batch, kv_heads, seq_k, head_dim]`` (``heads`` a
    multiple of ``kv_heads``: grouped-query attention), bfloat16 or float16; returns q's shape and dtype.
    ``causal`` masks key j > query i (top-left aligned, as SDPA's ``is_causal``). On a CPU tensor the
    Triton kernel runs under ``TRITON_INTERPRET=1``; without it, the torch emulation of the same arithmetic.
    """
    check_inputs(q, k, v, mode)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    config = block_config(q.shape[-1], mode)
    if not q.is_cuda and not interpreting():
        from moe_trace.attention.reference import emulate_int8_attention

        return emulate_int8_attention(q, k, v, causal, sm_scale, mode, block_n=config["block_n"])
    quantized = quantize_inputs(q, k, v, sm_scale, mode, config["block_n"])
    return attend_quantized(quantized, q.dtype, causal, **config)


class QuantizedInputs(NamedTuple):
    """Q, K and V as the kernel reads them (see :mod:`moe_trace.attention.quantize`)."""

    q8: torch.Tensor
    q_scale: torch.Tensor
    k8: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor  # INT8 transposed V with its block scales and offsets, or the input V
    v_scale: torch.Tensor | None
    v_offset: torch.Tensor | None


def quantize_inputs(q, k, v, sm_scale: float, mode: str, block_n: int) -> QuantizedInputs:
    """The quantization kernels' half of the work (separate so benchmarks can time the attention alone)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q8, q_scale = quantize_per_token(q, sm_scale * LOG2E)
    k8, k_scale = quantize_per_token(k, mean=k.mean(dim=2, dtype=torch.float32))
    if MODES[mode].int8_pv:
        return QuantizedInputs(q8, q_scale, k8, k_scale, *quantize_v_blocks(v, block_n))
    return QuantizedInputs(q8, q_scale, k8, k_scale, v, None, None)


def attend_quantized(
    x: QuantizedInputs, out_dtype: torch.dtype, causal: bool, block_m: int, block_n: int, num_warps: int,
    num_stages: int, warp_specialize: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The attention kernel's half of the work, on :func:`quantize_inputs`' output.

    ``warp_specialize`` asks Triton to split the unmasked key loop between producer and consumer warps
    (``tl.range(..., warp_specialize=True)``), so that softmax can overlap the tensor cores.
    """
    batch, heads, seq_q, head_dim = x.q8.shape
    kv_heads, seq_k = x.k8.shape[1], x.k8.shape[2]
    int8_pv = x.v_scale is not None
    if int8_pv:
        v_strides = (x.v.stride(0), x.v.stride(1), 1, x.v.stride(2))  # (batch, head, key, channel)
    else:
        v_strides = (x.v.stride(0), x.v.stride(1), x.v.stride(2), 1)
    out = torch.empty(x.q8.shape, dtype=out_dtype, device=x.q8.device)
    _int8_attention_kernel[(triton.cdiv(seq_q, block_m), batch * heads)](
        x.q8, x.q_scale, x.k8, x.k_scale, x.v, x.v_scale, x.v_offset, out,
        *v_strides, out.stride(0), out.stride(1), out.stride(2),
        heads, heads // kv_heads, seq_q, seq_k, x.v_scale.shape[2] if int8_pv else 0,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, INT8_PV=int8_pv,
        UPCAST_DOT=interpreting(), WARP_SPECIALIZE=warp_specialize, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
