"""What no placement can beat: a per-step lower bound on the imbalance, whatever the plan and the dispatcher.

A clairvoyant planner that re-plans at every step for that step's own counts, migrations free, and splits an
expert's tokens among its replicas in any proportion, is still held by two facts:

* the busiest GPU carries at least the mean over GPUs (imbalance >= 1);
* a replica carries at most what its GPU carries, so an expert with ``c`` tokens and ``r`` replicas puts at
  least ``c / r`` on some GPU. With ``experts + redundant`` replicas in all (at most ``gpus`` per expert: two
  on one GPU split nothing), the smallest possible ``max_e c_e / r_e`` is what EPLB's replication reaches
  (each extra replica to the expert with the most tokens per replica; :func:`placement.planners.replicate`).

If this bound is above a goal at a step, no plan with these slots reaches the goal there. When it is near 1,
the slots are not what limits a policy: a plan held over many steps while loads move and fluctuate is.
"""

from __future__ import annotations

import numpy as np

from placement.planners import PlacementError, replicate

_ROWS_PER_CALL = 1 << 15  # (step, layer) rows replicated at once, to bound memory


def imbalance_lower_bound(counts: np.ndarray, gpus: int, redundant: int) -> np.ndarray:
    """Per step and layer of ``counts[..., experts]``: the least imbalance any placement of ``experts +
    redundant`` replicas on ``gpus`` GPUs could have at that step, even re-planned for it (float64 ``[...]``)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim < 1 or counts.shape[-1] == 0 or (counts < 0).any():
        raise PlacementError(f"counts must be non-negative [..., experts], got shape {counts.shape}")
    if gpus < 1 or redundant < 0:
        raise PlacementError(f"need gpus >= 1 and redundant >= 0 (got {gpus}, {redundant})")
    experts = counts.shape[-1]
    rows = counts.reshape(-1, experts)
    mean = rows.sum(axis=1) / gpus
    # Where the replicas needed to keep every one at or under the mean fit, the bound is the mean itself.
    needed = np.ceil(np.divide(rows, mean[:, None], out=np.ones_like(rows), where=mean[:, None] > 0)).sum(axis=1)
    bound = np.ones(len(rows))
    short = np.flatnonzero((needed > experts + redundant) & (mean > 0))
    for lo in range(0, len(short), _ROWS_PER_CALL):
        index = short[lo: lo + _ROWS_PER_CALL]
        chunk = rows[index]
        per_replica = (chunk / replicate(chunk, experts + redundant, max_per_expert=gpus)).max(axis=1)
        bound[index] = np.maximum(per_replica / mean[index], 1.0)
    return bound.reshape(counts.shape[:-1])
