"""transformers MoE architectures for ``moe-trace train --model hf:<family>`` (random init from a config).

A family's config is transformers' own default for that ``model_type``, resized by the harness's model
fields (blocks, hidden, heads, experts, top-k, sequence length, vocabulary): every expert and dense MLP is
``4 x hidden`` wide (as in the GPT presets), attention has as many key/value heads as query heads. The rest
is the family's: its router (softmax top-k, DeepSeek-V3's sigmoid group-limited top-k with a shared
expert, GPT-OSS's top-k-then-softmax), where its MoE blocks sit (DeepSeek-V3's first block is dense), its
attention, and its load-balancing loss (transformers' ``load_balancing_loss_func``) weighted by the
harness's ``--lb-weight`` (0.01, as for the GPT presets). DeepSeek-V3 and Llama 4 train without one
(transformers computes none for them; DeepSeek-V3's bias-correction term is a buffer no step updates, so it
routes by the group-limited sigmoid scores alone).

:class:`CausalLM` puts the transformers model behind the harness's model interface
(``forward(idx, targets) -> (logits, loss)``, ``aux_loss()``); its MoE layers are recorded by
:func:`moe_trace.record.attach` like any other transformers model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from moe_trace.errors import UsageError
from moe_trace.model import ModelConfig, padded_vocab

PREFIX = "hf:"


def _deepseek_v3(c: ModelConfig) -> dict[str, Any]:
    # Routing groups of at least 2 experts (a group's score is its top-2 sum); tokens pick half the groups.
    groups = max((g for g in (8, 4, 2, 1) if c.num_experts % g == 0 and c.num_experts // g >= 2), default=1)
    head = c.hidden // c.heads
    return {"n_routed_experts": c.num_experts, "moe_intermediate_size": 4 * c.hidden, "n_shared_experts": 1,
            "first_k_dense_replace": 1 if c.n_blocks > 1 else 0, "n_group": groups, "topk_group": max(1, groups // 2),
            "q_lora_rank": None, "kv_lora_rank": max(16, c.hidden // 4), "qk_rope_head_dim": max(8, head // 2),
            "qk_nope_head_dim": head, "v_head_dim": head, "rope_scaling": None}


# model_type -> config fields beyond the common ones (blocks, hidden, heads, top-k, length, vocabulary, FFN).
FAMILIES = {
    "mixtral": lambda c: {"num_local_experts": c.num_experts},
    "qwen2_moe": lambda c: {"num_experts": c.num_experts, "moe_intermediate_size": 4 * c.hidden,
                            "shared_expert_intermediate_size": 4 * c.hidden, "decoder_sparse_step": 1},
    "qwen3_moe": lambda c: {"num_experts": c.num_experts, "moe_intermediate_size": 4 * c.hidden,
                            "decoder_sparse_step": 1, "head_dim": c.hidden // c.heads},
    "olmoe": lambda c: {"num_experts": c.num_experts},
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": lambda c: {"num_local_experts": c.num_experts, "head_dim": c.hidden // c.heads,
                          "layer_types": ["full_attention"] * c.n_blocks,
                          # plain RoPE: the default YaRN scaling is for 128k-token contexts
                          "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0}},
    "llama4_text": lambda c: {"num_local_experts": c.num_experts, "intermediate_size_mlp": 4 * c.hidden,
                              "interleave_moe_layer_step": 1, "head_dim": c.hidden // c.heads},
}


def family(model_name: str) -> str | None:
    """``"olmoe"`` for ``"hf:olmoe"``; None for a harness preset."""
    return model_name[len(PREFIX):] if model_name.startswith(PREFIX) else None


def check_family(model_name: str) -> None:
    """One clear line when transformers is missing or the family is not one this module can build."""
    name = family(model_name)
    if name not in FAMILIES:
        raise UsageError(f"unknown transformers family {name!r}; supported: "
                         + ", ".join(PREFIX + f for f in FAMILIES))
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise UsageError(f"--model {model_name} needs transformers >= 5: pip install 'moe-trace[hf]'") from None


def hf_config(c: ModelConfig) -> Any:
    """The transformers config of family ``c.name`` resized to ``c``'s fields."""
    from transformers import AutoConfig

    name = family(c.name)
    fields = {"num_hidden_layers": c.n_blocks, "hidden_size": c.hidden, "num_attention_heads": c.heads,
              "num_key_value_heads": c.heads, "intermediate_size": 4 * c.hidden, "num_experts_per_tok": c.top_k,
              # Padded as the GPT presets' embedding (an odd vocabulary makes the logits GEMMs slow); the padding
              # rows' logits are cut off before the loss.
              "max_position_embeddings": c.seq_len, "vocab_size": padded_vocab(c), "output_router_logits": True,
              "router_aux_loss_coef": c.load_balancing_weight,
              "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
              **FAMILIES[name](c)}
    return AutoConfig.for_model(name, **fields)


class _Bfloat16OnCuda(nn.Module):
    """Expert weights as bf16 on CUDA: transformers' grouped GEMM (``F.grouped_mm``) takes bf16 only and autocast
    does not cover it. The float32 master weights keep their gradients, as in this project's MoE layers."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight.to(torch.bfloat16) if weight.is_cuda else weight


class CausalLM(nn.Module):
    """A transformers causal LM with the harness's model interface; random init from :func:`hf_config`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from transformers import AutoModelForCausalLM

        from moe_trace.record import find_moe_layers

        self.model = AutoModelForCausalLM.from_config(hf_config(config))
        self.config = self.model.config  # what record.attach reads: experts, top-k, blocks
        self.vocab_size = config.vocab_size
        for site in find_moe_layers(self.model):
            if site.kind == "ids":  # experts modules taking routed ids (Llama 4's dense-input experts use bmm)
                for name, weight in list(site.module.named_parameters(recurse=False)):
                    if weight.dim() == 3:
                        parametrize.register_parametrization(site.module, name, _Bfloat16OnCuda(), unsafe=True)
        self._aux_loss: Tensor | None = None

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits ``[batch, seq, vocab]`` and, given targets (already shifted), the mean cross-entropy."""
        out = self.model(input_ids=idx, use_cache=False)  # training: no key/value cache to build
        aux = getattr(out, "aux_loss", None)
        coefficient = getattr(self.config, "router_aux_loss_coef", None)
        self._aux_loss = coefficient * aux if aux is not None and coefficient else None
        logits = out.logits[..., : self.vocab_size]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits.detach(), loss

    def aux_loss(self) -> Tensor:
        """The family's weighted load-balancing loss of the last forward (zero where it has none)."""
        if self._aux_loss is None:
            return torch.zeros((), device=next(self.parameters()).device)
        return self._aux_loss
