"""Fused cross-entropy in Triton: the loss and its gradient in one pass over the logits.

The language-model loss reads ``[tokens, padded_vocab]`` logits (16k x 50304 at the 125M preset, 1.6 GB in
bf16). ``F.cross_entropy`` on the float32 upcast reads them in its forward and again, with a float32
log-softmax, in its backward. The kernel here computes each row's log-sum-exp and, while the row is still
hot in L2, the gradient ``(softmax - onehot(target)) / rows``, so the backward is only a scale by the
incoming gradient: one read of the logits and one write of the gradient in the forward.

The gradient goes to a fresh buffer of the logits' dtype, not into the logits: ``GPT.forward`` returns the
logits to its caller, and under ``torch.compile`` an op that mutates a graph output gets a defensive copy,
which would cost the pass that in-place writing saves.

``GPT.forward`` calls :func:`linear_cross_entropy`, which also takes in the head: its GEMMs run on that
gradient inside the forward, so the backward scales two small gradients instead of the logits' gradient, and
the buffer is freed before the forward returns (:func:`cross_entropy` alone keeps it until the backward).

No ``ignore_index``: every target in this project is a real token (the data loader never pads), so the
kernel assumes ``0 <= target < vocab`` and does not check it (a check would synchronise with the host).

The kernel is wrapped in a ``torch.library.custom_op`` with a fake implementation and an autograd formula,
so ``torch.compile`` keeps it in the graph (no graph break) as one opaque call. ``triton_op``/``wrap_triton``
would let Inductor see the launch, but it traces into the kernel under fake tensors, which Triton's CPU
interpreter cannot run; the opaque op behaves the same on CPU (``TRITON_INTERPRET=1``) and CUDA, and there is
nothing for Inductor to fuse into a memory-bound row reduction anyway.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _load_real_columns(logits_row, columns, vocab, padded_vocab):
    """float32 logits of ``columns``, -inf past the real vocabulary.

    The load is masked at ``padded_vocab`` (a multiple of 128 in the model) and the vocabulary cut made in
    registers: a mask at the odd ``vocab`` (50257) would stop Triton from vectorising the loads.
    """
    x = tl.load(logits_row + columns, mask=columns < padded_vocab, other=float("-inf")).to(tl.float32)
    return tl.where(columns < vocab, x, float("-inf"))


@triton.jit
def _cross_entropy_loss_and_grad_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    losses_ptr,
    grad_ptr,
    grad_row_stride,
    vocab,
    padded_vocab,
    grad_scale,
    BLOCK_V: tl.constexpr,
):
    # int64 row offsets: tokens x padded_vocab passes 2**31 at a few tens of thousands of tokens.
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    columns = tl.arange(0, BLOCK_V)

    # Pass 1: log-sum-exp over the real vocabulary with an online max, in float32. Padding columns (and the
    # tail of the last block) count as -inf, so they add exp(-inf) = 0 to the sum.
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, padded_vocab, BLOCK_V):
        block_columns = start + columns
        x = _load_real_columns(logits_row, block_columns, vocab, padded_vocab)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # exp(-inf - finite) = 0 on the first block: the empty running sum is rescaled to 0, not NaN.
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)

    target = tl.load(targets_ptr + row)
    target_logit = tl.load(logits_row + target).to(tl.float32)
    tl.store(losses_ptr + row, log_sum_exp - target_logit)

    # Pass 2: d(mean loss)/d logits = (softmax - onehot) * grad_scale over every padded column (0 on padding).
    # The row was just read, so this second read mostly hits L2.
    for start in range(0, padded_vocab, BLOCK_V):
        block_columns = start + columns
        x = _load_real_columns(logits_row, block_columns, vocab, padded_vocab)
        probability = tl.exp(x - log_sum_exp)
        grad = (probability - tl.where(block_columns == target, 1.0, 0.0)) * grad_scale
        tl.store(grad_row + block_columns, grad.to(grad_ptr.dtype.element_ty), mask=block_columns < padded_vocab)


def _launch_config(padded_vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: 16 columns per thread, wide blocks so a 50k row takes few loop trips."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter runs a block as numpy arrays; small blocks keep the tests' tails and loops exercised.
        return min(triton.next_power_of_2(padded_vocab), 256), 1
    # The fastest of benchmarks/cross_entropy.py's sweep on an H100 (16384 x 50304 bf16: 1.68 ms).
    block = min(triton.next_power_of_2(padded_vocab), 4096)
    return block, max(1, min(8, block // (16 * 32)))


@torch.library.custom_op("moe_trace::cross_entropy_loss_and_grad", mutates_args=())
def cross_entropy_loss_and_grad(logits: Tensor, targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the first ``vocab`` columns and its gradient with respect to ``logits``.

    ``logits`` is ``[rows, padded_vocab]`` (bf16, fp16 or float32, unit column stride), ``targets`` int64
    ``[rows]``. Returns the float32 scalar loss and ``(softmax - onehot) / rows`` in the logits' dtype, zero
    on the padding columns.
    """
    rows, padded_vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    if rows == 0:
        return losses.mean(), grad  # NaN, as F.cross_entropy gives for an empty batch
    block, num_warps = _launch_config(padded_vocab)
    _cross_entropy_loss_and_grad_kernel[(rows,)](
        logits, logits.stride(0), targets, losses, grad, grad.stride(0), vocab, padded_vocab, 1.0 / rows,
        BLOCK_V=block, num_warps=num_warps,
    )
    return losses.mean(), grad


