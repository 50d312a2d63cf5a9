"""Will the model's training state fit the GPU? Estimated before anything is allocated.

Training state is weights + gradients + optimizer state, per parameter: 16 bytes with float32 AdamW, about 8
or 6 with the lean optimizers (:mod:`moe_trace.optim`). Dense weights are replicated on every rank; with expert
parallelism each rank holds ``1 / world_size`` of the experts. Activations come on top, so the state may take
at most ``STATE_FRACTION`` of the GPU's memory. Activations (:func:`activation_bytes`) are estimated per
micro-batch; state and activations together must fit the whole device (on CPU: the machine's RAM).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass

import torch

from moe_trace.errors import UsageError
from moe_trace.model import GPT, ModelConfig
from moe_trace.optim import OPTIMIZERS

STATE_FRACTION = 0.75
GIB = 1 << 30


@dataclass(frozen=True)
class ParameterCount:
    dense: int  # replicated on every rank (attention, dense MLPs, routers, embeddings, norms)
    experts: int  # all experts of all MoE layers

    def per_rank(self, expert_parallel: int = 1) -> int:
        return self.dense + self.experts // expert_parallel


def count_parameters(config: ModelConfig) -> ParameterCount:
    """Dense and expert parameter counts of ``GPT(config)``, built on the meta device (no memory, no init cost)."""
    return _count_parameters(json.dumps(dataclasses.asdict(config), sort_keys=True))


@functools.lru_cache(maxsize=32)
def _count_parameters(config_json: str) -> ParameterCount:  # a 13 B-parameter model takes seconds to build
    config = ModelConfig(**json.loads(config_json))
    with torch.device("meta"):  # the torch backend's layers: megablocks' count the same and need CUDA
        model = GPT(dataclasses.replace(config, moe_backend="torch"))
    experts = sum(p.numel() for layer in model.moe_layers for p in layer.expert_parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(dense=total - experts, experts=experts)


def training_state_bytes(config: ModelConfig, expert_parallel: int = 1, optimizer: str = "adamw") -> int:
    """Weights + gradients + optimizer state on one rank."""
    return int(OPTIMIZERS[optimizer].bytes_per_parameter * count_parameters(config).per_rank(expert_parallel))


def choose_optimizer(config: ModelConfig, gpu_bytes: int, expert_parallel: int = 1, requested: str = "auto",
                     lean_available: bool = True) -> str:
    """The optimizer to train with: ``requested`` if its state fits, or under ``auto`` the most exact one that fits
    (float32 AdamW first); else raise :class:`UsageError` with a way out."""
    counts = count_parameters(config)
    budget = STATE_FRACTION * gpu_bytes
    candidates = list(OPTIMIZERS) if requested == "auto" else [requested]
    for name in candidates:
        if requested == "auto" and OPTIMIZERS[name].needs_torchao and not lean_available:
            continue
        if OPTIMIZERS[name].bytes_per_parameter * counts.per_rank(expert_parallel) <= budget:
            return name
    raise UsageError(_refusal(config, counts, budget, gpu_bytes, expert_parallel, requested, lean_available))


def _refusal(config: ModelConfig, counts: ParameterCount, budget: float, gpu_bytes: int, expert_parallel: int,
             requested: str, lean_available: bool) -> str:
    """Why the state does not fit, and the ways out that would."""
    name = "adamw" if requested == "auto" else requested
    per_parameter = OPTIMIZERS[name].bytes_per_parameter
    needed = per_parameter * counts.per_rank(expert_parallel)
    ways = [f"--optimizer {lean} (~{OPTIMIZERS[lean].bytes_per_parameter * counts.per_rank(expert_parallel) / GIB:.0f}"
            f" GiB{'' if lean_available or not OPTIMIZERS[lean].needs_torchao else ', pip install torchao'})"
            for lean in OPTIMIZERS if OPTIMIZERS[lean].bytes_per_parameter < per_parameter
            and OPTIMIZERS[lean].bytes_per_parameter * counts.per_rank(expert_parallel) <= budget]
    fits = [w for w in (2, 4, 8, 16, 32, 64)
            if w > expert_parallel and config.num_experts % w == 0 and per_parameter * counts.per_rank(w) <= budget]
    if fits:
        ways.append(f"torchrun --nproc-per-node {fits[0]} (~{per_parameter * counts.per_rank(fits[0]) / GIB:.0f} GiB "
                    "per GPU)")
    expert_bytes = counts.experts // config.num_experts * per_parameter
    room = int((budget - per_parameter * counts.dense) * expert_parallel // max(1, expert_bytes))
    fewer = 1 << (room.bit_length() - 1) if room >= 1 else 0  # largest power of two that fits
    if 1 <= fewer < config.num_experts:
        ways.append(f"--experts {fewer}")
    suggestion = "; use " + " or ".join(ways) if ways else "; use a smaller model"
    return (f"{config.name} with {config.num_experts} experts needs ~{needed / GIB:.0f} GiB per GPU for weights, "
            f"gradients and {name} state on {expert_parallel} GPU(s), more than {STATE_FRACTION:.0%} of this GPU's "
            f"{gpu_bytes / GIB:.0f} GiB{suggestion}")


def physical_memory_bytes() -> int:
    """The machine's RAM (what a CPU run has to hold its state and activations)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def activation_bytes(config: ModelConfig, micro_batch: int, element_bytes: int) -> int:
    """Memory autograd keeps for one micro-batch's backward, in bytes (``element_bytes``: 2 under bf16
    autocast, 4 in float32 on CPU).

    Per token and block: the attention's LayerNorm input and output, q, k, v, its output and the second
    LayerNorm's input and output (8 x hidden; flash attention keeps no seq x seq matrix), and the MLP's input,
    hidden pre- and post-activation and output (2 x hidden + 2 x ffn), once per routed expert (top-k) in MoE
    blocks; then the logits, their log-softmax and gradient in float32 (3 x vocab). For gpt-tiny-moe on CPU at
    8192 tokens this gives 96 KB per token against 113 KB of measured peak resident memory.
    """
    hidden, ffn = config.hidden, config.ffn_mult * config.hidden
    moe_blocks = len(config.moe_blocks)
    mlp = 2 * hidden + 2 * ffn
    per_token = (config.n_blocks * 8 * hidden + (config.n_blocks - moe_blocks) * mlp
                 + moe_blocks * config.top_k * mlp) * element_bytes + 3 * config.vocab_size * 4
    return per_token * micro_batch * config.seq_len


def check_activations_fit(config: ModelConfig, micro_batch: int, device_bytes: int, device: str,
                          expert_parallel: int = 1, optimizer: str = "adamw") -> None:
    """Raise :class:`UsageError` when the training state plus one micro-batch's activations exceed
    ``device_bytes`` (certain to run out of memory, or on CPU to swap for hours)."""
    element_bytes = 2 if device == "cuda" else 4
    activations = activation_bytes(config, micro_batch, element_bytes)
    state = training_state_bytes(config, expert_parallel, optimizer)
    if state + activations <= device_bytes:
        return
    where = "this GPU's" if device == "cuda" else "this machine's RAM,"
    raise UsageError(f"{config.name} at --seq-len {config.seq_len} with micro-batches of {micro_batch} sequences "
                     f"does not fit: ~{activations / GIB:.1f} GiB of activations and ~{state / GIB:.1f} GiB of "
                     f"weights, gradients and optimizer state, more than {where} {device_bytes / GIB:.0f} GiB; "
                     "use a shorter --seq-len, a smaller --micro-batch or a smaller model")
