"""Dispatcher rules: how one step's tokens reach the GPUs of a plan.

An expert hosted on one GPU sends all its tokens there. An expert with replicas on several GPUs splits them
by one of two rules, applied per step and layer:

* ``even`` -- equal shares per replica (what EPLB's random choice among replicas gives on average);
* ``balanced`` -- least-loaded replica first (water-filling): starting from the even split, replicated
  experts, heaviest first, re-pour their tokens into their GPUs from the least loaded up, so those GPUs end
  as level as the tokens allow; two such passes.
  It needs this step's per-expert counts before the all-to-all, which dropless MoE exchanges anyway to
  size its buffers. This is the default: replicas can then absorb per-step noise, not only mean skew.

A token counted for an expert is one unit of work on the GPU it is sent to (``counts`` already count a
token once per chosen expert). Token shares are kept fractional: these are load estimates. Expert-parallel
training sends whole tokens: :func:`routes` rounds the same rule's shares for one step and layer and says which
rank sends how many rows to which slot.
"""

from __future__ import annotations

import numpy as np

from placement.planners import PlacementError, Plan

RULES = ("balanced", "even")
_FULL = 1e18  # load given to padding GPUs so that water-filling never pours into them


def gpu_tokens(counts: np.ndarray, plan: Plan, rule: str = "balanced") -> np.ndarray:
    """Tokens each GPU processes: ``counts[steps, layers, experts]`` -> float64 ``[steps, layers, gpus]``."""
    counts = _checked(counts, plan, rule)
    tokens = _even(counts, plan)
    return tokens if rule == "even" else _balanced(counts, plan, tokens)


def expert_tokens(counts: np.ndarray, plan: Plan, rule: str = "balanced") -> np.ndarray:
    """Tokens of each expert each GPU processes: float64 ``[steps, layers, gpus, experts]``, whose sum over
    experts is :func:`gpu_tokens` (the same rule, expert by expert)."""
    counts = _checked(counts, plan, rule)
    split = counts[:, :, None, :] * (plan.slot_counts() / plan.replicas[:, None, :])
    if rule == "balanced":
        _balanced(counts, plan, split.sum(axis=-1), split=split)
    return split


def routes(counts_by_rank: np.ndarray, plan: Plan, rule: str = "balanced") -> np.ndarray:
    """Whole tokens for one layer and step of expert-parallel training: int64 ``[ranks, slots]``, the rows
    each rank sends to each physical slot of the one-layer ``plan`` (one rank per GPU).

    ``counts_by_rank[ranks, experts]`` are the tokens each rank routed to each expert. An expert's tokens over
    all ranks are split among its GPUs by :func:`expert_tokens`, rounded to whole tokens by largest
    remainder, and given to the first slot of that expert on each GPU; then the ranks' rows, in rank order,
    are cut into consecutive runs for those slots in slot order. Every rank computes the same table from the
    same counts, so senders and receivers agree on every split size without exchanging them.
    """
    counts_by_rank = np.asarray(counts_by_rank, dtype=np.int64)
    ranks, experts = counts_by_rank.shape
    if plan.replicas.shape != (1, experts) or plan.gpus != ranks:
        raise PlacementError(f"routes needs a one-layer plan over {ranks} GPUs for {experts} experts")
    total = counts_by_rank.sum(axis=0)
    share = expert_tokens(total[None, None], plan, rule)[0, 0]  # [gpus, experts]
    hosts = plan.hosts()[0]
    whole = np.floor(share).astype(np.int64)
    remainder = np.where(hosts, share - whole, -1.0)  # the missing tokens go to hosts only
    missing = total - whole.sum(axis=0)
    rank_of = np.argsort(np.argsort(-remainder, axis=0, kind="stable"), axis=0, kind="stable")
    whole += rank_of < missing
    # Per slot: its GPU's tokens of its expert if it is that expert's first slot on the GPU, else none.
    slot_expert = plan.slot_expert[0]
    gpu = np.arange(len(slot_expert)) // plan.slots_per_gpu
    hosted = slot_expert >= 0
    first_on_gpu = hosted & ~_seen_before(gpu * (experts + 1) + slot_expert)
    per_slot = np.where(first_on_gpu, whole[gpu, np.maximum(slot_expert, 0)], 0)
    # Consecutive runs: slot s takes rows [slot_start, slot_start + per_slot) of its expert's rows over all ranks.
    slot_start = run_starts(per_slot, slot_expert)
    slot_end = slot_start + per_slot
    rank_end = np.cumsum(counts_by_rank, axis=0)
    rank_start = rank_end - counts_by_rank
    expert = np.maximum(slot_expert, 0)
    overlap = (np.minimum(rank_end[:, expert], slot_end) - np.maximum(rank_start[:, expert], slot_start))
    return np.where(hosted, np.maximum(overlap, 0), 0)


