"""Cost model: estimated time of one expert-parallel training step from per-GPU token counts.

Every MoE layer is a barrier (its two all-to-alls forward and two backward), so a layer costs as much as its
busiest GPU: ``tokens * (expert FLOPs / matmul rate + all-to-all bytes / bandwidth) + 4 * latency``. The
rest of the model (attention, dense FFNs) runs data-parallel on ``tokens_per_step / gpus`` tokens per GPU
and is the same for every placement; the embedding and LM head are left out. Migrating an expert moves its
weights, gradient and optimizer state over one link; a re-plan stalls training for the busiest receiving
GPU's transfers (no overlap assumed, so migration is charged in full).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# hidden size and transformer blocks per model preset (DESIGN.md), for traces whose metadata lacks them.
PRESET_SHAPES = {"gpt-tiny-moe": (128, 4), "gpt-125m-moe": (768, 12), "gpt-350m-moe": (1024, 24)}
DEFAULT_SHAPE_PRESET = "gpt-350m-moe"  # for synthetic or unknown models: hidden 1024, 2 blocks per MoE layer


@dataclass(frozen=True)
class CostModel:
    hidden: int
    n_blocks: int
    n_moe_blocks: int
    seq_len: int
    tokens_per_step: int
    ffn_mult: int = 4
    matmul_flops: float = 180e12  # achieved bf16 rate of grouped expert GEMMs (ANCHORS.md: 124-185 TFLOP/s, H100)
    dense_flops: float = 400e12  # achieved rate of attention + dense GEMMs (ANCHORS.md: GEMM 776, flash attn ~300)
    a2a_bandwidth: float = 50e9  # bytes/s one GPU receives in an all-to-all (a 400 Gb/s NIC per GPU)
    a2a_latency: float = 30e-6  # seconds per all-to-all call
    link_bandwidth: float = 50e9  # bytes/s for moving an expert's state to its new GPU
    activation_bytes: int = 2  # bf16 activations in the all-to-all
    state_bytes_per_param: int = 16  # bf16 weight + bf16 grad + fp32 master weight + fp32 Adam m and v

    @classmethod
    def from_meta(cls, meta: dict[str, Any], **overrides: Any) -> CostModel:
        """Shapes from the trace metadata (``hidden``, ``n_blocks`` if present, else the preset's)."""
        hidden, n_blocks = PRESET_SHAPES.get(meta.get("model"), PRESET_SHAPES[DEFAULT_SHAPE_PRESET])
        n_moe = len(meta["moe_layers"])
        if meta.get("model") not in PRESET_SHAPES:
            n_blocks = 2 * n_moe
        model = cls(hidden=int(meta.get("hidden", hidden)), n_blocks=int(meta.get("n_blocks", n_blocks)),
                    n_moe_blocks=n_moe, seq_len=int(meta["seq_len"]), tokens_per_step=int(meta["tokens_per_step"]))
        return replace(model, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def ffn(self) -> int:
        return self.ffn_mult * self.hidden

    @property
    def expert_params(self) -> int:
        return 2 * self.hidden * self.ffn

    @property
    def bytes_per_expert(self) -> int:
        """Bytes moved when an expert migrates: its parameters with their gradient and optimizer state."""
        return self.expert_params * self.state_bytes_per_param

    def dense_time_s(self, gpus: int) -> float:
        """Attention and dense-FFN time per step on each GPU (data-parallel share of the tokens)."""
        h = self.hidden
        params_per_token = 4 * h * h * self.n_blocks + self.expert_params * (self.n_blocks - self.n_moe_blocks)
        flops_per_token = 6 * params_per_token + 6 * self.n_blocks * h * self.seq_len  # causal attention
        return self.tokens_per_step / gpus * flops_per_token / self.dense_flops

    def seconds_per_token(self, gpus: int) -> float:
        """MoE-layer time per token on the busiest GPU: expert matmuls (fwd + bwd) and 4 all-to-all transfers."""
        compute = 3 * 2 * self.expert_params / self.matmul_flops
        remote = (gpus - 1) / gpus  # share of a GPU's tokens that arrive from other GPUs
        transfer = 4 * self.activation_bytes * self.hidden * remote / self.a2a_bandwidth
        return compute + transfer

    def step_time_s(self, busiest_gpu_tokens: np.ndarray, gpus: int) -> np.ndarray:
        """Step time from ``busiest_gpu_tokens[..., layers]`` (the max over GPUs per layer)."""
        moe = busiest_gpu_tokens * self.seconds_per_token(gpus) + 4 * self.a2a_latency
        return self.dense_time_s(gpus) + moe.sum(axis=-1)

    def migration_time_s(self, arrivals: np.ndarray) -> float:
        """Stall for a re-plan from ``arrivals[layers, gpus]``, the experts each GPU receives per layer."""
        if arrivals.size == 0:
            return 0.0
        return float(arrivals.max(axis=1).sum() * self.bytes_per_expert / self.link_bandwidth)
