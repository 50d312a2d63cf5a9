"""Moving from one plan to the next: relabel GPUs to keep experts in place, and count what must move."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.planners import Plan


def align(previous: Plan, new: Plan) -> Plan:
    """``new`` with its GPUs renumbered (per layer) to keep as many experts where ``previous`` had them.

    Planners number GPUs arbitrarily; a renumbering changes no GPU's load, only what has to migrate.
    The best renumbering is an assignment problem on the GPU x GPU overlap of hosted experts.
    """
    # [layer, old gpu, new gpu]: experts both host (counts, exact in float64, whose matmul is BLAS's)
    overlap = previous.hosts().astype(np.float64) @ new.hosts().astype(np.float64).transpose(0, 2, 1)
    blocks = new.slot_expert.reshape(new.slot_expert.shape[0], new.gpus, -1)
    aligned = np.empty_like(blocks)
    for layer in range(blocks.shape[0]):
        old_gpu, new_gpu = linear_sum_assignment(overlap[layer], maximize=True)
        aligned[layer, old_gpu] = blocks[layer, new_gpu]
    return Plan(aligned.reshape(new.slot_expert.shape), new.replicas, new.gpus)


def arrivals(previous: Plan, new: Plan) -> np.ndarray:
    """int64 ``[layers, gpus]``: experts each GPU must receive (hosted by ``new``, not by ``previous``)."""
    return (new.hosts() & ~previous.hosts()).sum(axis=2)
