"""Expert placement that acts: a policy of :mod:`placement.policies` run online inside expert-parallel training.

The pieces, each small:

* the plan in force (``placement.planners.Plan``: per MoE layer, the logical expert of every slot) lives in
  each :class:`~moe_trace.expert_parallel.ExpertParallelMoELayer`, which dispatches tokens by it;
* :class:`PlacementRuntime` asks the policy, at the steps the policy checks, for a new plan, from the global
  counts the recorder already holds (one sync per check, none in between). The policy sees exactly the steps
  before the check, as in the simulator, so it takes the same decisions (``placement.policies.online_schedule``
  is the simulator's own schedule made this way);
* :func:`migrate` moves expert weights and their optimizer state (AdamW's ``exp_avg``, ``exp_avg_sq``;
  ``step`` is one per tensor and the same on every rank) to their new slots with one all-to-all per layer;
* every plan in force is written to ``placement.parquet`` beside the trace (``moe_trace.trace.write_placement``),
  crash-safely; checkpoints hold the plan and the policy's memory, and ``--resume`` rebuilds the policy's
  history from the trace, which holds every step before the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moe_trace import trace
from moe_trace.errors import UsageError
from moe_trace.expert_parallel import ExpertParallelMoELayer
from placement import policies
from placement.cost import CostModel
from placement.planners import Plan
from placement.policies import Setting

# Optimizers whose steps keep an expert's copies identical and whose state is per element (moe_trace.optim):
# adamw_bf16 rounds stochastically (each rank differently), adamw8bit keeps its moments in quantized blocks.
MOVABLE_OPTIMIZERS = ("adamw",)


def check_request(policy: str, redundant: int, replan_every: int | None, world_size: int, num_experts: int,
                  record: bool, optimizer: str = "adamw", exchange: str = "counts") -> None:
    """Refuse placements that cannot run, with what to do instead (UsageError: one line, exit status 2)."""
    if policy not in policies.ONLINE:
        raise UsageError(f"--placement {policy!r}: training can follow {', '.join(policies.ONLINE)}")
    if world_size == 1 and (policy != "static" or redundant):
        raise UsageError(f"--placement {policy} and --redundant place experts over GPUs: run expert parallel under "
                         "torchrun --nproc-per-node G (G >= 2), or replay the trace with moe-trace simulate")
    if redundant < 0 or redundant % world_size:
        raise UsageError(f"--redundant {redundant} is not a multiple of the {world_size} ranks (every rank holds "
                         f"the same number of expert slots)")
    if redundant > num_experts * (world_size - 1):
        raise UsageError(f"--redundant {redundant}: {num_experts} experts on {world_size} ranks hold at most "
                         f"{num_experts * (world_size - 1)} extra copies (one copy of an expert per rank)")
    if exchange == "padded" and world_size == 1:
        raise UsageError("--expert-exchange padded is expert parallelism's exchange: run under torchrun "
                         "--nproc-per-node G (G >= 2)")
    if replan_every is not None and replan_every < 1:
        raise UsageError(f"--replan-every must be >= 1, got {replan_every}")
    if policy != "static" and not record:
        raise UsageError(f"--placement {policy} plans from the recorded trace; drop --no-record")
    if policy != "static" and optimizer not in MOVABLE_OPTIMIZERS:
        raise UsageError(f"--placement {policy} keeps an expert's copies identical and moves their optimizer state, "
                         f"which --optimizer {optimizer} does not allow; use --optimizer {MOVABLE_OPTIMIZERS[0]}")


class PlacementRuntime:
    """The plan in force and the policy that changes it, for the expert-parallel layers of one model."""

    def __init__(self, policy: str, redundant: int, replan_every: int | None, world_size: int,
                 meta: dict[str, Any], run_dir: Path, write: bool, dispatch: str = "balanced"):
        """``dispatch``: the rule by which the layers split an expert's tokens among its copies
        (``expert_parallel.DISPATCH`` of their exchange), which plans are judged by."""
        [self.policy] = policies.get(policy, replan_every=replan_every)
        self.setting = Setting(gpus=world_size, redundant=redundant, cost=CostModel.from_meta(meta),
                               dispatch=dispatch)
        self.block_ids = list(meta["moe_layers"])
        self.plan = self.setting.initial(len(self.block_ids), meta["num_experts"])
        self.plans: list[tuple[int, np.ndarray]] = [(0, self.plan.slot_expert)]  # every plan in force
        self.next_check = self.policy.first_check()
        self.memory: list = []  # what the policy keeps between checks (phase: its recent checks)
        self.history = np.empty((0, len(self.block_ids), meta["num_experts"]), dtype=np.int64)
        self.path, self.write = run_dir / "placement.parquet", write
        self.layers: list[ExpertParallelMoELayer] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.migrations = 0  # experts moved (arrivals over all GPUs and layers) since this process started

    def attach(self, layers: list[ExpertParallelMoELayer], optimizer: torch.optim.Optimizer) -> None:
        self.layers, self.optimizer = layers, optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"slot_expert": self.plan.slot_expert, "replicas": self.plan.replicas, "next_check": self.next_check,
                "memory": list(self.memory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._set(Plan(state["slot_expert"], state["replicas"], self.setting.gpus))
        self.next_check, self.memory = state["next_check"], list(state["memory"])

    def start(self, step: int, recorder) -> None:
        """Begin at ``step`` with ``recorder`` (a :class:`moe_trace.recorder.Recorder`) counting: the policy's
        history from the trace (rank 0 reads, every rank gets it) and ``placement.parquet`` cut back to the plans
        before ``step`` (a resumed run re-takes later decisions)."""
        if self.next_check is None:
            self._write_plans()
            return
        recorder.collect()  # from here on the recorder keeps every step for the checks
        if step > 0:
            history = [None]
            if dist.get_rank() == 0:
                loaded = trace.load(self.path.parent / "trace")  # may run past `step`: a killed run's last flush
                if loaded.steps[:step].tolist() != list(range(step)):
                    raise UsageError(f"--resume: the trace does not hold steps 0..{step - 1}; cannot rebuild the "
                                     f"placement policy's history")
                history = [loaded.counts[:step]]
            dist.broadcast_object_list(history, src=0)
            self.history = history[0]
            if self.write:
                kept = [(s, plan) for s, plan in trace.load_placement(self.path) if s < step]
                if not kept or not np.array_equal(kept[-1][1], self.plan.slot_expert):
                    raise UsageError(f"--resume: {self.path} does not end with the checkpoint's placement")
                self.plans = kept
        self._write_plans()

    def before_step(self, step: int, recorder) -> None:
        """At a check of the policy: read the counts so far (one sync), re-plan, and migrate what changed."""
        if step != self.next_check:
            return
        _, counts = recorder.collect()
        self.history = np.concatenate([self.history, counts])
        if len(self.history) != step:
            raise RuntimeError(f"placement history holds {len(self.history)} steps at step {step}")
        new, self.next_check = self.policy.check(self.history, trace.proportions(self.history), self.plan,
                                                 self.setting, self.memory)
        if new is None or np.array_equal(new.slot_expert, self.plan.slot_expert):
            return
        for layer, row in zip(self.layers, new.slot_expert, strict=True):
            self.migrations += migrate(layer, self.optimizer, row)
        self._set(new)
        self.plans.append((step, new.slot_expert))
        self._write_plans()

    def _set(self, plan: Plan) -> None:
        self.plan = plan
        for layer, row in zip(self.layers, plan.slot_expert, strict=True):
            layer.set_plan(row)

    def _write_plans(self) -> None:
        if self.write:
            trace.write_placement(self.path, self.plans, self.block_ids)


@torch.no_grad()
def migrate(layer: ExpertParallelMoELayer, optimizer: torch.optim.Optimizer, slot_expert: np.ndarray) -> int:
    """Give every slot of ``layer`` the weights and optimizer state of its expert under ``slot_expert`` (the
    layer's new row), taken from a slot that hosts it now: a local one if there is one, else one of its copies
    on other ranks (spread over them). Returns the experts moved into a slot over all ranks."""
    old, world, slots, rank = layer.plan.slot_expert[0], layer.world_size, layer.slots_per_rank, layer.rank
    moves = []  # (source slot, destination slot), global slot numbers, by destination
    for dst, expert in enumerate(slot_expert):
        if expert < 0 or old[dst] == expert:
            continue
        on_rank = np.arange(dst // slots * slots, (dst // slots + 1) * slots)
        local = on_rank[old[on_rank] == expert]
        holders = local if len(local) else np.flatnonzero(old == expert)
        moves.append((int(holders[dst % len(holders)]), dst))
    if not moves:
        return 0
    tensors = _slot_tensors(layer, optimizer)
    sends = [(src, dst) for src, dst in moves if src // slots == rank and dst // slots != rank]
    receives = sorted(((src, dst) for src, dst in moves if dst // slots == rank and src // slots != rank),
                      key=lambda m: (m[0] // slots, m[1]))
    locals_ = [(src, dst) for src, dst in moves if src // slots == rank == dst // slots]
    # Read every source before anything is written: a slot may be both a source and a destination.
    local_rows = [_pack(tensors, src - rank * slots) for src, _ in locals_]
    crossing = any(src // slots != dst // slots for src, dst in moves)
    if crossing:  # every rank knows every move, so all of them take part in the exchange or none does
        row_bytes = sum(t[0].numel() * t.element_size() for t in tensors)
        device = tensors[0].device
        outgoing = (torch.cat([_pack(tensors, src - rank * slots) for src, _ in sends]) if sends
                    else torch.empty(0, dtype=torch.uint8, device=device))
        send_splits = [row_bytes * sum(dst // slots == r for _, dst in sends) for r in range(world)]
        recv_splits = [row_bytes * sum(src // slots == r for src, _ in receives) for r in range(world)]
        incoming = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        dist.all_to_all_single(incoming, outgoing, recv_splits, send_splits, group=layer.group)
        for (_, dst), row in zip(receives, incoming.split(row_bytes) if receives else [], strict=True):
            _unpack(tensors, dst - rank * slots, row)
    for (_, dst), row in zip(locals_, local_rows, strict=True):
        _unpack(tensors, dst - rank * slots, row)
    return len(moves)


def _slot_tensors(layer: ExpertParallelMoELayer, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The tensors a slot's expert consists of: its weights and their per-element optimizer state."""
    tensors = []
    for weight in (layer.w1, layer.w2):
        tensors.append(weight.data)
        state = optimizer.state.get(weight, {})
        for name in sorted(state):
            value = state[name]
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # shared by all slots (AdamW's step), the same on every rank
            if value.shape != weight.shape:
                raise UsageError(f"the optimizer's {name!r} state {tuple(value.shape)} is not per element of the "
                                 f"expert weights {tuple(weight.shape)}; expert migration cannot move it")
            tensors.append(value)
    return tensors


def _pack(tensors: list[Tensor], slot: int) -> Tensor:
    return torch.cat([t[slot].reshape(-1).view(torch.uint8) for t in tensors])


def _unpack(tensors: list[Tensor], slot: int, row: Tensor) -> None:
    offset = 0
    for t in tensors:
        size = t[slot].numel() * t.element_size()
        t[slot].copy_(row[offset: offset + size].view(t.dtype).view(t[slot].shape))
        offset += size
