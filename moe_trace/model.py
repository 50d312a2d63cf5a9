"""A GPT decoder whose every ``moe_every``-th block has a Mixture-of-Experts MLP.

Pre-LayerNorm blocks, learned positions, causal self-attention (PyTorch SDPA or the INT8 FlashAttention
kernel of :mod:`moe_trace.attention`), token embedding tied to the output head.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_trace.moe import MoELayer, RouterSettings

# Decides the loss path on CUDA; find_spec does not import Triton, so this costs nothing on CPU.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

ATTENTION_IMPLS = ("sdpa", "int8")
MOE_BACKENDS = ("torch", "megablocks")


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 4096
    seq_len: int = 128
    n_blocks: int = 4
    hidden: int = 128
    heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 2  # blocks moe_every-1, 2*moe_every-1, ... are MoE blocks
    ffn_mult: int = 4
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    normalize_topk: bool = False
    # Router variants (moe_trace.moe.route): score function, balancing method, capacity (None: dropless).
    score: str = "softmax"
    balance: str = "aux"
    bias_update_rate: float = 1e-3
    capacity_factor: float | None = None
    shared_experts: int = 0  # always-on experts of width expert_ffn beside the routed ones
    expert_ffn: int | None = None  # routed (and shared) expert width; None: ffn_mult * hidden, as the dense MLP
    # Rows of the tied embedding / output head are padded to a multiple of this: an odd vocabulary (GPT-2's
    # 50257) leaves the logits GEMMs misaligned and slow. Padding rows are never looked up, their logits cut off.
    vocab_multiple: int = 128
    attention: str = "sdpa"
    moe_backend: str = "torch"  # "megablocks": moe_trace.moe_megablocks (CUDA only), same interface
    global_batch: int = 16  # sequences per optimizer step: the preset's training default

    def __post_init__(self) -> None:
        if self.vocab_multiple < 1:
            raise ValueError(f"vocab_multiple={self.vocab_multiple} must be positive")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must lie in 1..experts={self.num_experts}")
        if not 1 <= self.moe_every <= self.n_blocks:
            raise ValueError(f"moe_every={self.moe_every} must lie in 1..blocks={self.n_blocks}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r} is not one of {MOE_BACKENDS}")
        if self.shared_experts < 0 or (self.expert_ffn is not None and self.expert_ffn < 1):
            raise ValueError(f"shared_experts={self.shared_experts} and expert_ffn={self.expert_ffn} must be "
                             "non-negative and positive")
        # Checks the variant's fields.
        RouterSettings(self.top_k, self.normalize_topk, self.score, self.balance, self.capacity_factor,
                       self.bias_update_rate)
        if self.moe_backend == "megablocks" and (self.score, self.balance, self.capacity_factor,
                                                 self.shared_experts) != ("softmax", "aux", None, 0):
            raise ValueError("the megablocks backend runs softmax routing with the aux loss, dropless, without "
                             "shared experts; use --moe-backend torch for the other router variants")

    @property
    def moe_ffn(self) -> int:
        """Width of one routed expert."""
        return self.expert_ffn or self.ffn_mult * self.hidden

    @property
    def moe_blocks(self) -> list[int]:
        """Indices of the blocks whose MLP is an MoE layer."""
        return [i for i in range(self.n_blocks) if (i + 1) % self.moe_every == 0]


PRESETS: dict[str, ModelConfig] = {
    # Trains 100 steps on 2 CPU cores in well under a minute.
    "gpt-tiny-moe": ModelConfig(name="gpt-tiny-moe", vocab_size=4096, seq_len=128, n_blocks=4, hidden=128,
                                heads=4, num_experts=8, top_k=2, moe_every=2, global_batch=16),
    # The setups of "Prediction Is All MoE Needs" (arXiv 2404.16914).
    "gpt-125m-moe": ModelConfig(name="gpt-125m-moe", vocab_size=50257, seq_len=2048, n_blocks=12, hidden=768,
                                heads=12, num_experts=16, top_k=1, moe_every=2, global_batch=256),
    "gpt-350m-moe": ModelConfig(name="gpt-350m-moe", vocab_size=50257, seq_len=2048, n_blocks=24, hidden=1024,
                                heads=16, num_experts=128, top_k=1, moe_every=2, global_batch=256),
}
# Fine-grained variants (DeepSeekMoE): each expert split into 4 of a quarter the width, top-k scaled by 4, so
# routed parameters and active routed FLOPs match the coarse preset; one always-on shared expert of the same
# width comes on top.
for _coarse in ("gpt-125m-moe", "gpt-350m-moe"):
    _c = PRESETS[_coarse]
    PRESETS[f"{_coarse}-fine"] = dataclasses.replace(
        _c, name=f"{_coarse}-fine", num_experts=4 * _c.num_experts, top_k=4 * _c.top_k,
        expert_ffn=_c.ffn_mult * _c.hidden // 4, shared_experts=1)


def make_config(preset: str, **overrides) -> ModelConfig:
    """A preset with some fields replaced (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise KeyError(preset)
    return dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def causal_attention(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """Causal attention over ``[batch, heads, seq, head_dim]`` inputs."""
    if impl == "int8":
        from moe_trace.attention import flash_attention_train

        return flash_attention_train(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.impl = config.heads, config.attention
        self.qkv = nn.Linear(config.hidden, 3 * config.hidden, bias=False)
        self.proj = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        y = causal_attention(q, k, v, self.impl)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden, config.ffn_mult * config.hidden, bias=False)
        self.proj = nn.Linear(config.ffn_mult * config.hidden, config.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


def _moe_layer(config: ModelConfig, out_init_std: float) -> nn.Module:
    args = (config.hidden, config.moe_ffn, config.num_experts, config.top_k, config.load_balancing_weight,
            config.z_loss_weight, config.normalize_topk)
    if config.moe_backend == "megablocks":  # the default router only (ModelConfig refuses the variants)
        from moe_trace.moe_megablocks import MegablocksMoELayer

        return MegablocksMoELayer(*args, out_init_std=out_init_std)
    return MoELayer(*args, out_init_std=out_init_std, score=config.score, balance=config.balance,
                    capacity_factor=config.capacity_factor, bias_update_rate=config.bias_update_rate,
                    shared_experts=config.shared_experts)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool, out_init_std: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = _moe_layer(config, out_init_std) if moe else MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # GPT-2's scaled init for the projections that write into the residual stream.
        out_init_std = 0.02 / math.sqrt(2 * config.n_blocks)
        moe_blocks = set(config.moe_blocks)
        self.wte = nn.Embedding(padded_vocab(config), config.hidden)
        self.wpe = nn.Embedding(config.seq_len, config.hidden)
        self.blocks = nn.ModuleList(Block(config, i in moe_blocks, out_init_std) for i in range(config.n_blocks))
        self.ln_f = nn.LayerNorm(config.hidden)
        self.lm_head = nn.Linear(config.hidden, padded_vocab(config), bias=False)
        self.lm_head.weight = self.wte.weight
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = out_init_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, std=std)

    @property
    def moe_layers(self) -> list[nn.Module]:
        """The MoE layers, in block order (any backend: they share MoELayer's attributes)."""
        return [b.mlp for b in self.blocks if not isinstance(b.mlp, MLP)]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits ``[batch, seq, vocab]`` and, given targets, the mean cross-entropy (without aux losses).

        Given targets, the logits come back detached: training differentiates the loss alone, and under
        torch.compile a differentiable second output costs a full-size zero gradient and its slice backward.
        """
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None and x.is_cuda and TRITON_AVAILABLE:
            # The head and a one-pass loss with the head's backward done in the forward
            # (moe_trace.cross_entropy); imported here so CPU runs, and Triton's interpreter setting in tests,
            # never depend on it.
            from moe_trace.cross_entropy import linear_cross_entropy

            loss, padded_logits = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                                       self.config.vocab_size)
            return padded_logits.view(*x.shape[:2], -1)[..., : self.config.vocab_size], loss
        logits = self.lm_head(x)[..., : self.config.vocab_size]
        if targets is None:
            return logits, None
        return logits.detach(), F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def aux_loss(self) -> Tensor:
        """Weighted load-balancing + z losses of the last forward, summed over MoE layers."""
        return torch.stack([layer.aux_loss for layer in self.moe_layers]).sum()

    def tokens_per_expert(self) -> Tensor:
        """int64 ``[moe_layers, experts]`` counts of the last forward, on the model's device (no sync)."""
        return torch.stack([layer.tokens_per_expert for layer in self.moe_layers])

    def dropped_per_expert(self) -> Tensor:
        """int64 ``[moe_layers, experts]`` assignments the capacity limit dropped in the last forward."""
        return torch.stack([layer.dropped_per_expert for layer in self.moe_layers])

    def update_expert_bias(self, tokens_per_expert: Tensor) -> None:
        """The auxiliary-loss-free bias step of every MoE layer from one optimizer step's counts
        ``[moe_layers, experts]`` (summed over micro-batches and ranks); a no-op for other methods."""
        for layer, counts in zip(self.moe_layers, tokens_per_expert, strict=True):
            layer.update_expert_bias(counts)


def padded_vocab(config: ModelConfig) -> int:
    """Rows of the embedding table: the vocabulary rounded up to ``config.vocab_multiple``."""
    return -(-config.vocab_size // config.vocab_multiple) * config.vocab_multiple


def num_parameters(model: GPT, active: bool = False) -> int:
    """Parameter count; ``active=True`` counts what one token uses: k of E experts, no position table, no
    embedding padding."""
    total = sum(p.numel() for p in model.parameters())
    if not active:
        return total
    config = model.config
    inactive_experts = sum(p.numel() for layer in model.moe_layers for p in layer.expert_parameters())
    inactive_experts = inactive_experts * (config.num_experts - config.top_k) // config.num_experts
    padding = (padded_vocab(config) - config.vocab_size) * config.hidden
    return total - inactive_experts - model.wpe.weight.numel() - padding


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 x active parameters + causal attention (QK^T and PV, fwd + bwd).

    The attention term is 12 * blocks * hidden * seq for full attention, halved for the causal mask.
    """
    config = model.config
    return 6 * num_parameters(model, active=True) + 6 * config.n_blocks * config.hidden * config.seq_len
