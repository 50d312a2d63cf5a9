"""The CUDA path of :class:`moe_trace.adamw_bf16.AdamWBF16`: one Triton launch updates many tensors.

A launch runs one program per *chunk* of ``CHUNK`` elements of one tensor. Which tensor, and where in it, the
program reads from a table on the device built once for a set of parameters (:class:`KernelTable`):

* ``chunks`` int32 ``[n_chunks, 3]``: tensor index, chunk index within the tensor, elements in the chunk;
* ``tensors`` int64 ``[n_tensors, 3]``: the addresses of the parameter, ``exp_avg`` and ``exp_avg_sq``;
* ``grads`` int64 ``[n_tensors]``: the gradients' addresses. ``zero_grad(set_to_none=True)`` frees the gradients
  and backward allocates new ones, so these can change from step to step (the caching allocator mostly hands
  out the same blocks again). Each step compares them, on the host, with the last uploaded ones and only when
  one differs copies the new list from pinned memory, asynchronously, in stream order: no host sync.

Each program reads gradient, weight and both moments once (bf16) and writes weight and moments once (bf16):
14 bytes a parameter, all arithmetic in registers. Rounding to bf16 is done on the float32 bit pattern with
integer operations (to nearest, ties to even, for the moments; stochastic for the weight), which gives the same
bits on the GPU and under Triton's CPU interpreter (whose own float32 -> bf16 conversion does not round to
nearest even).

Random bits: one Philox call (``tl.randint4x``: four 32-bit words) per 8 elements, 16 bits each; its counter is
the program's chunk and lane, its key the step's seed (plus the launch's index within the step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_trace.adamw_bf16 import UpdateScalars, interpreting
from moe_trace.data import to_device

# A chunk is 8 blocks of SUB elements: one Philox call per lane gives 4 words, each two 16-bit draws. SUB 512 with
# 4 warps was the fastest of a sweep on an H200 (SUB 256..2048, 1..8 warps; 2**29 parameters in 8 tensors).
SUB = 512
CHUNK = 8 * SUB
NUM_WARPS = 4
# IEEE-rounded division and square root, and no fused multiply-adds: the kernel then computes the reference's
# float32 values to the bit on the GPU too (tests/test_adamw_bf16_gpu.py). It costs 9 % of the kernel's time on an
# H200 (3.76 TB/s against 4.09 with the fast operations; a plain copy moves 4.25).
IEEE = True


@triton.jit
def _bf16_bits_nearest(x):
    """The int16 bit pattern of float32 ``x`` rounded to the nearest bf16 (ties to even); NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _bf16_bits_stochastic(x, noise):
    """The int16 bit pattern of float32 ``x`` rounded to bf16 stochastically with 16 random bits ``noise``: up in
    magnitude with probability (dropped low bits) / 2**16."""
    rounded = (x.to(tl.int32, bitcast=True) + noise) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _load_float32(ptr, offs, count, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=offs < count, other=0.0).to(tl.float32)
    return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _store_bits(ptr, offs, count, bits, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, bits.to(tl.bfloat16, bitcast=True), mask=offs < count)
    else:
        tl.store(ptr + offs, bits.to(tl.bfloat16, bitcast=True))


