"""The megablocks dMoE backend (``--moe-backend megablocks``), behind the interface of :class:`~moe_trace.moe.MoELayer`.

megablocks' dropless MoE (``mlp_impl="grouped"``: radix sort, gather, two grouped GEMMs of the
grouped_gemm package, scatter) runs the layer; its router is the same top-k softmax and its
load-balancing loss the same ``E * sum_e f_e * P_e`` as :func:`moe_trace.moe.route`, so the two backends
differ only in kernels. Two adjustments keep training numerics equal to the torch backend's:

* master weights stay float32 (megablocks allocates bf16 ones): the expert weights are cast to bf16 on
  each forward by a parametrization, as the torch backend does, and gradients reach the fp32 masters;
* ``state_dict`` uses the torch backend's names and layout (``router.weight``, ``w1 [E, hidden, ffn]``,
  ``w2 [E, ffn, hidden]``), so checkpoints and weights move freely between the backends.

Counts are megablocks' own ``tokens_per_expert`` (its histogram kernel). megablocks needs CUDA and bf16
autocast; its grouped MLP reads the counts on the host once per layer (a sync the backend forces).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize


class _ToBfloat16(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return weight.to(torch.bfloat16)


class MegablocksMoELayer(nn.Module):
    """Drop-in for :class:`~moe_trace.moe.MoELayer` (same constructor, attributes and state_dict) on megablocks."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int,
                 load_balancing_weight: float = 0.01, z_loss_weight: float = 0.0,
                 normalize_weights: bool = False, init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        if z_loss_weight:
            raise ValueError("the megablocks backend has no router z-loss here; use --moe-backend torch")
        self.num_experts, self.top_k, self.hidden, self.ffn = num_experts, top_k, hidden, ffn
        self.load_balancing_weight = load_balancing_weight
        args = Arguments(
            hidden_size=hidden, ffn_hidden_size=ffn, moe_num_experts=num_experts, moe_top_k=top_k,
            moe_loss_weight=load_balancing_weight, moe_normalize_expert_weights=1 if normalize_weights else None,
            bias=False, return_bias=False, activation_fn=F.gelu, mlp_impl="grouped", bf16=True, fp16=False,
            init_method=partial(nn.init.normal_, std=init_std),
            output_layer_init_method=partial(nn.init.normal_, std=out_init_std or init_std))
        self.moe = dMoE(args).float()
        for name in ("w1", "w2"):
            parametrize.register_parametrization(self.moe.experts.mlp, name, _ToBfloat16(), unsafe=True)
        self._register_state_dict_hook(_to_torch_layout)
        self._register_load_state_dict_pre_hook(self._from_torch_layout)
        self.tokens_per_expert: Tensor | None = None
        self.aux_loss: Tensor | None = None

    def expert_parameters(self) -> list[nn.Parameter]:
        """The float32 master weights of the experts (megablocks' ``[E * ffn, hidden]`` layout)."""
        originals = self.moe.experts.mlp.parametrizations
        return [originals.w1.original, originals.w2.original]

    def forward(self, x: Tensor) -> Tensor:
        x_flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        scores, expert_weights, expert_indices = self.moe.router(x_flat)
        out, tokens_per_expert = self.moe.experts.forward_fn(x_flat, expert_weights, expert_indices)
        self.tokens_per_expert = tokens_per_expert.long()
        self.aux_loss = self.load_balancing_weight * self.moe.experts.load_balancing_loss(tokens_per_expert, scores)
        return out.reshape(x.shape).to(x.dtype)

    # torch backend layout <-> megablocks layout: w1 [E, hidden, ffn] <-> [E * ffn, hidden] (transposed),
    # w2 [E, ffn, hidden] <-> [E * ffn, hidden] (same memory order).
    def _from_torch_layout(self, state_dict: dict, prefix: str, *args) -> None:
        experts = prefix + "moe.experts.mlp.parametrizations."
        state_dict[prefix + "moe.router.layer.weight"] = state_dict.pop(prefix + "router.weight")
        state_dict[experts + "w1.original"] = state_dict.pop(prefix + "w1").transpose(1, 2).reshape(-1, self.hidden)
        state_dict[experts + "w2.original"] = state_dict.pop(prefix + "w2").reshape(-1, self.hidden)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden}, ffn={self.ffn}, megablocks"


def _to_torch_layout(module: MegablocksMoELayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    experts = prefix + "moe.experts.mlp.parametrizations."
    shape = (module.num_experts, module.ffn, module.hidden)
    state_dict[prefix + "router.weight"] = state_dict.pop(prefix + "moe.router.layer.weight")
    state_dict[prefix + "w1"] = state_dict.pop(experts + "w1.original").view(shape).transpose(1, 2)
    state_dict[prefix + "w2"] = state_dict.pop(experts + "w2.original").view(shape)
