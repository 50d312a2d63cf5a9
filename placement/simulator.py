"""Trace replay: run a policy's schedule over recorded counts and measure imbalance, migrations and time.

Between two re-plans the plan is fixed, so the replay is vectorised over those steps (in chunks, to bound
memory): dispatch every step's counts to GPUs, take per layer the busiest GPU, turn that into step time.
A re-plan adds its migration stall to the step it happens at.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from moe_trace.trace import proportions
from placement.bounds import imbalance_lower_bound
from placement.dispatch import gpu_tokens, imbalance
from placement.migration import arrivals
from placement.planners import Plan, stack
from placement.policies import Setting

CHUNK_STEPS = 2048  # longest stretch of steps dispatched at once
BATCH_ROWS = 1 << 15  # steps x layers per dispatch call when short stretches are batched together


def replay_bytes(layers: int, gpus: int, slots_per_gpu: int) -> int:
    """Working memory of :func:`replay`, about: a few float64 arrays of ``[CHUNK_STEPS, layers, slots]``."""
    return 4 * 8 * CHUNK_STEPS * layers * gpus * slots_per_gpu


def replay(counts: np.ndarray, schedule: list, setting: Setting) -> dict[str, np.ndarray]:
    """Per-step outcome of a schedule: ``imbalance[steps, layers]``, ``step_time_s[steps]`` (migration
    stalls included), ``migrations[steps]`` (experts moved at each step), ``stall_s[steps]`` (the stalls alone)
    and the placement-independent ``dense_s`` and ``optimizer_s`` of every step (:class:`placement.cost.CostModel`).

    Stretches of equal length under different plans are dispatched in one call, their plans stacked as
    extra layers: a policy that re-plans every few dozen steps costs few calls.
    """
    steps, layers = counts.shape[:2]
    result = {"imbalance": np.empty((steps, layers)), "step_time_s": np.empty(steps),
              "migrations": np.zeros(steps, dtype=np.int64)}
    stall = np.zeros(steps)
    stretches: dict[int, list[tuple[int, Plan]]] = defaultdict(list)  # length -> [(first step, plan)]
    bounds = [start for start, _ in schedule[1:]] + [steps]
    previous = None
    for (start, plan), end in zip(schedule, bounds, strict=True):
        if previous is not None:
            moved = arrivals(previous, plan)
            result["migrations"][start] = moved.sum()
            stall[start] = setting.cost.migration_time_s(moved)
        previous = plan
        for lo in range(start, end, CHUNK_STEPS):
            stretches[min(end, lo + CHUNK_STEPS) - lo].append((lo, plan))

    for length, group in stretches.items():
        per_call = max(1, BATCH_ROWS // (length * layers))
        for i in range(0, len(group), per_call):
            batch = group[i: i + per_call]
            stacked = np.concatenate([counts[lo: lo + length] for lo, _ in batch], axis=1)
            tokens = gpu_tokens(stacked, stack([plan for _, plan in batch]), setting.dispatch)
            imb = imbalance(tokens).reshape(length, len(batch), layers)
            time_s = setting.cost.step_time_s(tokens.max(axis=-1).reshape(length, len(batch), layers),
                                              setting.gpus, batch[0][1].slots_per_gpu)
            for j, (lo, _) in enumerate(batch):
                result["imbalance"][lo: lo + length] = imb[:, j]
                result["step_time_s"][lo: lo + length] = time_s[:, j]
    result["step_time_s"] += stall
    slots_per_gpu = schedule[0][1].slots_per_gpu
    result |= {"stall_s": stall, "dense_s": setting.cost.dense_time_s(setting.gpus),
               "optimizer_s": setting.cost.optimizer_time_s(slots_per_gpu)}
    return result


def summarise(outcome: dict[str, np.ndarray], steps: slice, bytes_per_expert: int) -> dict[str, Any]:
    """Mean and p99 imbalance over (step, layer), migrations, bytes moved and mean step time over ``steps``, with
    the step time's parts: the dense model (LM head included), the optimizer step, the MoE layers (busiest GPU's
    expert work and all-to-alls) and migration stalls."""
    imb = outcome["imbalance"][steps]
    migrations = int(outcome["migrations"][steps].sum())
    step_time = float(outcome["step_time_s"][steps].mean())
    stall = float(outcome["stall_s"][steps].mean())
    return {
        "mean_imbalance": float(imb.mean()),
        "p99_imbalance": float(np.percentile(imb, 99)),
        "migrations": migrations,
        "moved_bytes": migrations * bytes_per_expert,
        "est_step_time_s": step_time,
        "est_step_parts_s": {"dense": outcome["dense_s"], "optimizer": outcome["optimizer_s"],
                             "moe_layers": step_time - outcome["dense_s"] - outcome["optimizer_s"] - stall,
                             "migration": stall},
    }


def replay_policies(counts: np.ndarray, policies: list, setting: Setting) -> dict[str, dict[str, Any]]:
    """Each policy's per-step outcome (:func:`replay`) by name, with its number of re-plans as ``replans``.

    Policies run with BLAS held to one thread: their forecasts are small matrix products, which extra threads
    slow down many times over on a busy machine (an EMA fit over 500 steps x 1536 series: 0.4 ms on one thread,
    6 ms on two with another process running).
    """
    from predictors.series import one_thread

    counts = np.asarray(counts)
    props = proportions(counts)
    outcomes = {}
    for policy in policies:
        with one_thread():
            schedule = policy.schedule(counts, props, setting)
        outcomes[policy.name] = {**replay(counts, schedule, setting), "replans": len(schedule) - 1}
    return outcomes


def policy_records(outcomes: dict[str, dict[str, Any]], setting: Setting, stable_from: int | None = None,
                   bound: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One record per policy (DESIGN.md's simulate JSON) with ``replans``, ``step_time_vs_static`` (when
    ``static`` ran) and, when ``stable_from`` splits the replay, the same figures per phase under ``phases``.
    ``bound[steps, layers]`` (:func:`placement.bounds.imbalance_lower_bound`) adds its mean and p99 to every
    record and phase as ``mean_imbalance_bound`` and ``p99_imbalance_bound``: what no policy can beat."""
    steps = len(next(iter(outcomes.values()))["step_time_s"]) if outcomes else 0
    phases = {"all": slice(None)}
    if stable_from is not None and 0 < stable_from < steps:
        phases |= {"transient": slice(0, stable_from), "stable": slice(stable_from, None)}
    result = []
    for name, outcome in outcomes.items():
        per_phase = {phase: summarise(outcome, span, setting.cost.bytes_per_expert) for phase, span in phases.items()}
        if bound is not None:
            for phase, span in phases.items():
                per_phase[phase] |= {"mean_imbalance_bound": float(bound[span].mean()),
                                     "p99_imbalance_bound": float(np.percentile(bound[span], 99))}
        record = {"policy": name, "gpus": setting.gpus, "redundant": setting.redundant, **per_phase["all"],
                  "replans": outcome["replans"], "dispatch": setting.dispatch, "cost_model": setting.cost.name}
        if len(phases) > 1:
            record["phases"] = {phase: figures for phase, figures in per_phase.items() if phase != "all"}
        result.append(record)
    relative_to_static(result)
    return result


