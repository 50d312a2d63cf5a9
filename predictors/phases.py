"""Transient/stable phase classification: per layer, the step from which the expert load stays put.

The paper (arXiv 2404.16914) shows the windowed variance of load proportions falling to a floor but gives
no rule for where. This module's rule, per layer, with ``block`` steps per block and ``lag`` blocks:

1. *Block means* ``m[k] = mean of p over block k`` (noise shrinks by ``block``).
2. *Change statistic* ``d[k] = sum_e |m[k] - m[k - lag]|``: how far the mean load moved in ``lag * block``
   steps, in units of the distance two block means of a constant load would have from noise alone,
   ``sum_e sqrt(4 v_e / (pi block))`` with ``v_e`` the median within-block variance of ``p`` (the per-step
   noise, measured where it is least affected by movement). So ``d ~ 1`` while the load stays put.
3. *Change points*: PELT (``ruptures``, L2 cost) splits ``log d`` into segments of constant level; the
   penalty is ``penalty * sigma^2 * log(n)`` with ``sigma`` a robust (MAD) estimate of the noise of
   ``log d``, i.e. BIC-like at ``penalty = 2``.
4. *Stable phase*: the longest run of final segments whose mean ``d`` is below ``threshold``; it starts at
   block ``k - lag`` for its first statistic ``k`` (the first block whose comparisons are all quiet). If the
   last segment is not quiet, or the quiet run is shorter than ``min_stable`` steps, the layer has no
   stable phase (``None``).

The defaults (``DEFAULTS``) suit runs of ``2 * min_stable`` = 2000 steps or more. On a shorter trace the
block and the shortest stable phase are scaled down with its length (:func:`parameters_for`), so that a short
run (the 1000 steps of the tiny preset) still has room for a transient and a stable phase.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULTS = {"block": 100, "lag": 5, "threshold": 1.5, "penalty": 2.0, "min_stable": 1000}
SHORT_TRACE = 2 * DEFAULTS["min_stable"]  # the defaults hold from this length on; shorter traces scale them


def parameters_for(n_steps: int) -> dict[str, float]:
    """The rule's parameters for a trace of ``n_steps``: ``DEFAULTS``, with ``block`` and ``min_stable`` scaled
    by ``n_steps / SHORT_TRACE`` on shorter traces (blocks of at least 10 steps)."""
    if n_steps >= SHORT_TRACE:
        return dict(DEFAULTS)
    scale = n_steps / SHORT_TRACE
    return {**DEFAULTS, "block": max(10, int(DEFAULTS["block"] * scale)),
            "min_stable": max(1, int(DEFAULTS["min_stable"] * scale))}


def movement(proportions: np.ndarray, block: int = 100, lag: int = 5) -> np.ndarray:
    """The change statistic ``d[k, layer]`` (k = lag .. blocks-1), in units of its noise level."""
    n_blocks = len(proportions) // block
    if n_blocks <= lag:
        return np.empty((0, proportions.shape[1]))
    blocks = proportions[:n_blocks * block].reshape(n_blocks, block, *proportions.shape[1:])
    means = blocks.mean(axis=1)  # [blocks, layers, experts]
    within_var = np.median(blocks.var(axis=1, ddof=1), axis=0)  # [layers, experts]
    noise = np.sqrt(4 * within_var / (np.pi * block)).sum(axis=-1)  # E sum_e |m_k - m_j| for a constant load
    moved = np.abs(means[lag:] - means[:-lag]).sum(axis=-1)
    return moved / np.maximum(noise, 1e-12)


def stable_from(proportions: np.ndarray, block: int | None = None, lag: int | None = None,
                threshold: float | None = None, penalty: float | None = None,
                min_stable: int | None = None) -> list[int | None]:
    """Per layer, the first step of the stable phase (a multiple of ``block``), or None; see the module doc.

    ``proportions`` is ``[steps, layers, experts]`` with step 0 first (add the trace's first step number
    for traces that do not start at 0). Parameters left None take :func:`parameters_for` the trace's length.
    """
    import ruptures

    if proportions.ndim != 3:
        raise ValueError(f"proportions must be [steps, layers, experts], got {proportions.shape}")
    given = {"block": block, "lag": lag, "threshold": threshold, "penalty": penalty, "min_stable": min_stable}
    params = parameters_for(len(proportions)) | {k: v for k, v in given.items() if v is not None}
    block, lag, threshold, penalty, min_stable = (params[k] for k in given)
    stat = movement(proportions, block, lag)
    out: list[int | None] = []
    for layer in range(proportions.shape[1]):
        log_d = np.log(np.maximum(stat[:, layer], 1e-6))
        if len(log_d) < 4:
            out.append(None)
            continue
        sigma = 1.4826 * np.median(np.abs(np.diff(log_d) - np.median(np.diff(log_d)))) / np.sqrt(2)
        pen = penalty * max(sigma, 1e-6) ** 2 * np.log(len(log_d))
        ends = ruptures.Pelt(model="l2", min_size=2, jump=1).fit(log_d).predict(pen=pen)
        out.append(_quiet_start(stat[:, layer], ends, threshold, block, lag, min_stable))
    return out


def _quiet_start(stat: np.ndarray, ends: Sequence[int], threshold: float, block: int, lag: int,
                 min_stable: int) -> int | None:
    """Start step of the trailing run of segments with mean statistic below ``threshold``."""
    start = None
    for seg_start, seg_end in reversed(list(zip([0, *ends[:-1]], ends, strict=True))):
        if stat[seg_start:seg_end].mean() >= threshold:
            break
        start = seg_start
    if start is None:
        return None
    first_step = start * block  # statistic index k compares blocks k and k + lag of the raw block series
    quiet_steps = (len(stat) + lag) * block - first_step
    return first_step if quiet_steps >= min_stable else None


def distance_to_quiet(proportions: np.ndarray, block: int | None = None, lag: int | None = None,
                      min_stable: int | None = None) -> np.ndarray:
    """Per layer, the mean change statistic over the last ``min_stable`` steps (at least one statistic): how
    far a layer that never settles still is from quiet (compare with the threshold; about 1 is noise alone).
    NaN where the trace is too short for one statistic."""
    params = parameters_for(len(proportions)) | {k: v for k, v in
                                                 {"block": block, "lag": lag, "min_stable": min_stable}.items()
                                                 if v is not None}
    stat = movement(proportions, params["block"], params["lag"])
    if not len(stat):
        return np.full(proportions.shape[1], np.nan)
    last = max(1, params["min_stable"] // params["block"])
    return stat[-last:].mean(axis=0)