def run_starts(rows: np.ndarray, slot_expert: np.ndarray) -> np.ndarray:
    """Where each slot's run of ``rows[slot]`` starts among its expert's rows, when every expert's slots take
    consecutive runs in slot order (the layout :func:`routes` cuts)."""
    by_expert = np.lexsort((np.arange(len(slot_expert)), slot_expert))  # slots grouped by expert, in slot order
    ends = np.cumsum(rows[by_expert])
    starts = ends - rows[by_expert]
    group_first = np.searchsorted(slot_expert[by_expert], slot_expert[by_expert])
    result = np.empty_like(rows)
    result[by_expert] = starts - starts[group_first]
    return result


def _seen_before(keys: np.ndarray) -> np.ndarray:
    """bool per position: the same key occurs at an earlier position."""
    _, first = np.unique(keys, return_index=True)
    seen = np.ones(len(keys), dtype=bool)
    seen[first] = False
    return seen


def _checked(counts: np.ndarray, plan: Plan, rule: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 3 or counts.shape[1:] != plan.replicas.shape:
        raise PlacementError(f"counts {counts.shape} do not match the plan's [layers, experts] "
                             f"{plan.replicas.shape}")
    if (plan.replicas == 0).any():
        raise PlacementError("the plan leaves an expert without a replica")
    if rule not in RULES:
        raise PlacementError(f"unknown dispatch rule {rule!r}; choose from {', '.join(RULES)}")
    return counts


def imbalance(tokens: np.ndarray) -> np.ndarray:
    """Per step and layer: the busiest GPU's tokens over the mean over GPUs (1.0 when perfectly balanced)."""
    mean = tokens.mean(axis=-1)
    return np.divide(tokens.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def _even(counts: np.ndarray, plan: Plan) -> np.ndarray:
    """Each slot takes ``1 / replicas`` of its expert's tokens; a GPU sums its slots.

    A gather over slots rather than a matmul over experts: plans are sparse, and small BLAS calls
    slow down badly when other processes share the cores.
    """
    rows = np.arange(plan.slot_expert.shape[0])[:, None]
    hosted = np.maximum(plan.slot_expert, 0)
    share = np.where(plan.slot_expert >= 0, 1.0 / plan.replicas[rows, hosted], 0.0)  # [layers, slots]
    per_slot = counts[:, rows, hosted] * share
    return per_slot.reshape(*per_slot.shape[:2], plan.gpus, -1).sum(axis=-1)


def _balanced(counts: np.ndarray, plan: Plan, even: np.ndarray, passes: int = 2,
              split: np.ndarray | None = None) -> np.ndarray:
    """Start from the even split, then re-pour each replicated expert's tokens (heaviest first) by water-filling.

    ``split[steps, layers, gpus, experts]``, when given (holding the even split), receives every re-poured
    expert's final shares.

    Two passes over the replicated experts. Each re-pour minimises the busiest of that expert's GPUs with
    every other share fixed and leaves the other GPUs alone, so no step ends more imbalanced than under the
    even split. The loop works steps-last (a GPU's tokens over the steps are one contiguous row), so each
    re-pour is a few whole-array operations over every step at once.
    """
    slot_counts = plan.slot_counts()  # [layers, gpus, experts]
    hosts = slot_counts > 0
    hosting_gpus = hosts.sum(axis=1)
    layers, gpus, _ = hosts.shape

    # Replicated experts per layer, heaviest (over these steps) first, padded to a common count K.
    replicated = hosting_gpus > 1
    n_replicated = replicated.sum(axis=1)
    if n_replicated.max(initial=0) == 0:
        return even
    heaviness = np.where(replicated, counts.sum(axis=0), -1.0)
    order = np.argsort(-heaviness, axis=1, kind="stable")[:, : n_replicated.max()]  # [layers, K]
    valid = np.arange(order.shape[1])[None, :] < n_replicated[:, None]
    # Their GPUs, padded with the padding column: [layers, K, most replicas].
    expert_hosts = np.take_along_axis(hosts, order[:, None, :], axis=2).transpose(0, 2, 1)  # [layers, K, gpus]
    gpu_ids = np.sort(np.where(expert_hosts, np.arange(gpus), gpus), axis=2)[:, :, : int(hosting_gpus.max())]
    width = (gpu_ids < gpus).sum(axis=2).max(axis=0)  # [K]: GPUs the k-th expert spans, at most over layers
    # The even split's share of an expert on each of its GPUs (slots there / replicas); 0 on padding.
    rows = np.arange(layers)[:, None]
    padded_counts = np.concatenate([slot_counts, np.zeros((layers, 1, slot_counts.shape[2]), np.int64)], axis=1)
    even_fraction = (padded_counts[rows[..., None], gpu_ids, order[..., None]]
                     / plan.replicas[rows, order][..., None])  # [layers, K, width]

    # Steps last: row `layer * (gpus + 1) + gpu` of `tokens` holds that GPU's tokens over the steps (gpu == gpus:
    # padding), and `shares[layer, k, j]` the k-th replicated expert's tokens on its j-th GPU.
    tokens = np.concatenate([even, np.zeros((*even.shape[:2], 1))], axis=2).transpose(1, 2, 0).reshape(-1, len(even))
    poured = (counts[:, rows, order] * valid).transpose(1, 2, 0)  # [layers, K, steps]
    shares = poured[:, :, None, :] * even_fraction[..., None]  # [layers, K, width, steps]
    gpu_rows = [rows * (gpus + 1) + gpu_ids[:, k, :w] for k, w in enumerate(width)]  # [layers, w] per k
    padding = [(gpu_ids[:, k, :w] == gpus)[..., None] for k, w in enumerate(width)]
    for _ in range(passes):
        for k, w in enumerate(width):
            level = np.where(padding[k], _FULL, tokens[gpu_rows[k]] - shares[:, k, :w])
            shares[:, k, :w] = water_fill(level, poured[:, k], axis=1)
            tokens[gpu_rows[k]] = level + shares[:, k, :w]
    if split is not None:
        for k, w in enumerate(width):
            layer, j = np.nonzero((gpu_ids[:, k, :w] < gpus) & valid[:, k, None])
            split[:, layer, gpu_ids[layer, k, j], order[layer, k]] = shares[layer, k, j].T
    return np.ascontiguousarray(tokens.reshape(layers, gpus + 1, -1)[:, :gpus].transpose(2, 0, 1))


def water_fill(level: np.ndarray, amount: np.ndarray, axis: int = -1) -> np.ndarray:
    """Split ``amount`` over bins at ``level`` (bins along ``axis``) to raise the lowest bins to a common level.

    Returns the shares, shaped as ``level`` (non-negative, summing to ``amount`` over the bins). The final level
    ``lam`` is ``(amount + sum of the k lowest levels) / k`` for the largest ``k`` whose ``k``-th lowest level
    lies below it.
    """
    lowest_first = _sort_short_axis(np.moveaxis(level, axis, 0))
    k = np.arange(1, len(lowest_first) + 1).reshape(-1, *[1] * amount.ndim)
    candidate = (amount + np.cumsum(lowest_first, axis=0)) / k
    n_filled = (candidate > lowest_first).sum(axis=0)  # lam = candidate[max(n_filled, 1) - 1]
    lam = candidate[0]
    for j in range(1, len(candidate)):
        lam = np.where(n_filled > j, candidate[j], lam)
    return np.maximum(0.0, np.expand_dims(lam, axis) - level)


def _sort_short_axis(x: np.ndarray) -> np.ndarray:
    """``np.sort(x, axis=0)``; for a short axis 0 (a few bins) by odd-even transposition, whose whole-array
    min/max beat ``np.sort`` over many tiny slices by far (values only move, so the result is the same)."""
    n = len(x)
    if n > 4:
        return np.sort(x, axis=0)
    x = x.copy()
    for r in range(n):
        lo, hi = x[r % 2: n - 1: 2], x[r % 2 + 1: n: 2]
        lo[...], hi[...] = np.minimum(lo, hi), np.maximum(lo, hi)
    return x
