"""Triton kernels that quantize attention inputs to INT8.

* :func:`quantize_per_token`: one scale per token (row of ``head_dim`` values), for Q and K. An optional
  per-channel vector is subtracted first (the mean of K), and the scale is multiplied by a constant
  (Q carries ``sm_scale * log2(e)`` so the attention kernel gets scores in the base-2 domain for free).
* :func:`quantize_v_blocks`: one scale per channel of every block of ``block_n`` keys, written transposed
  (``[batch, heads, head_dim, keys]``) because INT8 ``tl.dot`` lowers to Hopper's wgmma only when its
  second operand is K-major, and for P·V the reduction runs over keys. Each block also gets
  ``128 * sum(V_int8)`` per channel, the correction for P held as ``P_uint8 - 128`` in a signed byte.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOKENS_PER_PROGRAM = 64


@triton.jit
def _quantize_per_token_kernel(
    X, Mean, Xq, Scale,
    stride_xb, stride_xh, stride_xs,
    num_heads, seq_len, scale_factor,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SUBTRACT_MEAN: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, HEAD_DIM)
    in_seq = rows[:, None] < seq_len
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + cols[None, :], mask=in_seq, other=0.0)
    x = x.to(tl.float32)
    if SUBTRACT_MEAN:
        x -= tl.load(Mean + bh * HEAD_DIM + cols)[None, :]
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)  # the floor keeps all-zero rows at zero, not NaN
    xq = tl.floor(x * (127.0 / amax)[:, None] + 0.5).to(tl.int8)
    tl.store(Xq + bh * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :], xq, mask=in_seq)
    tl.store(Scale + bh * seq_len + rows, amax * scale_factor, mask=rows < seq_len)


def quantize_per_token(
    x: torch.Tensor, scale_factor: float = 1.0, mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[batch, heads, seq, head_dim]`` (unit stride in head_dim) to INT8 with one scale per token.

    Returns ``(x_int8 [batch, heads, seq, head_dim] contiguous, scale [batch, heads, seq] float32)`` with
    ``(x - mean) ~= x_int8 * scale / scale_factor``; ``mean`` is ``[batch, heads, head_dim]`` float32.
    """
    batch, heads, seq, head_dim = x.shape
    xq = torch.empty((batch, heads, seq, head_dim), dtype=torch.int8, device=x.device)
    scale = torch.empty((batch, heads, seq), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(seq, TOKENS_PER_PROGRAM), batch * heads)
    _quantize_per_token_kernel[grid](
        x, mean, xq, scale, x.stride(0), x.stride(1), x.stride(2), heads, seq, scale_factor / 127.0,
        HEAD_DIM=head_dim, BLOCK_S=TOKENS_PER_PROGRAM, SUBTRACT_MEAN=mean is not None,
    )  # fmt: skip
    return xq, scale


@triton.jit
def _quantize_v_blocks_kernel(
    V, Vt, Scale, Offset,
    stride_vb, stride_vh, stride_vs,
    num_heads, seq_len, padded_len,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD_DIM)
    v = tl.load(
        V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vs + cols[None, :],
        mask=keys[:, None] < seq_len,
        other=0.0,
    ).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(v), axis=0), 1e-12)
    vq = tl.floor(v * (127.0 / amax)[None, :] + 0.5)
    # Padded keys quantize to 0, so they add nothing to P·V whatever P holds there.
    tl.store(Vt + bh * HEAD_DIM * padded_len + cols[None, :] * padded_len + keys[:, None], vq.to(tl.int8))
    num_blocks = padded_len // BLOCK_N
    tl.store(Scale + (bh * num_blocks + block) * HEAD_DIM + cols, amax / 127.0)
    tl.store(Offset + (bh * num_blocks + block) * HEAD_DIM + cols, 128.0 * tl.sum(vq, axis=0))


def quantize_v_blocks(v: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``v[batch, heads, seq, head_dim]`` to INT8 with one scale per channel and block of keys.

    Returns ``(vt_int8 [batch, heads, head_dim, padded_seq], scale, offset)``, the last two
    ``[batch, heads, padded_seq // block_n, head_dim]`` float32: ``v ~= vt_int8.T * scale`` blockwise and
    ``offset = 128 * vt_int8.sum(keys of the block)``. Keys past ``seq`` are zero.
    """
    batch, heads, seq, head_dim = v.shape
    num_blocks = triton.cdiv(seq, block_n)
    vt = torch.empty((batch, heads, head_dim, num_blocks * block_n), dtype=torch.int8, device=v.device)
    scale = torch.empty((batch, heads, num_blocks, head_dim), dtype=torch.float32, device=v.device)
    offset = torch.empty_like(scale)
    _quantize_v_blocks_kernel[(num_blocks, batch * heads)](
        v, vt, scale, offset, v.stride(0), v.stride(1), v.stride(2), heads, seq, num_blocks * block_n,
        HEAD_DIM=head_dim, BLOCK_N=block_n,
    )  # fmt: skip
    return vt, scale, offset
