"""Will the model's training state fit the GPU? Estimated before anything is allocated.

Training state is 16 bytes per parameter: float32 weights (4), float32 gradients (4) and AdamW's two
float32 moments (8). Dense weights are replicated on every rank; with expert parallelism each rank holds
``1 / world_size`` of the experts. Activations come on top, so the state may take at most
``STATE_FRACTION`` of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moe_trace.errors import UsageError
from moe_trace.model import GPT, ModelConfig

BYTES_PER_PARAMETER = 16
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
    with torch.device("meta"):  # the torch backend's layers: megablocks' count the same and need CUDA
        model = GPT(dataclasses.replace(config, moe_backend="torch"))
    experts = sum(p.numel() for layer in model.moe_layers for p in layer.expert_parameters())
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(dense=total - experts, experts=experts)


def training_state_bytes(config: ModelConfig, expert_parallel: int = 1) -> int:
    """Weights + gradients + AdamW state on one rank."""
    return BYTES_PER_PARAMETER * count_parameters(config).per_rank(expert_parallel)


def check_fits(config: ModelConfig, gpu_bytes: int, expert_parallel: int = 1) -> None:
    """Raise :class:`UsageError` with a way out when the training state would not fit ``gpu_bytes`` per GPU."""
    counts = count_parameters(config)
    needed = BYTES_PER_PARAMETER * counts.per_rank(expert_parallel)
    budget = STATE_FRACTION * gpu_bytes
    if needed <= budget:
        return
    fits = [w for w in (2, 4, 8, 16, 32, 64)
            if w > expert_parallel and config.num_experts % w == 0
            and BYTES_PER_PARAMETER * counts.per_rank(w) <= budget]
    expert_bytes = counts.experts // config.num_experts * BYTES_PER_PARAMETER
    room = int((budget - BYTES_PER_PARAMETER * counts.dense) * expert_parallel // max(1, expert_bytes))
    fewer = 1 << (room.bit_length() - 1) if room >= 1 else 0  # largest power of two that fits
    ways = [f"torchrun --nproc-per-node {fits[0]} (~{BYTES_PER_PARAMETER * counts.per_rank(fits[0]) / GIB:.0f} GiB "
            "per GPU)"] if fits else []
    if 1 <= fewer < config.num_experts:
        ways.append(f"--experts {fewer}")
    suggestion = "; use " + " or ".join(ways) if ways else "; use a smaller model"
    raise UsageError(f"{config.name} with {config.num_experts} experts needs ~{needed / GIB:.0f} GiB per GPU for "
                     f"weights, gradients and AdamW state on {expert_parallel} GPU(s), more than "
                     f"{STATE_FRACTION:.0%} of this GPU's {gpu_bytes / GIB:.0f} GiB{suggestion}")
