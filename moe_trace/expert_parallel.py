"""Expert parallelism over the ranks of a ``torch.distributed`` process group (one process per GPU).

Each rank holds ``slots_per_rank`` expert slots of every MoE layer; a placement plan (``placement.planners``)
says which logical expert each slot hosts: global slot ``rank * slots_per_rank + j`` is local slot ``j`` of
``rank``. Without redundant slots and re-planning this is the even sharding (rank ``r`` holds experts
``[r * E/W, (r+1) * E/W)``); with them a hot expert has copies on several ranks (:mod:`moe_trace.expert_placement`
changes the plan during training). Routers, attention and embeddings are replicated and trained data parallel
(DDP all-reduces their gradients, not the experts').

In each MoE layer every rank routes its own tokens and all ranks gather the ``[ranks, experts]`` count table,
the one host read per layer that an uneven all-to-all forces. From it every rank computes the same dispatch
table (``placement.dispatch.routes``: an expert's tokens split among its copies by the simulator's rule),
sends each row to its slot with an uneven all-to-all (torch's functional collectives, with autograd), runs its
local slots and sends the outputs back.

That host read empties the GPU's queue once per layer and micro-batch and splits a compiled step into a graph
per layer. ``exchange="padded"`` removes it: each rank sends every other rank a buffer with room for all its rows
(``ranks x`` the traffic), with the per-slot counts exchanged on the device beside it, so the whole layer has
fixed shapes and compiles into the model's graph (:func:`padded_exchange`). With no global counts on the host it
splits an expert's rows among its copies by the ``even`` rule, each rank its own rows in equal runs, where
``counts`` water-fills (``balanced``): :data:`DISPATCH` names each exchange's rule.

Gradients: a slot receives the gradients of every rank's tokens it served, summed by the all-to-all's backward.
Data parallelism averages over ranks, so expert gradients are scaled by ``1/W`` to match (megablocks does the
same); copies of one expert then add their gradients (:func:`sync_replica_grads`), so every copy holds the
expert's whole gradient and, stepped by the same optimizer, stays identical. The result equals a
single-process step over the union of the ranks' batches. Counts: each rank's ``tokens_per_expert`` covers its
own tokens over all ``E`` logical experts; the recorder sums them over ranks once per flush block.

Router variants (:func:`moe_trace.moe.route`) run unchanged on each rank's tokens: a capacity limit applies to
a rank's own batch, as it does to each micro-batch of one process; the auxiliary-loss-free bias steps from
counts summed over ranks, so it stays the same everywhere; shared experts are dense (data parallel).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from moe_trace.moe import MoELayer, expert_forward
from placement.dispatch import routes, run_starts
from placement.planners import Plan


class ExpertParallelMoELayer(MoELayer):
    """An :class:`MoELayer` that holds only its rank's expert slots and exchanges tokens with the other ranks."""

    def __init__(self, layer: MoELayer, slot_expert: np.ndarray, group: dist.ProcessGroup | None = None,
                 dispatch: str = "balanced", exchange: str = "counts"):
        nn.Module.__init__(self)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if len(slot_expert) % world:
            raise ValueError(f"{len(slot_expert)} slots do not divide evenly over {world} ranks")
        self.num_experts, self.top_k, self.settings = layer.num_experts, layer.top_k, layer.settings
        self.load_balancing_weight, self.z_loss_weight = layer.load_balancing_weight, layer.z_loss_weight
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
        self.group, self.world_size, self.rank, self.dispatch = group, world, rank, dispatch
        self.slots_per_rank = len(slot_expert) // world
        self.exchange = exchange
        # Each expert's copies (global slots, in slot order, the last repeated to the width of the ranks) and how
        # many it has, on the device: the padded exchange addresses rows with them (set_plan fills them).
        self.register_buffer("expert_copies", torch.zeros((layer.num_experts, world), dtype=torch.int64,
                                                          device=layer.w1.device), persistent=False)
        self.register_buffer("expert_replicas", torch.ones(layer.num_experts, dtype=torch.int64,
                                                           device=layer.w1.device), persistent=False)
        # Router, shared experts and selection bias are replicated: every rank routes its own tokens alike.
        self.router, self.shared = layer.router, layer.shared
        self.register_buffer("expert_bias", layer.expert_bias)
        self.set_plan(slot_expert)
        # This rank's slots of the full layer's weights: any world size starts from the same model. Empty slots
        # (expert -1) start at zero; a re-plan fills them.
        hosted = torch.as_tensor(self.local_experts)
        self.w1 = nn.Parameter(_rows(layer.w1.detach(), hosted))
        self.w2 = nn.Parameter(_rows(layer.w2.detach(), hosted))
        for weight in (self.w1, self.w2):
            weight.register_hook(lambda grad: grad / world)
        self.tokens_per_expert = self.dropped_per_expert = self.aux_loss = None

    def set_plan(self, slot_expert: np.ndarray) -> None:
        """Host the experts of ``slot_expert[ranks * slots_per_rank]`` (the weights are moved separately)."""
        slot_expert = np.asarray(slot_expert, dtype=np.int64)
        replicas = np.bincount(slot_expert[slot_expert >= 0], minlength=self.num_experts)
        self.plan = Plan(slot_expert[None], replicas[None], self.world_size)
        local = slice(self.rank * self.slots_per_rank, (self.rank + 1) * self.slots_per_rank)
        self.local_experts = slot_expert[local]
        # The first copy of each expert (over all ranks) stands for it where it must count once (gradient norm).
        _, first_slot = np.unique(slot_expert, return_index=True)
        primary = np.zeros(len(slot_expert), dtype=bool)
        primary[first_slot] = True
        self.primary = torch.as_tensor(primary[local] & (self.local_experts >= 0))
        if self.exchange == "padded":
            self.expert_copies.copy_(torch.from_numpy(copies_of_experts(slot_expert, replicas, self.world_size)))
            self.expert_replicas.copy_(torch.from_numpy(replicas))

    def run_experts(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        if self.exchange == "padded":
            return padded_exchange(self, x_sorted, tokens_per_expert)
        return self._run_experts_sized_on_host(x_sorted, tokens_per_expert)

    # The exchange reads the count table on the host to size the all-to-all: under torch.compile it runs eager
    # between two compiled graphs, one break per layer, while routing, attention and the rest compile.
    @torch.compiler.disable
    def _run_experts_sized_on_host(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        world, slots = self.world_size, self.slots_per_rank
        gathered = [torch.empty_like(tokens_per_expert) for _ in range(world)]
        dist.all_gather(gathered, tokens_per_expert, group=self.group)
        counts = torch.stack(gathered).cpu().numpy()  # [rank, expert]
        # rows[s, slot]: rows rank s sends to each global slot, the same table on every rank.
        rows = routes(counts, self.plan, self.dispatch)
        sent = rows[self.rank]
        received = rows[:, self.rank * slots: (self.rank + 1) * slots]  # [source rank, local slot]
        send_splits = sent.reshape(world, slots).sum(axis=1).tolist()
        recv_splits = received.sum(axis=1).tolist()

        # x_sorted is grouped by expert; send its rows in the order of their destination slots.
        send_order = torch.from_numpy(_send_order(sent, self.plan.slot_expert[0], counts[self.rank]))
        send_order = send_order.to(x_sorted.device, non_blocking=True)
        group = self.group or dist.group.WORLD
        x_received = funcol.all_to_all_single_autograd(x_sorted[send_order], recv_splits, send_splits, group)

        # Rows arrive grouped by source rank, then by local slot; run the slots on rows grouped by slot.
        local_ids = torch.arange(slots, device=x_sorted.device).repeat(world)
        slot_of_row = torch.repeat_interleave(local_ids, torch.from_numpy(received.ravel()).to(x_sorted.device),
                                              output_size=sum(recv_splits))
        order = slot_of_row.argsort(stable=True)
        per_slot = torch.from_numpy(received.sum(axis=0)).to(x_sorted.device)
        y = expert_forward(x_received[order], per_slot, self.w1, self.w2)
        y_received = torch.empty_like(y).index_copy(0, order, y)
        y_sent = funcol.all_to_all_single_autograd(y_received, send_splits, recv_splits, group)
        return torch.empty_like(y_sent).index_copy(0, send_order, y_sent)

    def extra_repr(self) -> str:
        return (f"slots={self.local_experts.tolist()} of {self.num_experts} experts, top_k={self.top_k}, "
                f"hidden={self.w1.shape[1]}, ffn={self.w1.shape[2]}")


EXCHANGES = ("counts", "padded")
# The dispatch rule (placement.dispatch) each exchange follows by default: counts water-fills from the global
# counts it reads on the host; padded, which has no such read, gives each copy an equal run of every rank's rows.
DISPATCH = {"counts": "balanced", "padded": "even"}


def choose_exchange(requested: str, world_size: int, compiled: bool) -> str:
    """``requested``, or for ``auto`` the exchange measured faster where it applies: ``padded`` when compiled on 2 to
    4 ranks (2 H200s: strong scaling 1.47x against 0.94x with ``counts``; 4 H200s in one call: weak scaling 70.1 %
    against 62.1 %; with one spare slot per GPU, ``counts`` made the placed 128k step 1.79x the padded static one;
    README), else ``counts`` -- eager, where the host read costs little, and past 4 ranks, where padding would send
    8x the rows unmeasured."""
    if requested != "auto":
        return requested
    return "padded" if compiled and 2 <= world_size <= 4 else "counts"


def padded_exchange(layer: ExpertParallelMoELayer, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """One layer's token exchange with no host read: fixed-size buffers, positions computed on the device.

    A rank's ``N`` rows (``x_sorted``, grouped by expert) go to the slots hosting their experts, an expert's rows
    split among its copies in equal runs (:func:`send_layout`). Rank ``d``'s share of the send buffer
    ``[ranks * N, hidden]`` is ``[d * N, (d + 1) * N)``: room for all ``N`` rows, whichever way the router split
    them, filled from the front slot by slot, the rest zero. The per-slot counts ``[ranks, slots]`` travel the
    same way, so each receiver knows which of its rows are real. Received rows are regrouped by local slot for the
    grouped GEMM (padding last), and the outputs go back the same way, padding zeroed. The all-to-alls are
    torch's functional collectives, which torch.compile traces.
    """
    world, slots, rows, device = layer.world_size, layer.slots_per_rank, x_sorted.shape[0], x_sorted.device
    group = layer.group or dist.group.WORLD
    send_position, per_slot = send_layout(tokens_per_expert, layer.expert_copies, layer.expert_replicas, slots, rows)
    send = x_sorted.new_zeros((world * rows, x_sorted.shape[1])).index_copy(0, send_position, x_sorted)
    received = funcol.all_to_all_single_autograd(send, None, None, group)
    per_source_slot = funcol.all_to_all_single(per_slot, None, None, group).view(world, slots)

    # Received rows are source-major, each source's real rows slot by slot, then its padding: regroup them by
    # local slot (sources in order within a slot), padding after every real row.
    index = torch.arange(rows, device=device).expand(world, rows).contiguous()
    ends = per_source_slot.cumsum(dim=1)
    local_slot = torch.searchsorted(ends, index, right=True)  # == slots past a source's real rows
    real = local_slot < slots
    local_slot = local_slot.clamp(max=slots - 1)
    per_local_slot = per_source_slot.sum(dim=0)
    earlier_sources = (per_source_slot.cumsum(dim=0) - per_source_slot).gather(1, local_slot)
    within_slot = index - (ends - per_source_slot).gather(1, local_slot)
    grouped_position = (per_local_slot.cumsum(0) - per_local_slot)[local_slot] + earlier_sources + within_slot
    padding_position = per_local_slot.sum() + (~real).view(-1).cumsum(0).view(world, rows) - 1
    position = torch.where(real, grouped_position, padding_position).view(-1)
    grouped = torch.empty_like(received).index_copy(0, position, received)
    y = expert_forward(grouped, per_local_slot, layer.w1, layer.w2)
    # where, not a product: the padding's outputs (unspecified on CUDA) and their gradients are dropped.
    y_received = torch.where(real.view(-1, 1), y[position], 0)
    return funcol.all_to_all_single_autograd(y_received, None, None, group)[send_position]


def copies_of_experts(slot_expert: np.ndarray, replicas: np.ndarray, world_size: int) -> np.ndarray:
    """``[experts, ranks]``: each expert's global slots in slot order, the last repeated to the width (what
    :func:`send_layout` takes); ``replicas[e]``, expert ``e``'s copies in ``slot_expert``, must be 1 to
    ``world_size``."""
    hosted = np.flatnonzero(slot_expert >= 0)
    if not 1 <= replicas.min() <= replicas.max() <= world_size:
        raise ValueError(f"every expert needs 1 to {world_size} copies: {replicas.tolist()}")
    by_expert = hosted[np.argsort(slot_expert[hosted], kind="stable")]  # slots grouped by expert, in slot order
    copy = np.minimum(np.arange(world_size), replicas[:, None] - 1)
    return by_expert[(np.cumsum(replicas) - replicas)[:, None] + copy]


def send_layout(tokens_per_expert: Tensor, expert_copies: Tensor, expert_replicas: Tensor, slots_per_rank: int,
                rows: int) -> tuple[Tensor, Tensor]:
    """Where the padded exchange sends each of a rank's rows (grouped by expert, ``tokens_per_expert[e]`` of
    expert ``e``), and how many rows each global slot gets.

    ``expert_copies[experts, ranks]`` holds each expert's global slots (the last repeated past its
    ``expert_replicas``). Copy ``j`` of an expert with ``n`` rows here and ``r`` copies takes its rows
    ``[ceil(j n / r), ceil((j + 1) n / r))``; row positions index a send buffer of ``ranks`` shares of ``rows``
    (the rank's rows, ``tokens_per_expert.sum()``, given by the caller so that nothing is read on the host), each
    share filled slot by slot from its front.
    """
    n, copies, device = tokens_per_expert, expert_replicas, tokens_per_expert.device
    experts, world = expert_copies.shape
    # Where copy j begins, for j = 0..ranks: copies past r begin at n and take nothing.
    run_start = (torch.arange(world + 1, device=device) * n[:, None] + copies[:, None] - 1) // copies[:, None]
    run_start = torch.minimum(run_start, n[:, None])
    per_slot = n.new_zeros(world * slots_per_rank).index_add(0, expert_copies.view(-1),
                                                             (run_start[:, 1:] - run_start[:, :-1]).view(-1))
    slot_start = (per_slot.view(world, -1).cumsum(dim=1) - per_slot.view(world, -1)).view(-1)
    expert_of_row = torch.repeat_interleave(torch.arange(experts, device=device), n, output_size=rows)
    within_expert = torch.arange(rows, device=device) - (n.cumsum(0) - n)[expert_of_row]
    copy = within_expert * copies[expert_of_row] // n[expert_of_row]
    slot = expert_copies[expert_of_row, copy]
    within_slot = within_expert - run_start[expert_of_row, copy]
    share = torch.div(slot, slots_per_rank, rounding_mode="floor") * rows
    return share + slot_start[slot] + within_slot, per_slot


def _rows(weights: Tensor, experts: Tensor) -> Tensor:
    """``weights[experts]`` with zeros where ``experts`` is -1 (an empty slot), on the weights' device."""
    experts = experts.to(weights.device)
    return torch.where((experts >= 0).view(-1, *[1] * (weights.dim() - 1)), weights[experts.clamp(min=0)],
                       0).clone()


def _send_order(sent: np.ndarray, slot_expert: np.ndarray, expert_rows: np.ndarray) -> np.ndarray:
    """Indices into rows grouped by expert (``expert_rows[e]`` of them for expert ``e``), listing them slot by
    slot: slot ``i`` takes ``sent[i]`` rows of its expert, the expert's slots taking consecutive runs in slot order."""
    expert_start = np.cumsum(expert_rows) - expert_rows
    start = expert_start[np.maximum(slot_expert, 0)] + run_starts(sent, slot_expert)
    position = np.cumsum(sent) - sent  # where slot i's rows begin in the send buffer
    return np.repeat(start - position, sent) + np.arange(sent.sum())


def expert_layers(model: nn.Module) -> list[ExpertParallelMoELayer]:
    return [m for m in model.modules() if isinstance(m, ExpertParallelMoELayer)]


def shard_experts(model: nn.Module, slot_expert: np.ndarray | None = None, group: dist.ProcessGroup | None = None,
                  dispatch: str = "balanced", exchange: str = "counts") -> list[str]:
    """Replace every :class:`MoELayer` of ``model`` in place by its expert-parallel shard.

    ``slot_expert[moe_layers, slots]`` is the placement to start from (default: the even sharding, no spare
    slots). ``exchange``: ``counts`` (sized on the host) or ``padded`` (no host read; see :data:`DISPATCH`).
    Returns the names of the expert parameters, for ``DistributedDataParallel`` to leave alone.
    """
    names, index = [], 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is MoELayer:
                row = np.arange(child.num_experts) if slot_expert is None else slot_expert[index]
                setattr(parent, child_name, ExpertParallelMoELayer(child, row, group, dispatch, exchange))
                prefix = f"{parent_name}.{child_name}" if parent_name else child_name
                names += [f"{prefix}.w1", f"{prefix}.w2"]
                index += 1
    return names


def data_parallel(model: nn.Module, expert_names: list[str], **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """DDP over the dense parameters only; the experts' gradients stay on their rank."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def compile_data_parallel(ddp_model: nn.parallel.DistributedDataParallel, **compile_kwargs) -> Callable:
    """``torch.compile`` of a DDP model as one graph, its gradients all-reduced after the backward.

    Dynamo's default splits the graph at every DDP gradient bucket so that all-reduces overlap the backward: ~20
    pieces a micro-batch for gpt-125m-moe at 25 MB buckets. On 2 H200s the host launching them left the GPUs
    idle, and one graph took strong scaling from 1.47x to 1.73x (benchmarks/NOTES.md, session 7); the dense
    gradients' all-reduce it no longer overlaps is a few ms over NVLink. The setting is read when a frame is
    compiled, that is at the calls, so each call holds it.
    """
    compiled = torch.compile(ddp_model, **compile_kwargs)

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(*args, **kwargs)

    return forward


@torch.no_grad()
def sync_replica_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Give every copy of a replicated expert the sum of all its copies' gradients (one all-reduce for the
    whole model, only over the replicated experts; nothing when no expert has two copies)."""
    pieces, layouts = [], []
    for layer in expert_layers(model):
        replicated = np.flatnonzero(layer.plan.replicas[0] > 1)
        if not len(replicated):
            continue
        local = np.flatnonzero(np.isin(layer.local_experts, replicated))
        slots = torch.as_tensor(local, device=layer.w1.device)
        target = torch.as_tensor(np.searchsorted(replicated, layer.local_experts[local]), device=layer.w1.device)
        for weight in (layer.w1, layer.w2):
            summed = weight.grad.new_zeros((len(replicated), *weight.shape[1:]))
            summed.index_add_(0, target, weight.grad[slots])
            pieces.append(summed.flatten())
            layouts.append((weight, slots, target, summed.shape))
    if not pieces:
        return
    flat = torch.cat(pieces)
    dist.all_reduce(flat, group=group)
    for (weight, slots, target, shape), summed in zip(layouts, flat.split([p.numel() for p in pieces]), strict=True):
        weight.grad[slots] = summed.view(shape)[target]


def grad_norm(model: nn.Module, group: dist.ProcessGroup | None = None) -> Tensor:
    """The norm of the whole (sharded) model's gradient: dense norm plus each expert once (its first copy),
    summed over ranks. Call it after :func:`sync_replica_grads`; :func:`moe_trace.optim.clip_gradients` clips by it."""
    layers = expert_layers(model)
    experts = {id(p) for layer in layers for p in (layer.w1, layer.w2)}
    params = [p for p in model.parameters() if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in experts]
    local = [w.grad[layer.primary.to(w.grad.device)] for layer in layers for w in (layer.w1, layer.w2)
             if w.grad is not None]
    device = params[0].grad.device
    squares = torch.stack([torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)
                           for grads in (dense, local)]).square()
    dist.all_reduce(squares[1:], group=group)
    return squares.sum().sqrt()