@triton.jit
def _update_chunk(
    p_ptr, g_ptr, m_ptr, v_ptr, count, r0, r1, r2, r3, inv_scale,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2,
    MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, SUB: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    lanes = tl.arange(0, SUB)
    for k in tl.static_range(8):
        offs = k * SUB + lanes
        g = _load_float32(g_ptr, offs, count, MASKED)
        if HAS_GRAD_SCALE:
            g = g * inv_scale
        # The same float32 operations, in the same order, as moe_trace.adamw_bf16.update_float32.
        p = _load_float32(p_ptr, offs, count, MASKED) * decay
        m = _load_float32(m_ptr, offs, count, MASKED) * beta1 + g * one_minus_beta1
        v = _load_float32(v_ptr, offs, count, MASKED) * beta2 + (g * g) * one_minus_beta2
        if IEEE:
            denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
            p = p - tl.math.div_rn(m, denom) * step_size
        else:
            denom = tl.sqrt(v) * inv_sqrt_bc2 + eps
            p = p - (m / denom) * step_size
        if STOCHASTIC:
            if k % 4 == 0:
                r = r0
            elif k % 4 == 1:
                r = r1
            elif k % 4 == 2:
                r = r2
            else:
                r = r3
            noise = ((r >> 16) if k >= 4 else (r & 0xFFFF)).to(tl.int32)
            p_bits = _bf16_bits_stochastic(p, noise)
        else:
            p_bits = _bf16_bits_nearest(p)
        _store_bits(p_ptr, offs, count, p_bits, MASKED)
        _store_bits(m_ptr, offs, count, _bf16_bits_nearest(m), MASKED)
        _store_bits(v_ptr, offs, count, _bf16_bits_nearest(v), MASKED)


@triton.jit(do_not_specialize=["seed"])
def _adamw_bf16_kernel(
    chunks, tensors, grads, grad_scale,
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2, seed,
    HAS_GRAD_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, SUB: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(chunks + 3 * pid).to(tl.int64)
    start = tl.load(chunks + 3 * pid + 1).to(tl.int64) * (8 * SUB)
    count = tl.load(chunks + 3 * pid + 2)
    # Addresses from the table; every one is 16-byte aligned (checked on the host), and so is each chunk's start.
    p_ptr = tl.multiple_of(tl.load(tensors + 3 * t).to(tl.pointer_type(tl.bfloat16)) + start, 16)
    m_ptr = tl.multiple_of(tl.load(tensors + 3 * t + 1).to(tl.pointer_type(tl.bfloat16)) + start, 16)
    v_ptr = tl.multiple_of(tl.load(tensors + 3 * t + 2).to(tl.pointer_type(tl.bfloat16)) + start, 16)
    g_ptr = tl.multiple_of(tl.load(grads + t).to(tl.pointer_type(tl.bfloat16)) + start, 16)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = tl.math.div_rn(1.0, tl.load(grad_scale)) if IEEE else 1.0 / tl.load(grad_scale)
    if STOCHASTIC:
        r0, r1, r2, r3 = tl.randint4x(seed, pid.to(tl.int64) * SUB + tl.arange(0, SUB))
    else:
        r0 = tl.zeros((SUB,), dtype=tl.uint32)  # unused: round to nearest
        r1, r2, r3 = r0, r0, r0
    if count == 8 * SUB:  # full chunks (all but each tensor's last): unmasked, so the loads vectorize
        _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, count, r0, r1, r2, r3, inv_scale,
                      decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2,
                      False, HAS_GRAD_SCALE, STOCHASTIC, SUB, IEEE)
    else:
        _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, count, r0, r1, r2, r3, inv_scale,
                      decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_sqrt_bc2,
                      True, HAS_GRAD_SCALE, STOCHASTIC, SUB, IEEE)


class KernelTable:
    """The device tables one launch reads for a fixed list of parameters and their moments (contiguous bf16,
    16-byte aligned). The caller keeps the tensors alive and rebuilds the table when an address changes."""

    def __init__(self, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor]) -> None:
        self.device = params[0].device
        numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
        per_tensor = (numels + CHUNK - 1) // CHUNK
        tensor_index = torch.repeat_interleave(torch.arange(len(params)), per_tensor)
        first = torch.cumsum(per_tensor, 0) - per_tensor  # each tensor's first row
        chunk_index = torch.arange(len(tensor_index)) - first[tensor_index]
        count = torch.clamp(numels[tensor_index] - chunk_index * CHUNK, max=CHUNK)
        addresses = torch.tensor([[p.data_ptr(), m.data_ptr(), v.data_ptr()]
                                  for p, m, v in zip(params, exp_avgs, exp_avg_sqs, strict=True)], dtype=torch.int64)
        # Through pinned memory, in stream order: no wait for the device.
        self.chunks, self.tensors = to_device(
            (torch.stack([tensor_index, chunk_index, count], dim=1).to(torch.int32), addresses), self.device)
        self.n_chunks = len(tensor_index)
        self.grads: Tensor | None = None
        self._grad_addresses: list[int] = []

    def set_grads(self, addresses: list[int]) -> None:
        """Point the table at this step's gradients (their addresses, in the table's order; contiguous bf16,
        16-byte aligned); uploads only if an address changed since the last step."""
        if addresses != self._grad_addresses:
            [self.grads] = to_device((torch.tensor(addresses, dtype=torch.int64),), self.device)
            self._grad_addresses = addresses


def launch(table: KernelTable, s: UpdateScalars, grad_scale: Tensor | None, seed: int, stochastic: bool) -> None:
    """One update of every tensor of ``table`` (its gradients set by :meth:`KernelTable.set_grads`)."""
    if table.n_chunks == 0:
        return
    _adamw_bf16_kernel[(table.n_chunks,)](
        table.chunks, table.tensors, table.grads, table.tensors if grad_scale is None else grad_scale,
        s.decay, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.step_size, s.inv_sqrt_bc2, seed,
        HAS_GRAD_SCALE=grad_scale is not None, STOCHASTIC=stochastic, SUB=SUB, IEEE=IEEE,
        num_warps=1 if interpreting() else NUM_WARPS, **({"enable_fp_fusion": False} if IEEE else {}),
    )  # fmt: skip
