"""INT8 FlashAttention forward for Hopper (sm_90) in Gluon, after FlashAttention-3 (arXiv 2407.08608).

Same arithmetic as :mod:`moe_trace.attention.int8_attention` (the portable Triton kernel, which documents the
quantization) on the same inputs, made by the same quantization kernels; what differs is how the GPU is kept
busy. Each program owns ``2 * ROWS_PER_WARPGROUP`` query rows and runs three warp-specialized partitions:

* a one-warp producer that loads the two Q tiles once, then every key block's K and V tiles by TMA into a
  ``NUM_STAGES``-deep shared-memory ring ("ready" mbarriers carry the TMA byte counts; "empty" mbarriers are
  released by both consumers when their tensor cores are done with a stage);
* two consumer warpgroups, each with its own 64 query rows against the same K/V stages: INT8 ``wgmma``
  (s8·s8 -> s32) for S = Q·Kᵀ, the FP32 online softmax with the score dequant and P quantization of the Triton
  kernel, then ``wgmma`` for P·V (INT8 in mode ``"int8"``, 16-bit in ``"int8_qk"``). In ``"int8_qk"`` each
  consumer is software-pipelined as in FlashAttention-3: block i's Q·Kᵀ and block i-1's P·V run on the tensor
  cores while block i's softmax waits only for the first.

Measured on an H200 (benchmarks/NOTES_attention.md): what did not pay, and is not here, is a third consumer
warpgroup (register spills, 0.35-0.57x), FA3's ping-pong of the consumers' turns on the tensor cores
(0.95-0.99x) and pipelining the INT8 P·V of mode ``"int8"`` (0.47-0.52x).
"""

from __future__ import annotations

import functools
import math

import torch

from moe_trace.attention.int8_attention import check_inputs
from moe_trace.attention.modes import MODES
from moe_trace.attention.quantize import quantize_per_token, quantize_v_blocks

LOG2E = math.log2(math.e)
ROWS_PER_WARPGROUP = 64  # wgmma's M per warpgroup; a program holds two warpgroups' rows
BLOCK_N = 128  # keys per stage; also the block of V's scales and of P's row maxima in mode "int8"
NUM_STAGES = 3

try:  # Gluon ships with Triton >= 3.5; a CPU-only or older install has none, and this module must still import
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _HAVE_GLUON = hasattr(gl, "warp_specialize")
except (ImportError, AssertionError):
    # AssertionError: Gluon refuses to load into a process whose Triton was first imported under
    # TRITON_INTERPRET=1 (the CPU test suite does that); the interpreter runs no Gluon kernels anyway.
    _HAVE_GLUON = False


def gluon_available() -> bool:
    """True on an sm_90 GPU (H100/H200) with a Triton whose Gluon has TMA, wgmma and warp specialization."""
    return _HAVE_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


