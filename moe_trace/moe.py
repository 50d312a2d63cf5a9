"""Dropless top-k Mixture-of-Experts layer with a plain-torch expert backend.

The layer is split into two pure parts so that other backends (megablocks, expert parallelism) can
replace one without touching the other:

* :func:`route` turns router logits into top-k expert indices and weights, the per-expert token counts
  and the auxiliary losses;
* :func:`expert_forward` runs the expert MLPs on tokens already sorted by expert.

:class:`MoELayer` glues them together and keeps the per-expert counts of its last forward as a device
tensor (``tokens_per_expert``), so the recorder can read them without a host-device sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """What the router decided for a flat batch of ``T`` tokens."""

    expert_indices: Tensor  # int64 [T, k], the k experts of every token
    expert_weights: Tensor  # float32 (or wider) [T, k], their gate values
    tokens_per_expert: Tensor  # int64 [E]; a token counts once for each of its k experts
    load_balancing_loss: Tensor  # scalar, unweighted: E * sum_e f_e * P_e (1.0 when perfectly balanced)
    z_loss: Tensor  # scalar, unweighted: mean over tokens of logsumexp(logits)^2


def route(logits: Tensor, top_k: int, normalize_weights: bool = False) -> Routing:
    """Top-k softmax routing of ``logits [T, E]`` (in at least float32, for stable gates and losses).

    The load-balancing loss is the Switch Transformer / megablocks form ``E * sum_e f_e * P_e``, with
    ``f_e`` the fraction of the ``T * k`` assignments that went to expert ``e`` (not differentiable) and
    ``P_e`` the mean router probability of ``e`` (differentiable).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_tokens, num_experts = logits.shape
    probs = logits.softmax(dim=-1)
    weights, indices = probs.topk(top_k, dim=-1)
    if normalize_weights:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # Not torch.bincount: on CUDA it reads the largest index on the host to size its output (a sync).
    flat = indices.flatten()
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64, device=logits.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    assigned_fraction = tokens_per_expert.float() / (num_tokens * top_k)
    load_balancing_loss = num_experts * (assigned_fraction * probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return Routing(indices, weights, tokens_per_expert, load_balancing_loss, z_loss)


def expert_forward(x_sorted: Tensor, tokens_per_expert: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``gelu(x @ w1[e]) @ w2[e]`` for each expert's contiguous slice of ``x_sorted [T*k, hidden]``.

    ``tokens_per_expert [E]`` gives the slice lengths (rows are sorted by expert). On CUDA this is two
    ``torch._grouped_mm`` calls in bf16 whose group offsets stay on the device; elsewhere a loop over
    experts (which reads the counts on the host, harmless on CPU). Returns ``x_sorted``'s dtype.
    """
    if x_sorted.is_cuda:
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        hidden = torch._grouped_mm(x_sorted.bfloat16(), w1.bfloat16(), offs=offsets)
        out = torch._grouped_mm(F.gelu(hidden), w2.bfloat16(), offs=offsets)
        return out.to(x_sorted.dtype)
    chunks = x_sorted.split(tokens_per_expert.tolist())
    # Empty chunks still pass through their expert so every expert weight is part of the graph (DDP).
    return torch.cat([F.gelu(chunk @ w1[e]) @ w2[e] for e, chunk in enumerate(chunks)])


def dispatch_combine(x_flat: Tensor, expert_indices: Tensor, expert_weights: Tensor, tokens_per_expert: Tensor,
                     run_experts: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """A routed layer's expert work: permute ``x_flat [T, hidden]``'s rows by expert, ``run_experts(x_sorted,
    tokens_per_expert)``, put the outputs back in token order and sum each token's k outputs weighted by its
    gates. ``expert_indices`` and ``expert_weights`` are ``[T, k]`` (:class:`Routing`). This is all the work a
    layer's experts cost beyond the router, which ``benchmarks/expert_cost.py`` times for the placement model.
    """
    # Sort the T*k (token, expert) assignments by expert; a stable sort keeps token order per expert.
    order = expert_indices.flatten().argsort(stable=True)
    token_of_row = order // expert_indices.shape[1]
    y_sorted = run_experts(x_flat[token_of_row], tokens_per_expert)
    # Back to (token, k) order by the inverse permutation: a copy, not an atomic scatter-add, so the
    # combine is cheap and deterministic; then each token's k outputs weighted by their gates.
    y = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted).view(*expert_weights.shape, -1)
    return (y * expert_weights.unsqueeze(-1)).sum(dim=1)


class MoELayer(nn.Module):
    """Router + ``num_experts`` GELU MLPs (``hidden -> ffn -> hidden``), dropless top-k dispatch.

    ``forward(x [..., hidden])`` returns the combined expert outputs of ``x``'s shape. After a forward,
    ``tokens_per_expert`` (int64 [E], on x's device) holds the counts and ``aux_loss`` the weighted sum of
    the load-balancing and z losses to add to the training loss.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int,
                 load_balancing_weight: float = 0.01, z_loss_weight: float = 0.0,
                 normalize_weights: bool = False, init_std: float = 0.02, out_init_std: float | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in 1..num_experts={num_experts}")
        self.num_experts, self.top_k = num_experts, top_k
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        self.normalize_weights = normalize_weights
        self.router = nn.Linear(hidden, num_experts, bias=False)
        # Stacked expert weights: the layout torch._grouped_mm and megablocks' grouped GEMM consume.
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        nn.init.normal_(self.router.weight, std=init_std)
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=out_init_std if out_init_std is not None else init_std)
        self.tokens_per_expert: Tensor | None = None
        self.aux_loss: Tensor | None = None

    def expert_parameters(self) -> list[nn.Parameter]:
        """The stacked expert weights (what a token uses k/E of)."""
        return [self.w1, self.w2]

    def forward(self, x: Tensor) -> Tensor:
        x_flat = x.reshape(-1, x.shape[-1])
        routing = route(self.router(x_flat), self.top_k, self.normalize_weights)
        self.tokens_per_expert = routing.tokens_per_expert
        self.aux_loss = (self.load_balancing_weight * routing.load_balancing_loss
                         + self.z_loss_weight * routing.z_loss)

        out = dispatch_combine(x_flat, routing.expert_indices, routing.expert_weights, routing.tokens_per_expert,
                               self.run_experts)
        return out.to(x.dtype).reshape(x.shape)

    def run_experts(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Expert outputs for rows sorted by expert (what expert parallelism replaces with an exchange)."""
        return expert_forward(x_sorted, tokens_per_expert, self.w1, self.w2)

    def extra_repr(self) -> str:
        e, h, f = self.w1.shape
        return f"experts={e}, top_k={self.top_k}, hidden={h}, ffn={f}"