def simulate(counts: np.ndarray, policies: list, setting: Setting, stable_from: int | None = None
             ) -> list[dict[str, Any]]:
    """Replay ``counts[steps, layers, experts]`` under each policy and summarise it (:func:`policy_records`),
    with the lower bound on the imbalance that no placement with these slots can beat."""
    bound = imbalance_lower_bound(counts, setting.gpus, setting.redundant)
    return policy_records(replay_policies(counts, policies, setting), setting, stable_from, bound)


def relative_to_static(records: list[dict[str, Any]]) -> None:
    static = next((r for r in records if r["policy"] == "static"), None)
    if static is None:
        return
    for record in records:
        record["step_time_vs_static"] = record["est_step_time_s"] / static["est_step_time_s"]
        for name, figures in record.get("phases", {}).items():
            figures["step_time_vs_static"] = figures["est_step_time_s"] / static["phases"][name]["est_step_time_s"]


def whole_model_stable_from(proportions: np.ndarray) -> int | None:
    """The step from which every layer is stable (``predictors.phases``), or None if some layer never is.

    One split for the whole model, because a re-plan and its step time concern all layers at once.
    """
    from predictors.phases import stable_from

    return every_layer_stable_from(stable_from(proportions))


def every_layer_stable_from(per_layer: list[int | None]) -> int | None:
    """The latest of the layers' stable-phase starts, or None if some layer never stabilises."""
    return None if not per_layer or any(s is None for s in per_layer) else max(per_layer)


def format_table(records: list[dict[str, Any]], setting: Setting, stable_from: int | None) -> str:
    """The records as a plain-text table, one block of rows per phase."""
    split = ("no stable phase found" if stable_from is None else "stable throughout" if stable_from == 0
             else f"stable phase from step {stable_from}")
    lines = [f"{setting.gpus} GPUs, {setting.redundant} redundant slots, planner {setting.planner}, "
             f"dispatch {setting.dispatch}; {split}; cost model {setting.cost.name}",
             f"{'phase':<10} {'policy':<8} {'mean imb':>8} {'p99 imb':>8} {'migrations':>10} {'moved GB':>9} "
             f"{'step ms':>9} {'vs static':>9}"]
    for phase in ("all", "transient", "stable"):
        for record in records:
            figures = record if phase == "all" else record.get("phases", {}).get(phase)
            if figures is None:
                continue
            relative = figures.get("step_time_vs_static")
            lines.append(f"{phase:<10} {record['policy']:<8} {figures['mean_imbalance']:>8.3f} "
                         f"{figures['p99_imbalance']:>8.3f} {figures['migrations']:>10d} "
                         f"{figures['moved_bytes'] / 1e9:>9.1f} {figures['est_step_time_s'] * 1e3:>9.2f} "
                         f"{'' if relative is None else f'{relative:.3f}':>9}")
    if records:
        parts = records[0]["est_step_parts_s"]
        lines.append(f"{records[0]['policy']}'s step: dense layers and LM head {parts['dense'] * 1e3:.2f} ms + "
                     f"optimizer {parts['optimizer'] * 1e3:.2f} ms + MoE layers {parts['moe_layers'] * 1e3:.2f} ms + "
                     f"migrations {parts['migration'] * 1e3:.2f} ms; placement changes the last two")
    if records and "p99_imbalance_bound" in records[0]:
        lines.append(f"no placement of these {setting.redundant} redundant slots, even re-planned every step, gets "
                     f"below mean imbalance {records[0]['mean_imbalance_bound']:.3f}, p99 "
                     f"{records[0]['p99_imbalance_bound']:.3f} on this trace (placement/bounds.py)")
    return "\n".join(lines)
