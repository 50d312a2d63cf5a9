"""Top-k Mixture-of-Experts layer with a plain-torch expert backend and the router variants of issue 14.

The layer is split into pure parts so that other backends (megablocks, expert parallelism) can replace one
without touching the others:

* :func:`route` turns router logits into top-k expert indices and gates, the per-expert token counts, the
  assignments a capacity limit drops, and the auxiliary losses. It is assembled from small functions, one
  per choice a router makes: the score function (:func:`router_scores`), the selection (:func:`select_experts`,
  with the auxiliary-loss-free bias), the gates (:func:`gate_weights`), the balance losses
  (:func:`switch_balance_loss`, :func:`sequence_balance_loss`) and the capacity limit (:func:`within_capacity`);
* :func:`expert_forward` runs the expert MLPs on tokens already sorted by expert;
* :func:`expert_bias_update` is the auxiliary-loss-free bias step, applied once per optimizer step.

:class:`MoELayer` glues them together and keeps the per-expert counts of its last forward as device tensors
(``tokens_per_expert``, ``dropped_per_expert``), so the recorder can read them without a host-device sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORE_FUNCTIONS = ("softmax", "sigmoid")
# aux: Switch's batch-level loss; seq_aux: DeepSeek-V2/V3's per-sequence form of it; aux_free: DeepSeek-V3's
# selection bias, no loss; none: nothing pulls toward balance.
BALANCE_METHODS = ("aux", "seq_aux", "aux_free", "none")


@dataclass(frozen=True)
class RouterSettings:
    """How a layer routes: everything :func:`route` and the bias step need besides the logits (the loss
    weights stay attributes of the layer)."""

    top_k: int
    normalize_weights: bool = False
    score: str = "softmax"
    balance: str = "aux"
    capacity_factor: float | None = None  # None: dropless
    bias_update_rate: float = 1e-3  # of the selection bias, for balance "aux_free"

    def __post_init__(self) -> None:
        if self.score not in SCORE_FUNCTIONS:
            raise ValueError(f"score={self.score!r} is not one of {SCORE_FUNCTIONS}")
        if self.balance not in BALANCE_METHODS:
            raise ValueError(f"balance={self.balance!r} is not one of {BALANCE_METHODS}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be positive (or None: dropless)")
        if not self.bias_update_rate > 0:
            raise ValueError(f"bias_update_rate={self.bias_update_rate} must be positive")


@dataclass
class Routing:
    """What the router decided for a flat batch of ``T`` tokens."""

    expert_indices: Tensor  # int64 [T, k], the k experts of every token
    expert_weights: Tensor  # float32 (or wider) [T, k], their gates; 0 where a capacity limit dropped the assignment
    tokens_per_expert: Tensor  # int64 [E]; a token counts once for each of its k experts, dropped or not
    dropped_per_expert: Tensor  # int64 [E]; the assignments a capacity limit dropped (zeros when dropless)
    load_balancing_loss: Tensor  # scalar, unweighted: the balance loss of the method (1.0 when perfectly balanced)
    z_loss: Tensor  # scalar, unweighted: mean over tokens of logsumexp(logits)^2


def router_scores(logits: Tensor, score: str = "softmax") -> Tensor:
    """Per-token expert scores ``[T, E]``: a softmax over experts, or DeepSeek-V3's independent sigmoids."""
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"score={score!r} is not one of {SCORE_FUNCTIONS}")


def select_experts(scores: Tensor, top_k: int, expert_bias: Tensor | None = None) -> Tensor:
    """The ``top_k`` experts of every token ``[T, k]``, by score plus ``expert_bias [E]`` where given.

    The bias only decides *which* experts a token goes to (DeepSeek-V3's auxiliary-loss-free balancing);
    the gates stay the raw scores of the chosen experts (:func:`gate_weights`).
    """
    biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
    return biased.topk(top_k, dim=-1).indices


def gate_weights(scores: Tensor, indices: Tensor, normalize: bool) -> Tensor:
    """The chosen experts' scores ``[T, k]``, divided by their sum over the k when ``normalize``."""
    weights = scores.gather(1, indices)
    return weights / weights.sum(dim=-1, keepdim=True) if normalize else weights


