"""Expert placement planners: pure functions from per-expert loads to a slot -> expert map.

Layout. GPU ``g`` owns the physical slots ``g * slots_per_gpu ... (g + 1) * slots_per_gpu - 1``. A plan holds,
per MoE layer, ``slot_expert[layer, slot]`` (the logical expert a slot hosts, ``-1`` for an empty slot) and
``replicas[layer, expert]`` (how many slots host it). ``redundant`` counts the slots beyond one per expert
over all GPUs (EPLB's replicas minus experts), so a plan places ``experts + redundant`` replicas.

Planners (every one vectorised over layers: row ``i`` of ``loads`` is planned independently):

* ``contiguous`` -- what megablocks does: expert ``e`` on GPU ``e * gpus // experts``, no replicas, loads
  ignored. The static baseline.
* ``greedy`` -- longest-processing-time packing: experts, heaviest first, each onto the lightest GPU with a
  free slot. No replicas.
* ``eplb`` -- DeepSeek EPLB's recipe: hand out the redundant slots one at a time to the expert with the
  largest load per replica, then pack the replicas (weight ``load / replicas``) longest-first as ``greedy``
  does, never two replicas of one expert on one GPU while another GPU has room.
* ``exact`` -- a mixed-integer program (``scipy.optimize.milp``) for small cases: the placement that
  minimises the heaviest GPU when an expert's tokens may be split among its replicas in any proportion.
  Its objective is a lower bound for every planner and dispatcher here; it measures how far they are from
  optimal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_trace.errors import UsageError


class PlacementError(UsageError, ValueError):
    """A placement request that cannot be met (too few slots, bad shapes, unknown planner)."""


@dataclass(frozen=True)
class Plan:
    """Per layer, the logical expert each physical slot hosts, and each expert's replica count."""

    slot_expert: np.ndarray  # int64 [layers, gpus * slots_per_gpu], -1 = empty slot
    replicas: np.ndarray  # int64 [layers, experts]
    gpus: int

    @property
    def slots_per_gpu(self) -> int:
        return self.slot_expert.shape[1] // self.gpus

    @property
    def num_experts(self) -> int:
        return self.replicas.shape[1]

    def slot_counts(self) -> np.ndarray:
        """int64 ``[layers, gpus, experts]``: how many slots of GPU ``g`` host expert ``e``."""
        layers, slots = self.slot_expert.shape
        columns = self.num_experts + 1  # last column: empty slots (expert -1)
        cell = (np.arange(layers)[:, None] * self.gpus + np.arange(slots) // self.slots_per_gpu) * columns
        per_gpu = np.bincount((cell + self.slot_expert % columns).ravel(), minlength=layers * self.gpus * columns)
        return per_gpu.reshape(layers, self.gpus, columns)[:, :, :-1]

    def hosts(self) -> np.ndarray:
        """bool ``[layers, gpus, experts]``: GPU ``g`` holds at least one replica of expert ``e``."""
        return self.slot_counts() > 0


def stack(plans: list[Plan]) -> Plan:
    """One plan holding the layers of ``plans`` one after another (to dispatch several plans in one call)."""
    return Plan(np.concatenate([p.slot_expert for p in plans]), np.concatenate([p.replicas for p in plans]),
                plans[0].gpus)


def unstack(plan: Plan, layers: int) -> list[Plan]:
    """Split a plan into consecutive plans of ``layers`` layers each (the inverse of :func:`stack`)."""
    return [Plan(plan.slot_expert[i: i + layers], plan.replicas[i: i + layers], plan.gpus)
            for i in range(0, len(plan.replicas), layers)]


def slots_per_gpu_for(experts: int, gpus: int, redundant: int) -> int:
    """The fewest slots per GPU that hold ``experts + redundant`` replicas."""
    if gpus < 1 or redundant < 0:
        raise PlacementError(f"need gpus >= 1 and redundant >= 0 (got {gpus}, {redundant})")
    return -(-(experts + redundant) // gpus)


def even_slots_per_gpu(experts: int, gpus: int, redundant: int) -> int:
    """Slots per GPU when ``experts + redundant`` copies fill ``gpus`` GPUs exactly, as expert-parallel systems
    (EPLB, SGLang, this harness's training) require; a request that does not fit raises PlacementError."""
    slots = slots_per_gpu_for(experts, gpus, redundant)
    if (experts + redundant) % gpus:
        lower = redundant - (experts + redundant) % gpus
        hint = f"{lower} or {lower + gpus}" if lower >= 0 else f"{lower + gpus}"
        raise PlacementError(f"{experts} experts + {redundant} redundant copies do not fill {gpus} GPUs evenly: "
                             f"experts + redundant must be a multiple of the GPUs (--redundant {hint})")
    if experts + redundant > experts * gpus:
        raise PlacementError(f"{experts + redundant} copies of {experts} experts on {gpus} GPU(s) put more copies of "
                             f"some expert than there are GPUs; --redundant can be at most {experts * (gpus - 1)}")
    return slots


def _check(loads: np.ndarray, gpus: int, slots_per_gpu: int, redundant: int) -> np.ndarray:
    loads = np.asarray(loads, dtype=np.float64)
    if loads.ndim != 2 or loads.shape[1] == 0:
        raise PlacementError(f"loads must be [layers, experts], got shape {loads.shape}")
    if not np.isfinite(loads).all() or (loads < 0).any():
        raise PlacementError("loads must be finite and non-negative")
    experts = loads.shape[1]
    if gpus < 1 or slots_per_gpu < 1 or redundant < 0:
        raise PlacementError(f"need gpus >= 1, slots_per_gpu >= 1, redundant >= 0 "
                             f"(got {gpus}, {slots_per_gpu}, {redundant})")
    if experts + redundant > gpus * slots_per_gpu:
        raise PlacementError(f"{experts} experts + {redundant} redundant replicas do not fit in "
                             f"{gpus} GPUs x {slots_per_gpu} slots")
    return loads


def contiguous(loads: np.ndarray, gpus: int, slots_per_gpu: int, redundant: int = 0) -> Plan:
    """Expert ``e`` on GPU ``e * gpus // experts`` (megablocks' expert parallelism); loads and redundancy unused."""
    loads = _check(loads, gpus, slots_per_gpu, redundant)
    layers, experts = loads.shape  # at most ceil(experts / gpus) per GPU: they fit, as _check found
    expert = np.arange(experts)
    gpu = expert * gpus // experts
    first_expert_of_gpu = np.searchsorted(gpu, np.arange(gpus))
    slot = gpu * slots_per_gpu + (expert - first_expert_of_gpu[gpu])
    slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=np.int64)
    slot_expert[:, slot] = expert
    return Plan(slot_expert, np.ones((layers, experts), dtype=np.int64), gpus)


def replicate(loads: np.ndarray, total_replicas: int, max_per_expert: int) -> np.ndarray:
    """EPLB's replication: each extra replica goes to the expert with the largest load per replica.

    Returns int64 ``replicas[layers, experts]`` with row sums ``total_replicas`` and entries in
    ``1..max_per_expert`` (more replicas than GPUs would only share a GPU).
    """
    layers, experts = loads.shape
    replicas = np.ones((layers, experts), dtype=np.int64)
    rows = np.arange(layers)
    for _ in range(min(total_replicas, experts * max_per_expert) - experts):
        per_replica = np.where(replicas < max_per_expert, loads / replicas, -np.inf)
        replicas[rows, per_replica.argmax(axis=1)] += 1
    return replicas


def pack(loads: np.ndarray, replicas: np.ndarray, gpus: int, slots_per_gpu: int) -> Plan:
    """Longest-first packing of replicas (weight ``load / replicas``) onto the lightest GPU with a free slot.

    Replicas of one expert are placed one after another and avoid GPUs that already hold that expert; only
    when every GPU with room does (possible only in the last slots) does a GPU get a second copy.
    """
    layers, experts = loads.shape
    rows = np.arange(layers)
    expert_of = np.repeat(np.tile(np.arange(experts), layers), replicas.ravel()).reshape(layers, -1)
    weight = np.take_along_axis(loads / replicas, expert_of, axis=1)
    order = np.lexsort((expert_of, -weight), axis=1)  # heaviest first; replicas of an expert adjacent
    expert_of = np.take_along_axis(expert_of, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)

    # The heaviest `gpus` replicas go one to each (empty) GPU, all at once; the rest one by one.
    first = min(gpus, expert_of.shape[1])
    gpu_load = np.zeros((layers, gpus))
    gpu_load[:, :first] = weight[:, :first]
    filled = np.zeros((layers, gpus), dtype=np.int64)
    filled[:, :first] = 1
    slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=np.int64)
    slot_expert[:, np.arange(first) * slots_per_gpu] = expert_of[:, :first]
    previous = expert_of[:, first - 1]
    holds_current = np.zeros((layers, gpus), dtype=bool)  # GPUs holding the expert being placed
    holds_current[:, :first] = expert_of[:, :first] == previous[:, None]
    for j in range(first, expert_of.shape[1]):
        expert = expert_of[:, j]
        holds_current[expert != previous] = False
        with_room = np.where(filled < slots_per_gpu, gpu_load, np.inf)
        preferred = np.where(holds_current, np.inf, with_room)
        gpu = np.where(np.isfinite(preferred.min(axis=1)), preferred.argmin(axis=1), with_room.argmin(axis=1))
        slot_expert[rows, gpu * slots_per_gpu + filled[rows, gpu]] = expert
        filled[rows, gpu] += 1
        gpu_load[rows, gpu] += weight[:, j]
        holds_current[rows, gpu] = True
        previous = expert
    return Plan(slot_expert, replicas, gpus)


