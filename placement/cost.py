"""Cost model: estimated time of one expert-parallel training step from per-GPU token counts.

Every MoE layer is a barrier (its two all-to-alls forward and two backward), so a layer costs as much as its
busiest GPU: its expert work (forward + backward) for its tokens and local experts, plus four all-to-alls of
its tokens' activations. Two ways to price them (``--cost``):

* measured (the default once a calibration ships; ``placement/calibration.py``): expert time interpolated from
  a GPU-measured table of local experts x tokens, all-to-all from NCCL measured on one host (for clusters of up
  to one host; beyond it, and where not measured, the linear NIC model below);
* ``linear``: ``tokens * (expert FLOPs / matmul rate + all-to-all bytes / bandwidth) + 4 * latency``.

Every GPU holds the same number of expert slots and time rises with tokens, so the GPU with the most tokens is
the slowest. The rest of the step (:meth:`CostModel.rest_time_s`) is the dense model -- attention, dense FFNs and
the LM head -- data-parallel on ``tokens_per_step / gpus`` tokens per GPU at a FLOP rate, and the optimizer step
over the GPU's weights (its dense copy and its expert slots, so spare slots cost their update) at a memory
bandwidth. Left out: the dense gradients' all-reduce (compiled, it follows the backward: 2.5-3.8 ms a step for
gpt-125m-moe on 2 H200s) and, under the ``counts`` exchange, the host reads that size each all-to-all, which
dominate small steps (measured on 4 H200s at 16k tokens a step: ``benchmarks/results/placement_training_x4.json``).
Migrating an expert moves its weights, gradient and optimizer state over one link; a re-plan stalls training
for the busiest receiving GPU's transfers (no overlap assumed, so migration is charged in full).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from placement.calibration import NODE_GPUS, AllToAllTime, Calibration, ExpertTime

# hidden size, transformer blocks and padded vocabulary (LM head rows) per model preset (DESIGN.md), for traces
# whose metadata lacks them.
PRESET_SHAPES = {"gpt-tiny-moe": (128, 4, 4096), "gpt-125m-moe": (768, 12, 50304), "gpt-350m-moe": (1024, 24, 50304)}
DEFAULT_SHAPE_PRESET = "gpt-350m-moe"  # for synthetic or unknown models: hidden 1024, 2 blocks per MoE layer
DEFAULT_SEQ_LEN = 2048  # for traces whose metadata has none (imported from logs that do not say)


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
    vocab: int = 0  # LM head rows (the padded vocabulary); 0 leaves the head out
    # Gradient clipping (norm: read the gradient; scale: read and write it) and fused AdamW (read weight, gradient
    # and two moments; write weight and moments), float32: 12 + 28 bytes a parameter and step. The H100 profile
    # (benchmarks/NOTES.md) ran them at 2.65 TB/s, 79 % of its peak; an H200 at that share of 4.8 TB/s.
    optimizer_bytes_per_param: int = 40
    hbm_bandwidth: float = 3.8e12
    a2a_bandwidth: float = 50e9  # bytes/s one GPU receives in an all-to-all (a 400 Gb/s NIC per GPU)
    a2a_latency: float = 30e-6  # seconds per all-to-all call
    link_bandwidth: float = 50e9  # bytes/s for moving an expert's state to its new GPU
    activation_bytes: int = 2  # bf16 activations in the all-to-all
    state_bytes_per_param: int = 16  # bf16 weight + bf16 grad + fp32 master weight + fp32 Adam m and v
    calibration: Calibration | None = field(default=None, compare=False)  # None: the linear model

    @classmethod
    def from_meta(cls, meta: dict[str, Any], calibration: Calibration | None = None, **overrides: Any) -> CostModel:
        """Shapes from the trace metadata (``hidden``, ``n_blocks``, ``seq_len`` if present, else defaults); expert
        and all-to-all times from ``calibration`` (None: the linear model)."""
        hidden, n_blocks, vocab = PRESET_SHAPES.get(meta.get("model"), PRESET_SHAPES[DEFAULT_SHAPE_PRESET])
        n_moe = len(meta["moe_layers"])
        if meta.get("model") not in PRESET_SHAPES:
            n_blocks = 2 * n_moe
        model = cls(hidden=int(meta.get("hidden") or hidden), n_blocks=int(meta.get("n_blocks") or n_blocks),
                    n_moe_blocks=n_moe, seq_len=int(meta["seq_len"] or DEFAULT_SEQ_LEN),
                    tokens_per_step=int(meta["tokens_per_step"]), vocab=int(meta.get("vocab_size") or vocab),
                    calibration=calibration)
        return replace(model, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def name(self) -> str:
        """What ``simulate`` records as ``cost_model``: ``linear``, or the calibration with the measured shape
        used for this model's experts (and whether the all-to-all is measured or linear)."""
        if self.calibration is None:
            return "linear"
        expert = self._expert_time
        shape = f"H{self.hidden} F{self.ffn}"
        borrowed = "" if expert.source == shape else f"; experts scaled from {expert.source}"
        linear = f"linear {self.a2a_bandwidth / 1e9:g} GB/s"
        a2a = (f"measured up to {NODE_GPUS} GPUs, {linear} beyond" if self._all_to_all_time is not None else linear)
        return f"{self.calibration.label} ({shape}{borrowed}; all-to-all {a2a})"

    @cached_property
    def _expert_time(self) -> ExpertTime | None:
        return None if self.calibration is None else self.calibration.expert_time(self.hidden, self.ffn)

    @cached_property
    def _all_to_all_time(self) -> AllToAllTime | None:
        return None if self.calibration is None else self.calibration.all_to_all_time()

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

    @property
    def block_params(self) -> int:
        """The blocks' weights outside the experts: attention projections and the dense FFNs."""
        return 4 * self.hidden * self.hidden * self.n_blocks + self.expert_params * (self.n_blocks - self.n_moe_blocks)

    def dense_time_s(self, gpus: int) -> float:
        """Attention, dense FFNs and LM head time per step on each GPU (data-parallel share of the tokens)."""
        params_per_token = self.block_params + self.vocab * self.hidden
        flops_per_token = 6 * params_per_token + 6 * self.n_blocks * self.hidden * self.seq_len  # causal attention
        return self.tokens_per_step / gpus * flops_per_token / self.dense_flops

    @property
    def dense_params(self) -> int:
        """Weights every GPU holds: the blocks' outside the experts, the token embedding (tied with the LM head)
        and the position embedding."""
        return self.block_params + (self.vocab + self.seq_len) * self.hidden

    def optimizer_time_s(self, local_experts: int) -> float:
        """Gradient clipping and the AdamW update over one GPU's weights: the dense ones and ``local_experts``
        expert slots in every MoE layer."""
        params = self.dense_params + local_experts * self.n_moe_blocks * self.expert_params
        return params * self.optimizer_bytes_per_param / self.hbm_bandwidth

    def rest_time_s(self, gpus: int, local_experts: int) -> float:
        """The step's placement-independent part on each GPU: the dense model and the optimizer step."""
        return self.dense_time_s(gpus) + self.optimizer_time_s(local_experts)

    def expert_time_s(self, tokens: np.ndarray, local_experts: int) -> np.ndarray:
        """One GPU's expert work (forward + backward) in one MoE layer for ``tokens`` (array) on it."""
        if self._expert_time is None:
            return np.asarray(tokens, dtype=np.float64) * (3 * 2 * self.expert_params / self.matmul_flops)
        return self._expert_time.seconds_for(tokens, local_experts)

    def all_to_all_time_s(self, tokens: np.ndarray, gpus: int) -> np.ndarray:
        """One MoE layer's four all-to-alls (dispatch and combine, forward and backward) for a GPU with
        ``tokens``; the share ``(gpus - 1) / gpus`` of its tokens crosses to other GPUs."""
        remote_bytes = np.asarray(tokens, dtype=np.float64) * self.activation_bytes * self.hidden * (gpus - 1) / gpus
        if self._all_to_all_time is not None and gpus <= NODE_GPUS:
            return 4 * self._all_to_all_time.seconds_for(remote_bytes)
        return 4 * (remote_bytes / self.a2a_bandwidth + self.a2a_latency)

    def moe_layer_time_s(self, busiest_gpu_tokens: np.ndarray, gpus: int, local_experts: int) -> np.ndarray:
        """One MoE layer's time from its busiest GPU's tokens (array of any shape)."""
        return (self.expert_time_s(busiest_gpu_tokens, local_experts)
                + self.all_to_all_time_s(busiest_gpu_tokens, gpus))

    def step_time_s(self, busiest_gpu_tokens: np.ndarray, gpus: int, local_experts: int) -> np.ndarray:
        """Step time from ``busiest_gpu_tokens[..., layers]`` (the max over GPUs per layer) with
        ``local_experts`` expert slots per GPU."""
        return (self.rest_time_s(gpus, local_experts)
                + self.moe_layer_time_s(busiest_gpu_tokens, gpus, local_experts).sum(axis=-1))

    def migration_time_s(self, arrivals: np.ndarray) -> float:
        """Stall for a re-plan from ``arrivals[layers, gpus]``, the experts each GPU receives per layer."""
        if arrivals.size == 0:
            return 0.0
        return float(arrivals.max(axis=1).sum() * self.bytes_per_expert / self.link_bandwidth)
