"""Expert parallelism over the ranks of a ``torch.distributed`` process group (one process per GPU).

Rank ``r`` of ``W`` holds experts ``[r * E/W, (r+1) * E/W)`` of every MoE layer; routers, attention and
embeddings are replicated and trained data parallel (DDP all-reduces their gradients, not the experts').
In each MoE layer every rank routes its own tokens, sends each row to the rank holding its expert with
``all_to_all_single`` (autograd through ``torch.distributed.nn.functional``), runs its local experts,
and sends the outputs back. The split sizes must be on the host, so each layer reads one small count
table from the device: the one sync per layer that an uneven all-to-all forces.

Gradients: a rank's expert receives the gradients of every rank's tokens, summed by the all-to-all's
backward. Data parallelism averages over ranks, so expert gradients are scaled by ``1/W`` to match
(megablocks does the same); the result equals a single-process step over the union of the ranks' batches.
Counts: each rank's ``tokens_per_expert`` covers its own tokens over all ``E`` experts; the recorder sums
them over ranks once per flush block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import Tensor, nn

from moe_trace.moe import MoELayer, expert_forward


class ExpertParallelMoELayer(MoELayer):
    """An :class:`MoELayer` that holds only its rank's share of the experts and exchanges tokens."""

    def __init__(self, layer: MoELayer, group: dist.ProcessGroup | None = None):
        nn.Module.__init__(self)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if layer.num_experts % world:
            raise ValueError(f"{layer.num_experts} experts do not divide evenly over {world} ranks")
        self.num_experts, self.top_k, self.normalize_weights = layer.num_experts, layer.top_k, layer.normalize_weights
        self.load_balancing_weight, self.z_loss_weight = layer.load_balancing_weight, layer.z_loss_weight
        self.group, self.world_size = group, world
        self.local_experts = layer.num_experts // world
        self.first_expert = rank * self.local_experts
        self.router = layer.router
        # This rank's slice of the full layer's weights: any world size starts from the same model.
        local = slice(self.first_expert, self.first_expert + self.local_experts)
        self.w1 = nn.Parameter(layer.w1.detach()[local].clone())
        self.w2 = nn.Parameter(layer.w2.detach()[local].clone())
        for weight in (self.w1, self.w2):
            weight.register_hook(lambda grad: grad / world)
        self.tokens_per_expert = self.aux_loss = None

    def run_experts(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> Tensor:
        world, local = self.world_size, self.local_experts
        # received[s, e]: rows that rank s sends to local expert e.
        received = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(received, tokens_per_expert, group=self.group)
        received = received.view(world, local)
        host = torch.stack([tokens_per_expert.view(world, local).sum(1), received.sum(1)]).tolist()
        send_splits, recv_splits = host
        x_received = _all_to_all(x_sorted, recv_splits, send_splits, self.group)

        # Rows arrive grouped by source rank, then by expert; run the experts on rows grouped by expert.
        local_ids = torch.arange(local, device=x_sorted.device).repeat(world)
        expert_of_row = torch.repeat_interleave(local_ids, received.flatten(), output_size=sum(recv_splits))
        order = expert_of_row.argsort(stable=True)
        y = expert_forward(x_received[order], received.sum(0), self.w1, self.w2)
        y_received = torch.empty_like(y).index_copy(0, order, y)
        return _all_to_all(y_received, send_splits, recv_splits, self.group)

    def extra_repr(self) -> str:
        return (f"experts={self.first_expert}..{self.first_expert + self.local_experts - 1} of {self.num_experts}, "
                f"top_k={self.top_k}, hidden={self.w1.shape[1]}, ffn={self.w1.shape[2]}")


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group) -> Tensor:
    output = x.new_empty((sum(output_splits), *x.shape[1:]))
    return dist_autograd.all_to_all_single(output, x.contiguous(), output_splits, input_splits,
                                           group=group or dist.group.WORLD)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Replace every :class:`MoELayer` of ``model`` in place by its expert-parallel shard.

    Returns the names of the expert parameters, for ``DistributedDataParallel`` to leave alone.
    """
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is MoELayer:
                setattr(parent, child_name, ExpertParallelMoELayer(child, group))
                prefix = f"{parent_name}.{child_name}" if parent_name else child_name
                names += [f"{prefix}.w1", f"{prefix}.w2"]
    return names


def data_parallel(model: nn.Module, expert_names: list[str], **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """DDP over the dense parameters only; the experts' gradients stay on their rank."""
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip by the norm of the whole (sharded) model's gradient: dense norm plus every rank's experts."""
    experts = {id(p) for layer in model.modules() if isinstance(layer, ExpertParallelMoELayer)
               for p in (layer.w1, layer.w2)}
    params = [p for p in model.parameters() if p.grad is not None]
    dense = [p.grad for p in params if id(p) not in experts]
    local = [p.grad for p in params if id(p) in experts]
    device = params[0].grad.device
    squares = torch.stack([torch.nn.utils.get_total_norm(grads).to(device) if grads else torch.zeros((), device=device)
                           for grads in (dense, local)]).square()
    dist.all_reduce(squares[1:], group=group)
    total = squares.sum().sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