def greedy(loads: np.ndarray, gpus: int, slots_per_gpu: int, redundant: int = 0) -> Plan:
    """Longest-processing-time packing of the experts, one replica each (redundant slots stay empty)."""
    loads = _check(loads, gpus, slots_per_gpu, redundant)
    return pack(loads, np.ones(loads.shape, dtype=np.int64), gpus, slots_per_gpu)


def eplb(loads: np.ndarray, gpus: int, slots_per_gpu: int, redundant: int = 0) -> Plan:
    """DeepSeek EPLB-style: replicate the heaviest experts (per replica) into the redundant slots, then pack."""
    loads = _check(loads, gpus, slots_per_gpu, redundant)
    replicas = replicate(loads, loads.shape[1] + redundant, max_per_expert=gpus)
    return pack(loads, replicas, gpus, slots_per_gpu)


def exact(loads: np.ndarray, gpus: int, slots_per_gpu: int, redundant: int = 0,
          time_limit_s: float = 60.0) -> Plan:
    """Optimal placement by mixed-integer programming (small cases: a few dozen experts x GPUs).

    Variables per (expert e, GPU g): ``x`` in {0, 1} (g hosts e) and ``y >= 0`` (tokens of e sent to g);
    minimise ``z`` subject to ``sum_e y[e, g] <= z``, ``sum_g y[e, g] = load_e``, ``y <= load_e x``, at most
    ``slots_per_gpu`` experts per GPU, every expert hosted, ``experts + redundant`` replicas in all.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    loads = _check(loads, gpus, slots_per_gpu, redundant)
    layers, experts = loads.shape
    if experts * gpus > 4096:
        raise PlacementError(f"exact planning of {experts} experts x {gpus} GPUs is too large; use eplb")
    n = experts * gpus  # x then y, both indexed e * gpus + g, then z
    eye_e = np.kron(np.eye(experts), np.ones((1, gpus)))  # sum over g for each e
    eye_g = np.kron(np.ones((1, experts)), np.eye(gpus))  # sum over e for each g
    zeros = np.zeros((experts, n))
    slot_expert = np.full((layers, gpus * slots_per_gpu), -1, dtype=np.int64)
    replicas = np.zeros((layers, experts), dtype=np.int64)
    for layer, load in enumerate(loads):
        scale = max(load.max(), 1e-12)  # solve on loads scaled to <= 1 for numerical comfort
        w = load / scale
        constraints = [
            LinearConstraint(np.hstack([eye_g, np.zeros((gpus, n)), np.zeros((gpus, 1))]), 0, slots_per_gpu),
            LinearConstraint(np.hstack([eye_e, zeros, np.zeros((experts, 1))]), 1, gpus),
            LinearConstraint(np.hstack([np.ones((1, n)), np.zeros((1, n + 1))]), 0, experts + redundant),
            LinearConstraint(np.hstack([-np.diag(np.repeat(w, gpus)), np.eye(n), np.zeros((n, 1))]), -np.inf, 0),
            LinearConstraint(np.hstack([zeros, eye_e, np.zeros((experts, 1))]), w, w),
            LinearConstraint(np.hstack([np.zeros((gpus, n)), eye_g, -np.ones((gpus, 1))]), -np.inf, 0),
        ]
        cost = np.zeros(2 * n + 1)
        cost[-1] = 1.0
        integrality = np.concatenate([np.ones(n), np.zeros(n + 1)])
        bounds = Bounds(np.zeros(2 * n + 1), np.concatenate([np.ones(n), np.full(n + 1, np.inf)]))
        result = milp(cost, constraints=constraints, integrality=integrality, bounds=bounds,
                      options={"time_limit": time_limit_s})
        if result.x is None:
            raise PlacementError(f"the exact solver found no placement for layer {layer}: {result.message}")
        hosted = result.x[:n].reshape(experts, gpus) > 0.5
        for g in range(gpus):
            on_gpu = np.flatnonzero(hosted[:, g])
            slot_expert[layer, g * slots_per_gpu: g * slots_per_gpu + len(on_gpu)] = on_gpu
        replicas[layer] = hosted.sum(axis=1)
    return Plan(slot_expert, replicas, gpus)


PLANNERS = {"contiguous": contiguous, "greedy": greedy, "eplb": eplb, "exact": exact}


def plan(loads: np.ndarray, gpus: int, slots_per_gpu: int | None = None, redundant: int = 0,
         method: str = "eplb") -> Plan:
    """Plan every layer of ``loads[layers, experts]`` with the named planner (default: EPLB-style).

    ``slots_per_gpu=None`` takes the fewest slots that hold ``experts + redundant`` replicas.
    """
    if method not in PLANNERS:
        raise PlacementError(f"unknown planner {method!r}; choose from {', '.join(PLANNERS)}")
    loads = np.asarray(loads, dtype=np.float64)
    if slots_per_gpu is None and loads.ndim == 2:
        slots_per_gpu = slots_per_gpu_for(loads.shape[1], gpus, redundant)
    return PLANNERS[method](loads, gpus, slots_per_gpu or 0, redundant)