def count_assignments(indices: Tensor, num_experts: int) -> Tensor:
    """int64 ``[E]``: how many of the ``[T, k]`` assignments went to each expert."""
    # Not torch.bincount: on CUDA it reads the largest index on the host to size its output (a sync).
    flat = indices.flatten()
    return torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def switch_balance_loss(probs: Tensor, tokens_per_expert: Tensor, top_k: int) -> Tensor:
    """Switch Transformer / megablocks ``E * sum_e f_e * P_e`` over the whole batch.

    ``f_e`` is the fraction of the ``T * k`` assignments that went to expert ``e`` (not differentiable),
    ``P_e`` the mean of ``probs [T, E]`` (scores normalised over experts; differentiable).
    """
    num_tokens, num_experts = probs.shape
    assigned_fraction = tokens_per_expert.to(probs.dtype) / (num_tokens * top_k)
    return num_experts * (assigned_fraction * probs.mean(dim=0)).sum()


def sequence_balance_loss(probs: Tensor, indices: Tensor, seq_len: int) -> Tensor:
    """DeepSeek-V2/V3's sequence-wise balance loss: the Switch form within each sequence, averaged over sequences.

    ``probs [T, E]`` and ``indices [T, k]`` hold ``T / seq_len`` whole sequences back to back. A batch can
    be balanced while each sequence sticks to a few experts; this form penalises that too.
    """
    num_tokens, num_experts = probs.shape
    top_k = indices.shape[1]
    sequences, remainder = divmod(num_tokens, seq_len)
    if remainder:
        raise ValueError(f"{num_tokens} tokens are not whole sequences of {seq_len}")
    sequence_of = torch.arange(num_tokens, device=probs.device).unsqueeze(1) // seq_len
    per_sequence = count_assignments(sequence_of * num_experts + indices, sequences * num_experts)
    assigned_fraction = per_sequence.view(sequences, num_experts).to(probs.dtype) / (seq_len * top_k)
    mean_probs = probs.view(sequences, seq_len, num_experts).mean(dim=1)
    return num_experts * (assigned_fraction * mean_probs).sum(dim=-1).mean()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take in a forward of ``num_tokens``: ``ceil(factor * T * k / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def within_capacity(indices: Tensor, tokens_per_expert: Tensor, capacity: int) -> Tensor:
    """bool ``[T, k]``: which assignments an expert keeps when it takes at most ``capacity`` of them.

    Each expert keeps its first ``capacity`` assignments in token order (earlier positions of the flat
    batch first; a token never picks one expert twice), so the drops are deterministic and do not depend
    on the gates.
    """
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # assignments grouped by expert, token order within each expert
    first_of_expert = torch.cumsum(tokens_per_expert, dim=0) - tokens_per_expert
    rank_in_expert = torch.arange(len(flat), device=flat.device) - first_of_expert[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool).index_copy_(0, order, rank_in_expert < capacity)
    return keep.view(indices.shape)


def route(logits: Tensor, top_k: int, normalize_weights: bool = False, *, score: str = "softmax",
          balance: str = "aux", expert_bias: Tensor | None = None, capacity_factor: float | None = None,
          seq_len: int | None = None) -> Routing:
    """Top-k routing of ``logits [T, E]`` (computed in at least float32, for stable gates and losses).

    * ``score``: ``softmax`` or ``sigmoid`` scores; sigmoid gates are normalised over the top-k as in
      DeepSeek-V3, except with ``top_k=1``, where a normalised gate would be 1 and cut the router off
      the language-model loss.
    * ``balance`` picks the loss in ``load_balancing_loss``: ``seq_aux`` the per-sequence form over
      sequences of ``seq_len`` tokens (``None``: the whole batch is one sequence), any other method the
      batch-level Switch form (what the layer adds only for ``aux``; for ``aux_free`` and ``none`` it is
      a diagnostic).
    * ``expert_bias [E]`` shifts the selection only (``aux_free``).
    * ``capacity_factor``: each expert keeps at most ``ceil(factor * T * k / E)`` assignments
      (:func:`within_capacity`); the gates of the others are zero, so the residual stream carries those tokens.
    """
    if balance not in BALANCE_METHODS:
        raise ValueError(f"balance={balance!r} is not one of {BALANCE_METHODS}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    num_tokens, num_experts = logits.shape
    scores = router_scores(logits, score)
    indices = select_experts(scores, top_k, expert_bias)
    weights = gate_weights(scores, indices, normalize_weights or (score == "sigmoid" and top_k > 1))
    tokens_per_expert = count_assignments(indices, num_experts)

    dropped = torch.zeros_like(tokens_per_expert)
    if capacity_factor is not None:
        capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        keep = within_capacity(indices, tokens_per_expert, capacity)
        weights = weights * keep
        dropped = (tokens_per_expert - capacity).clamp(min=0)

    probs = scores if score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    if balance == "seq_aux":
        load_balancing_loss = sequence_balance_loss(probs, indices, seq_len or num_tokens)
    else:
        load_balancing_loss = switch_balance_loss(probs, tokens_per_expert, top_k)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    return Routing(indices, weights, tokens_per_expert, dropped, load_balancing_loss, z_loss)


def expert_bias_update(tokens_per_expert: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's auxiliary-loss-free step for a bias ``[E]``: ``rate * sign(mean count - count)``.

    Under-loaded experts gain ``rate``, over-loaded ones lose it; ``tokens_per_expert`` should be the
    optimizer step's counts over every micro-batch and rank, so all ranks take the same step.
    """
    counts = tokens_per_expert.to(torch.float32)
    return rate * torch.sign(counts.mean() - counts)


def expert_dtype(x: Tensor) -> torch.dtype:
    """The dtype :func:`expert_forward` computes in for rows like ``x``: bf16 on CUDA, else ``x``'s own."""
    return torch.bfloat16 if x.is_cuda else x.dtype


def expert_forward(x_sorted: Tensor, tokens_per_expert: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """``gelu(x @ w1[e]) @ w2[e]`` for each expert's contiguous slice of ``x_sorted [T*k, hidden]``.

    ``tokens_per_expert [E]`` gives the slice lengths (rows are sorted by expert); rows past their sum are
    padding (expert parallelism's fixed-size exchange), whose outputs the caller drops: unspecified on CUDA,
    zero elsewhere. On CUDA this is two ``torch._grouped_mm`` calls in bf16 whose group offsets stay on the
    device; elsewhere a loop over experts (which reads the counts on the host, harmless on CPU). Returns
    ``x_sorted``'s dtype.
    """
    if x_sorted.is_cuda:
        dtype = expert_dtype(x_sorted)
        offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        hidden = torch._grouped_mm(x_sorted.to(dtype), w1.to(dtype), offs=offsets)
        out = torch._grouped_mm(F.gelu(hidden), w2.to(dtype), offs=offsets)
        return out.to(x_sorted.dtype)
    sizes = tokens_per_expert.tolist()
    *chunks, padding = x_sorted.split([*sizes, x_sorted.shape[0] - sum(sizes)])
    # Empty chunks still pass through their expert so every expert weight is part of the graph (DDP).
    return torch.cat([*(F.gelu(chunk @ w1[e]) @ w2[e] for e, chunk in enumerate(chunks)), torch.zeros_like(padding)])


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
    # From the gather on, rows travel in the dtype the experts compute in (bf16 on CUDA, where expert_forward casts
    # to it first anyway): expert parallelism's all-to-alls and the copies around them move half the bytes of
    # float32, and nothing changes, since only permutations happen in that dtype (a token's k gradients are
    # summed by the gather's backward before the cast's).
    rows = x_flat[token_of_row].to(expert_dtype(x_flat))
    y_sorted = run_experts(rows, tokens_per_expert)
    # Back to (token, k) order by the inverse permutation: a copy, not an atomic scatter-add, so the
    # combine is cheap and deterministic; then each token's k outputs weighted by their gates.
    y = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted).view(*expert_weights.shape, -1)
    return (y.to(x_flat.dtype) * expert_weights.unsqueeze(-1)).sum(dim=1)


class SharedExperts(nn.Module):
    """``count`` always-on experts (DeepSeekMoE's shared experts) as one GELU MLP ``count`` times as wide:
    the sum of ``count`` experts of width ``ffn`` is exactly that."""

    def __init__(self, hidden: int, ffn: int, count: int):
        super().__init__()
        self.fc = nn.Linear(hidden, count * ffn, bias=False)
        self.proj = nn.Linear(count * ffn, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class MoELayer(nn.Module):
    """Router + ``num_experts`` GELU MLPs (``hidden -> ffn -> hidden``) + optional shared experts.

    ``forward(x [..., hidden])`` returns the combined expert outputs of ``x``'s shape. After a forward,
    ``tokens_per_expert`` and ``dropped_per_expert`` (int64 [E], on x's device) hold the counts and
    ``aux_loss`` the weighted sum of the balance and z losses to add to the training loss. With
    ``balance="aux_free"`` the layer holds the selection bias as the buffer ``expert_bias`` (so checkpoints
    keep it); :meth:`update_expert_bias` moves it once per optimizer step. Shared experts see every token
    and are not part of the counts.
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int,
                 load_balancing_weight: float = 0.01, z_loss_weight: float = 0.0,
                 normalize_weights: bool = False, init_std: float = 0.02, out_init_std: float | None = None, *,
                 score: str = "softmax", balance: str = "aux", capacity_factor: float | None = None,
                 bias_update_rate: float = 1e-3, shared_experts: int = 0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must lie in 1..num_experts={num_experts}")
        if shared_experts < 0:
            raise ValueError(f"shared_experts={shared_experts} must not be negative")
        self.num_experts, self.top_k = num_experts, top_k
        self.load_balancing_weight, self.z_loss_weight = load_balancing_weight, z_loss_weight
        self.settings = RouterSettings(top_k, normalize_weights, score, balance, capacity_factor, bias_update_rate)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        # Stacked expert weights: the layout torch._grouped_mm and megablocks' grouped GEMM consume.
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.shared = SharedExperts(hidden, ffn, shared_experts) if shared_experts else None
        nn.init.normal_(self.router.weight, std=init_std)
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w2, std=out_init_std if out_init_std is not None else init_std)
        # A None buffer is not in the state_dict: checkpoints of the other methods keep their keys.
        self.register_buffer("expert_bias", torch.zeros(num_experts) if balance == "aux_free" else None)
        self.tokens_per_expert: Tensor | None = None
        self.dropped_per_expert: Tensor | None = None
        self.aux_loss: Tensor | None = None

    @property
    def normalize_weights(self) -> bool:
        """Whether the gates are divided by their sum over the top-k."""
        return self.settings.normalize_weights

    def expert_parameters(self) -> list[nn.Parameter]:
        """The stacked routed-expert weights (what a token uses k/E of; shared experts are dense)."""
        return [self.w1, self.w2]

    def forward(self, x: Tensor) -> Tensor:
        x_flat = x.reshape(-1, x.shape[-1])
        s = self.settings
        routing = route(self.router(x_flat), s.top_k, s.normalize_weights, score=s.score, balance=s.balance,
                        expert_bias=self.expert_bias, capacity_factor=s.capacity_factor,
                        seq_len=x.shape[-2] if x.dim() >= 3 else None)
        self.tokens_per_expert, self.dropped_per_expert = routing.tokens_per_expert, routing.dropped_per_expert
        # aux_free and none train without the balance loss (it stays a diagnostic of route()).
        balance_weight = self.load_balancing_weight if s.balance in ("aux", "seq_aux") else 0.0
        self.aux_loss = balance_weight * routing.load_balancing_loss + self.z_loss_weight * routing.z_loss

        # Dropped assignments still pass through their expert (no host sync to size a smaller batch); their
        # zero gate removes them from the output and from every gradient, which is what dropping means.
        out = dispatch_combine(x_flat, routing.expert_indices, routing.expert_weights, routing.tokens_per_expert,
                               self.run_experts).to(x.dtype)
        if self.shared is not None:
            out = out + self.shared(x_flat)
        return out.reshape(x.shape)

    def run_experts(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        """Expert outputs for rows sorted by expert (what expert parallelism replaces with an exchange)."""
        return expert_forward(x_sorted, tokens_per_expert, self.w1, self.w2)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: Tensor) -> None:
        """One auxiliary-loss-free step from an optimizer step's counts ``[E]`` (no-op for other methods);
        on the device, no host sync."""
        if self.expert_bias is not None:
            self.expert_bias += expert_bias_update(tokens_per_expert, self.settings.bias_update_rate)

    def extra_repr(self) -> str:
        e, h, f = self.w1.shape
        s = self.settings
        variants = (f", score={s.score}, balance={s.balance}"
                    + (f", capacity_factor={s.capacity_factor}" if s.capacity_factor is not None else ""))
        return f"experts={e}, top_k={self.top_k}, hidden={h}, ffn={f}{variants}"