if _HAVE_GLUON:
    NEG_LARGE = gl.constexpr(-1.0e30)  # a finite "-inf" for running maxima: exp2(m_old - m_new) stays defined
    # Float <-> integer through the bit patterns of 1.5 * 2**23 (see int8_attention.py): full-rate adds instead of
    # quarter-rate conversions.
    MAGIC = gl.constexpr(12582912.0)
    MAGIC_BITS = gl.constexpr(0x4B400000)

    @gluon.jit
    def _int32_to_float(x):
        return (x + MAGIC_BITS).to(gl.float32, bitcast=True) - MAGIC

    @gluon.jit
    def _load_partition(
        q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready, empty,
        q_row, kv_row, vt_row, n_blocks,
        INT8_PV: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        for wg in gl.static_range(2):
            mbarrier.expect(q_bars.index(wg), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + wg * ROWS, 0], q_bars.index(wg), q_smem.index(wg))
        for i in range(n_blocks):
            stage = i % NUM_STAGES
            # A fresh barrier counts as having completed the phase before its first: the first lap does not wait.
            mbarrier.wait(empty.index(stage), ((i // NUM_STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row + i * BLOCK_N, 0], bar, k_smem.index(stage))
            if INT8_PV:  # V transposed, [head_dim, keys], keys padded to the block
                tma.async_copy_global_to_shared(v_desc, [vt_row, i * BLOCK_N], bar, v_smem.index(stage))
            else:
                tma.async_copy_global_to_shared(v_desc, [kv_row + i * BLOCK_N, 0], bar, v_smem.index(stage))

    @gluon.jit
    def _issue_scores(
        i, q, k_smem, ready,
        S_LAYOUT: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    ):  # fmt: skip
        """Wait for key block ``i`` and start its S = Q·Kᵀ on the tensor cores (INT8 in, INT32 out)."""
        stage = i % NUM_STAGES
        mbarrier.wait(ready.index(stage), (i // NUM_STAGES) & 1)
        k_tile = k_smem.index(stage)
        s = warpgroup_mma(
            q, k_tile.permute((1, 0)), gl.zeros([ROWS, BLOCK_N], gl.int32, S_LAYOUT), use_acc=False, is_async=True
        )
        return s, k_tile

    @gluon.jit
    def _softmax(
        i, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k,
        S_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_DTYPE: gl.constexpr,
        BLOCK_N: gl.constexpr, MASKED: gl.constexpr, CAUSAL: gl.constexpr, INT8_PV: gl.constexpr,
    ):  # fmt: skip
        """Key block ``i``'s online-softmax step, the arithmetic of the Triton kernel's ``_attend_blocks``.

        Returns P as the P·V product's register operand, the running maximum and sum, and the factors
        (rows) that the accumulator takes once this block's P·V is done: ``alpha`` for what it holds and, in
        mode ``"int8"``, ``weight`` for the block's INT32 P·V.
        """
        cols = i * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        k_scale = gl.load(K_scale + cols, mask=cols < seq_k, other=0.0) if MASKED else gl.load(K_scale + cols)
        # Scores without Q's (positive) scale; it is applied inside exp2's argument, one FMA per score.
        s = _int32_to_float(s_int) * k_scale[None, :]
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible &= cols[None, :] <= offs_m[:, None]
            s = gl.where(visible, s, float("-inf"))
        m_block = gl.maximum(gl.max(s, axis=1) * q_scale, NEG_LARGE)
        m_new = gl.maximum(m_i, m_block)
        alpha = gl.exp2(m_i - m_new)
        o_rows: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        if INT8_PV:
            p = gl.exp2(s * q_scale[:, None] - m_block[:, None])  # in [0, 1], each row's largest entry 1
            # round(p * 255) = u lands in the low mantissa bits; their low byte read as a signed byte is u - 128.
            p_bits = p * 255.0 + (MAGIC + 128.0)
            p_op = gl.convert_layout(p_bits.to(gl.int32, bitcast=True).to(gl.int8), P_LAYOUT)
            row_weight = gl.exp2(m_block - m_new) * (1.0 / 255.0)
            # sum(u), exact in FP32: the normaliser uses the same quantized weights as P·V.
            l_i = l_i * alpha + gl.sum(p_bits - (MAGIC + 128.0), axis=1) * row_weight
            weight = gl.convert_layout(row_weight, o_rows)
        else:
            p = gl.exp2(s * q_scale[:, None] - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            p_op = gl.convert_layout(p.to(P_DTYPE), P_LAYOUT)
            weight = gl.convert_layout(alpha, o_rows)  # unused
        return p_op, m_new, l_i, gl.convert_layout(alpha, o_rows), weight

    @gluon.jit
    def _softmax_block(
        i, n_full, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k,
        S_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, P_DTYPE: gl.constexpr,
        BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, INT8_PV: gl.constexpr,
    ):  # fmt: skip
        """:func:`_softmax` without the mask for blocks below ``n_full``, with it from there on."""
        if i < n_full:
            return _softmax(i, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k, S_LAYOUT, P_LAYOUT, O_LAYOUT,
                            P_DTYPE, BLOCK_N, False, CAUSAL, INT8_PV)  # fmt: skip
        return _softmax(i, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k, S_LAYOUT, P_LAYOUT, O_LAYOUT,
                        P_DTYPE, BLOCK_N, True, CAUSAL, INT8_PV)  # fmt: skip

    @gluon.jit
    def _issue_pv(j, p_op, acc, v_smem, O_LAYOUT: gl.constexpr, NUM_STAGES: gl.constexpr, INT8_PV: gl.constexpr):
        """Start key block ``j``'s P·V: into a fresh INT32 tile (mode ``"int8"``), else onto the accumulator."""
        v_tile = v_smem.index(j % NUM_STAGES)
        if INT8_PV:  # V is stored [head_dim, keys]: K-major, as INT8 wgmma wants
            pv = warpgroup_mma(
                p_op, v_tile.permute((1, 0)), gl.zeros_like(acc, dtype=gl.int32), use_acc=False, is_async=True
            )
        else:
            pv = warpgroup_mma(p_op, v_tile, acc, is_async=True)
        return pv, v_tile

    @gluon.jit
    def _wait_pv(pv_tok, p_op, v_tile, INT8_PV: gl.constexpr):
        # 3.6's wgmma wait takes no 8-bit register operand as a dependency; ptxas still keeps P's registers
        # alive until the wgmma that reads them has completed.
        if INT8_PV:
            return warpgroup_mma_wait(0, deps=[pv_tok, v_tile])[0]
        return warpgroup_mma_wait(0, deps=[pv_tok, p_op, v_tile])[0]

    @gluon.jit
    def _merge_pv(
        j, pv, acc, alpha, weight, V_scale, V_offset,
        O_LAYOUT: gl.constexpr, HEAD_DIM: gl.constexpr, INT8_PV: gl.constexpr,
    ):  # fmt: skip
        """The accumulator once block ``j``'s P·V is done (``alpha``, ``weight``: that block's factors)."""
        if INT8_PV:
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
            v_scale = gl.load(V_scale + j * HEAD_DIM + offs_d)
            v_offset = gl.load(V_offset + j * HEAD_DIM + offs_d)
            # sum_j u_j v_j = (P·V with u - 128) + 128 * sum_j v_j, the second term precomputed per block.
            pv_f = (pv + MAGIC_BITS).to(gl.float32, bitcast=True) - (MAGIC - v_offset[None, :])
            return acc * alpha[:, None] + pv_f * (weight[:, None] * v_scale[None, :])
        else:
            return pv

    @gluon.jit
    def _attend_int8_pv(
        acc, l_i, m_i, q_tile, q_scale, offs_m, k_smem, v_smem, ready, empty, K_scale, V_scale, V_offset, seq_k,
        n_full, n_end, S_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr,
        ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
    ):  # fmt: skip
        """Mode ``"int8"``: each block's two products one after the other (kept in flight across the softmax,
        the INT8 P·V made the kernel 1.5-2.1x slower on an H200)."""
        for i in range(0, n_end):
            s_tok, k_tile = _issue_scores(i, q_tile, k_smem, ready, S_LAYOUT, ROWS, BLOCK_N, NUM_STAGES)
            s_int = warpgroup_mma_wait(0, deps=[s_tok, q_tile, k_tile])[0]
            p_op, m_i, l_i, alpha, weight = _softmax_block(
                i, n_full, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k, S_LAYOUT, P_LAYOUT, O_LAYOUT,
                gl.int8, BLOCK_N, CAUSAL, True,
            )  # fmt: skip
            pv_tok, v_tile = _issue_pv(i, p_op, acc, v_smem, O_LAYOUT, NUM_STAGES, True)
            pv = _wait_pv(pv_tok, p_op, v_tile, True)
            mbarrier.arrive(empty.index(i % NUM_STAGES), count=1)
            acc = _merge_pv(i, pv, acc, alpha, weight, V_scale, V_offset, O_LAYOUT, HEAD_DIM, True)
        return acc, l_i

    @gluon.jit
    def _attend_16bit_pv(
        acc, l_i, m_i, q_tile, q_scale, offs_m, k_smem, v_smem, ready, empty, K_scale, seq_k, n_full, n_end,
        S_LAYOUT: gl.constexpr, P_LAYOUT: gl.constexpr, O_LAYOUT: gl.constexpr, ROWS: gl.constexpr,
        BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
    ):  # fmt: skip
        """Mode ``"int8_qk"``, software-pipelined as in FlashAttention-3: block i's Q·Kᵀ and block i-1's P·V are
        in flight on the tensor cores while block i's softmax waits only for the first; the accumulator takes
        block i's rescale once the second is done."""
        P_DTYPE: gl.constexpr = v_smem.dtype
        # Block 0 goes through the masked softmax whatever it needs: with every key visible the mask is a no-op.
        s_tok, k_tile = _issue_scores(0, q_tile, k_smem, ready, S_LAYOUT, ROWS, BLOCK_N, NUM_STAGES)
        s_int = warpgroup_mma_wait(0, deps=[s_tok, q_tile, k_tile])[0]
        p_op, m_i, l_i, alpha, _ = _softmax(
            0, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k, S_LAYOUT, P_LAYOUT, O_LAYOUT, P_DTYPE, BLOCK_N,
            True, CAUSAL, False,
        )  # fmt: skip
        for i in range(1, n_end):
            acc = acc * alpha[:, None]
            s_tok, k_tile = _issue_scores(i, q_tile, k_smem, ready, S_LAYOUT, ROWS, BLOCK_N, NUM_STAGES)
            pv_tok, v_tile = _issue_pv(i - 1, p_op, acc, v_smem, O_LAYOUT, NUM_STAGES, False)
            s_int = warpgroup_mma_wait(1, deps=[s_tok, q_tile, k_tile])[0]  # this block's scores; P·V runs on
            p_next, m_i, l_i, alpha, _ = _softmax_block(
                i, n_full, s_int, m_i, l_i, q_scale, offs_m, K_scale, seq_k, S_LAYOUT, P_LAYOUT, O_LAYOUT, P_DTYPE,
                BLOCK_N, CAUSAL, False,
            )  # fmt: skip
            acc = _wait_pv(pv_tok, p_op, v_tile, False)
            mbarrier.arrive(empty.index((i - 1) % NUM_STAGES), count=1)
            p_op = p_next
        acc = acc * alpha[:, None]
        pv_tok, v_tile = _issue_pv(n_end - 1, p_op, acc, v_smem, O_LAYOUT, NUM_STAGES, False)
        acc = _wait_pv(pv_tok, p_op, v_tile, False)
        mbarrier.arrive(empty.index((n_end - 1) % NUM_STAGES), count=1)
        return acc, l_i

    @gluon.jit
    def _consume_partition(
        q_smem, k_smem, v_smem, q_bars, ready, empty, wg,
        Q_scale, K_scale, V_scale, V_offset, Out,
        q_row, m_start, kv_row, v_block_row, seq_q, seq_k, n_full, n_end,
        HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, INT8_PV: gl.constexpr,
    ):  # fmt: skip
        """Warpgroup ``wg``'s ``ROWS`` query rows against all key blocks, then its rows of the output."""
        S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
        )
        if INT8_PV:
            O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32]
            )
            P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=4)
        else:
            O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
            )
            P_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
        s_rows: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
        offs_m = m_start + wg * ROWS + gl.arange(0, ROWS, layout=s_rows)
        q_scale = gl.load(
            Q_scale + q_row + wg * ROWS + gl.arange(0, ROWS, layout=s_rows), mask=offs_m < seq_q, other=1.0
        )
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, O_LAYOUT)
        l_i = gl.zeros([ROWS], gl.float32, s_rows)
        m_i = gl.full([ROWS], NEG_LARGE, gl.float32, s_rows)
        q_tile = q_smem.index(wg)
        mbarrier.wait(q_bars.index(wg), 0)
        if INT8_PV:
            acc, l_i = _attend_int8_pv(
                acc, l_i, m_i, q_tile, q_scale, offs_m, k_smem, v_smem, ready, empty, K_scale + kv_row,
                V_scale + v_block_row * HEAD_DIM, V_offset + v_block_row * HEAD_DIM, seq_k, n_full, n_end,
                S_LAYOUT, P_LAYOUT, O_LAYOUT, ROWS, HEAD_DIM, BLOCK_N, NUM_STAGES, CAUSAL,
            )  # fmt: skip
        else:
            acc, l_i = _attend_16bit_pv(
                acc, l_i, m_i, q_tile, q_scale, offs_m, k_smem, v_smem, ready, empty, K_scale + kv_row, seq_k,
                n_full, n_end, S_LAYOUT, P_LAYOUT, O_LAYOUT, ROWS, BLOCK_N, NUM_STAGES, CAUSAL,
            )  # fmt: skip

        o_rows: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        l_o = gl.convert_layout(l_i, o_rows)
        out = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
        rows = m_start + wg * ROWS + gl.arange(0, ROWS, layout=o_rows)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, O_LAYOUT))
        ptrs = Out + (q_row - m_start + rows[:, None]) * HEAD_DIM + offs_d[None, :]
        gl.store(ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < seq_q)

    @gluon.jit
    def _gluon_int8_attention_kernel(
        q_desc, k_desc, v_desc, Q_scale, K_scale, V_scale, V_offset, Out,
        num_heads, kv_group, seq_q, seq_k, num_v_blocks,
        HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
        CAUSAL: gl.constexpr, INT8_PV: gl.constexpr,
    ):  # fmt: skip
        BLOCK_M: gl.constexpr = 2 * ROWS
        num_m_blocks = gl.cdiv(seq_q, BLOCK_M)
        bh = gl.program_id(1)
        # Causal: the longest query blocks (the last ones) start first, so the short ones fill the tail.
        start_m = num_m_blocks - 1 - gl.program_id(0) if CAUSAL else gl.program_id(0)
        bh_kv = (bh // num_heads) * (num_heads // kv_group) + (bh % num_heads) // kv_group
        m_start = start_m * BLOCK_M
        q_row = bh * seq_q + m_start
        kv_row = bh_kv * seq_k
        # Key blocks below n_full are seen in full by every row of the program; the rest need the mask.
        if CAUSAL:
            n_end_keys = gl.minimum(seq_k, m_start + BLOCK_M)
            n_full = gl.minimum(n_end_keys, m_start) // BLOCK_N
        else:
            n_end_keys = seq_k
            n_full = seq_k // BLOCK_N
        n_end = gl.cdiv(n_end_keys, BLOCK_N)

        q_smem = gl.allocate_shared_memory(gl.int8, [2, ROWS, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(gl.int8, [NUM_STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(
            v_desc.dtype, [NUM_STAGES, v_desc.block_type.shape[0], v_desc.block_type.shape[1]], v_desc.layout
        )
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for j in gl.static_range(2):
            mbarrier.init(q_bars.index(j), count=1)
        for j in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(j), count=1)
            mbarrier.init(empty.index(j), count=2)  # one arrival per consumer warpgroup

        # The two consumers differ only in which warpgroup's rows they own (the 7th argument). The producer
        # keeps 24 registers a thread and each consumer thread gets 232, within the SM's 64K.
        gl.warp_specialize(
            [
                (_consume_partition, (
                    q_smem, k_smem, v_smem, q_bars, ready, empty, 0, Q_scale, K_scale, V_scale, V_offset, Out,
                    q_row, m_start, kv_row, bh_kv * num_v_blocks, seq_q, seq_k, n_full, n_end,
                    HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, CAUSAL, INT8_PV)),
                (_consume_partition, (
                    q_smem, k_smem, v_smem, q_bars, ready, empty, 1, Q_scale, K_scale, V_scale, V_offset, Out,
                    q_row, m_start, kv_row, bh_kv * num_v_blocks, seq_q, seq_k, n_full, n_end,
                    HEAD_DIM, ROWS, BLOCK_N, NUM_STAGES, CAUSAL, INT8_PV)),
                (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready, empty,
                                   q_row, kv_row, bh_kv * HEAD_DIM, n_end, INT8_PV, ROWS, BLOCK_N, NUM_STAGES)),
            ],
            [4, 1],
            [232, 24],
        )  # fmt: skip


@functools.cache
def _shared_layout(block_shape: tuple[int, int], dtype_name: str):
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), getattr(gl, dtype_name))


def _descriptor(t2d: torch.Tensor, block_shape: tuple[int, int], dtype_name: str):
    return TensorDescriptor(
        t2d, list(t2d.shape), list(t2d.stride()), list(block_shape), _shared_layout(block_shape, dtype_name)
    )


def gluon_int8_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    mode: str = "int8",
) -> torch.Tensor:
    """:func:`~moe_trace.attention.int8_flash_attention` through the Gluon kernel (needs :func:`gluon_available`).

    The result equals :func:`~moe_trace.attention.reference.emulate_int8_attention` with ``block_n=BLOCK_N``.
    """
    check_inputs(q, k, v, mode)
    if not gluon_available():
        raise RuntimeError("the Gluon INT8 attention kernel needs an sm_90 GPU and Triton with Gluon")
    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    q8, q_scale = quantize_per_token(q, sm_scale * LOG2E)
    k8, k_scale = quantize_per_token(k, mean=k.mean(dim=2, dtype=torch.float32))
    int8_pv = MODES[mode].int8_pv
    if int8_pv:
        vt, v_scale, v_offset = quantize_v_blocks(v, BLOCK_N)
        v_desc = _descriptor(vt.view(-1, vt.shape[-1]), (head_dim, BLOCK_N), "int8")
        num_v_blocks = v_scale.shape[2]
    else:
        # TMA walks V as one [batch * kv_heads * seq_k, head_dim] matrix.
        v = v if v.is_contiguous() else v.contiguous()
        v_desc = _descriptor(v.view(-1, head_dim), (BLOCK_N, head_dim), str(v.dtype).removeprefix("torch."))
        v_scale = v_offset = k_scale  # unused
        num_v_blocks = 0
    q_desc = _descriptor(q8.view(-1, head_dim), (ROWS_PER_WARPGROUP, head_dim), "int8")
    k_desc = _descriptor(k8.view(-1, head_dim), (BLOCK_N, head_dim), "int8")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(seq_q, 2 * ROWS_PER_WARPGROUP), batch * heads)
    _gluon_int8_attention_kernel[grid](
        q_desc, k_desc, v_desc, q_scale, k_scale, v_scale, v_offset, out,
        heads, heads // kv_heads, seq_q, seq_k, num_v_blocks,
        HEAD_DIM=head_dim, ROWS=ROWS_PER_WARPGROUP, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, CAUSAL=causal,
        INT8_PV=int8_pv, num_warps=4,
    )  # fmt: skip
    return out