@cross_entropy_loss_and_grad.register_fake
def _(logits: Tensor, targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    return logits.new_empty((), dtype=torch.float32), torch.empty_like(logits)


def _setup_context(ctx, inputs: tuple[Tensor, Tensor, int], output: tuple[Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss: Tensor, _grad_of_grad: Tensor | None) -> tuple[Tensor, None, None]:
    # The forward already wrote d(loss)/d(logits); the chain rule only scales it by the upstream gradient
    # (1 for a plain loss.backward(), 1/k under k-step accumulation). Inductor fuses this into one pass.
    (grad_logits,) = ctx.saved_tensors
    return grad_logits * grad_loss, None, None


cross_entropy_loss_and_grad.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits: Tensor, targets: Tensor, vocab: int) -> Tensor:
    """``F.cross_entropy(logits[:, :vocab].float(), targets)`` (mean), differentiable in ``logits``.

    Args:
        logits: ``[rows, padded_vocab]`` bf16/fp16/float32 scores; columns ``vocab:`` are padding (the tied
            embedding is padded to a multiple of 128 rows) and get a zero gradient. Not modified.
        targets: int64 ``[rows]`` token ids, each in ``[0, vocab)``; there is no ``ignore_index``.
        vocab: the number of real columns, ``1 <= vocab <= padded_vocab``.

    Returns:
        The float32 scalar mean loss. Its backward returns the gradient computed in the forward (in the
        logits' dtype) times the upstream gradient, so calling backward twice on one graph is fine.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [rows, padded_vocab] and targets [rows], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if not 1 <= vocab <= logits.shape[1]:
        raise ValueError(f"vocab={vocab} outside [1, {logits.shape[1]}]")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return cross_entropy_loss_and_grad(logits, targets, vocab)[0]


@torch.library.custom_op("moe_trace::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_and_grads(hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int,
                                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The language-model head and its loss: ``logits = hidden @ weight.T`` in ``dtype``, their mean
    cross-entropy over the first ``vocab`` columns, and the loss's gradients with respect to ``hidden`` and
    ``weight`` (in their own dtypes). Returns ``(loss, logits, grad_hidden, grad_weight)``."""
    h, w = hidden.to(dtype), weight.to(dtype)
    logits = h @ w.T
    loss, grad_logits = cross_entropy_loss_and_grad(logits, targets, vocab)
    return loss, logits, (grad_logits @ w).to(hidden.dtype), (grad_logits.T @ h).to(weight.dtype)


@linear_cross_entropy_and_grads.register_fake
def _(hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int,
      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logits = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=dtype)
    return hidden.new_empty((), dtype=torch.float32), logits, torch.empty_like(hidden), torch.empty_like(weight)


def _linear_setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor, Tensor]) -> None:
    ctx.save_for_backward(output[2], output[3])


def _linear_backward(ctx, grad_loss: Tensor, *_unused: Tensor | None) -> tuple[Tensor, Tensor, None, None, None]:
    # Scaling the two small gradients, not the [rows, vocab] gradient of the logits, is what the fusion saves.
    grad_hidden, grad_weight = ctx.saved_tensors
    return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


linear_cross_entropy_and_grads.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """``cross_entropy(hidden @ weight.T, targets, vocab)`` and the logits, with the head's backward done in the
    forward.

    Apart, the loss's backward scales the ``[rows, padded_vocab]`` gradient of the logits by the upstream
    gradient (one pass over 1.6 GB at gpt-125m-moe's 16k tokens, 0.77 ms of a 45 ms step on an H200) before
    the head's two GEMMs read it. Here the forward runs those GEMMs on the gradient the kernel just wrote and
    keeps only their small results; the backward scales those. The gradient of the logits is freed inside the
    forward, so it no longer lives until the backward; the returned logits (no gradient) are the caller's to
    keep or drop. The GEMMs run in the autocast dtype when autocast is on, else in ``hidden``'s dtype.

    Args:
        hidden: ``[rows, hidden]`` final hidden states.
        weight: ``[padded_vocab, hidden]`` head (the tied embedding); columns ``vocab:`` of the logits are
            padding and get a zero gradient.
        targets: int64 ``[rows]``, each in ``[0, vocab)``.
        vocab: the number of real columns.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [rows, d] and weight [padded_vocab, d], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not 1 <= vocab <= weight.shape[0]:
        raise ValueError(f"vocab={vocab} outside [1, {weight.shape[0]}]")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):  # evaluation
        logits = hidden.to(dtype) @ weight.to(dtype).T
        return cross_entropy_loss_and_grad(logits, targets, vocab)[0], logits  # no head backward to do ahead
    loss, logits, _, _ = linear_cross_entropy_and_grads(hidden, weight, targets, vocab, dtype)
    return loss, logits.detach()
