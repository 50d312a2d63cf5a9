"""Megatron-LM's expert-load logs as traces: ``--save-tokens-per-expert-interval`` and ``--moe-routing-trace-path``.

``{save}/tokens_per_expert/rank{r}.jsonl`` (megatron/training/activation_logging.py): one line per
(iteration, MoE layer) ``{"iter", "block", "layer", "tpe": [[...] per micro-batch]}``, each list the
tokens the rank's *local* experts received after the token dispatch (the grouped GEMM's split sizes).
``iter`` is the iteration number after the step (step ``iter - 1`` here); ``layer`` is the index in the
pipeline stage's ``decoder.layers``; ``block`` is ``"decoder"`` or ``"mtp"`` (multi-token prediction).

``router_trace_rank{r}.jsonl`` (megatron/core/transformer/moe/router_tracer.py): one record per router
call ``{"step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices"}``, the global
expert ids each of the rank's tokens chose before dispatch (one record per micro-batch).

Rank order: Megatron's default ``--rank-order tp-cp-ep-dp-pp`` (first varies fastest). For the experts that
is rank = etp + ETP * (ep + EP * (edp + EDP * pp)): expert-tensor-parallel rank fastest, then the
expert-parallel rank, the expert-data-parallel replica, the pipeline stage slowest; EP rank ``e`` holds
experts ``[e * E/EP, (e+1) * E/EP)``. Counts are summed over micro-batches and over the data-parallel
replicas (each saw other tokens); expert-tensor-parallel ranks saw the same tokens, so only ``etp = 0``
is read. Router traces are summed over every rank of a stage: with tensor parallelism Megatron's MoE needs
sequence parallelism, so the ranks' tokens are disjoint. Global block = stage x blocks per stage + layer
(``num_layers / PP``, or, without ``--num-layers``, the highest local layer seen + 1). Multi-token-prediction
layers are left out. Steps that not every rank and layer recorded (a truncated last line, a rank that
stopped early) are left out with a warning.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from moe_trace.errors import UsageError
from moe_trace.integrations.imported import Imported, describe_steps, stack

RANK_ORDER = "tp-cp-ep-dp-pp"


def read_jsonl(path: Path, required: tuple[str, ...], warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` per line; a truncated last line is skipped (with a warning), any other bad
    line is an error."""
    lines = path.read_text().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == last and i == len(lines) - 1:  # no newline after it: a write cut short
                warnings.append(f"skipped the truncated last line of {path.name}")
                continue
            raise UsageError(f"{path}:{i + 1}: not a JSON record") from None
        missing = [k for k in required if k not in record]
        if missing:
            raise UsageError(f"{path}:{i + 1}: record lacks {', '.join(missing)}")
        records.append((i + 1, record))
    return records


def _rank_files(src: Path, pattern: str, what: str) -> dict[int, Path]:
    regex = re.compile(pattern)
    files = {int(m.group(1)): p for p in sorted(src.iterdir()) if (m := regex.fullmatch(p.name))} \
        if src.is_dir() else {}
    if not files:
        raise UsageError(f"{src}: no {what} files")
    return files


def _world_size(ranks: dict[int, Path], group: int, sizes: str) -> int:
    world = max(ranks) + 1
    if world % group:
        raise UsageError(f"{world} ranks (rank0..rank{world - 1}) do not divide into {sizes}")
    return world


def _blocks_per_stage(num_layers: int | None, pp_size: int, local_layers: set[int]) -> int:
    if num_layers is None:
        return max(local_layers) + 1
    if num_layers % pp_size:
        raise UsageError(f"--num-layers {num_layers} does not divide over --pp-size {pp_size} stages")
    return num_layers // pp_size


def _complete_steps(contributors: dict[tuple[int, int], set[int]], expected: dict[int, set[int]],
                    stage_of_layer: dict[int, int], warnings: list[str]) -> tuple[list[int], list[int]]:
    """Steps for which every MoE layer has counts from every rank of its stage."""
    steps = sorted({s for s, _ in contributors})
    layers = sorted({layer for _, layer in contributors})
    complete = [s for s in steps if all(contributors.get((s, layer)) == expected[stage_of_layer[layer]]
                                        for layer in layers)]
    left_out = sorted(set(steps) - set(complete))
    if left_out:
        warnings.append(f"skipped {describe_steps(left_out)} that not every rank and MoE layer recorded")
    return complete, layers


def _check_stage_files(ranks: dict[int, Path], expected: dict[int, set[int]], warnings: list[str]) -> None:
    for stage, wanted in expected.items():
        present = wanted & set(ranks)
        if not present:
            warnings.append(f"pipeline stage {stage} wrote no files (ranks {sorted(wanted)}): no MoE layers there?")
        elif present != wanted:
            missing = ", ".join(f"rank{r}" for r in sorted(wanted - present))
            raise UsageError(f"missing files {missing} of pipeline stage {stage} (expected ranks {sorted(wanted)})")


def read_tokens_per_expert(src: str | Path, *, top_k: int, ep_size: int = 1, pp_size: int = 1, etp_size: int = 1,
                           experts: int | None = None, num_layers: int | None = None) -> Imported:
    """Megatron's ``tokens_per_expert/rank{r}.jsonl`` files (``src``: that folder or the ``--save`` folder above it)."""
    src = Path(src)
    if (src / "tokens_per_expert").is_dir():
        src = src / "tokens_per_expert"
    ranks = _rank_files(src, r"rank(\d+)\.jsonl", "tokens_per_expert rank*.jsonl")
    world = _world_size(ranks, etp_size * ep_size * pp_size,
                        f"--etp-size {etp_size} x --ep-size {ep_size} x --pp-size {pp_size}")
    per_stage = world // pp_size
    # rank = etp + ETP * (ep + EP * (edp + EDP * pp)); only etp = 0 is read.
    expected = {p: {r for r in range(p * per_stage, (p + 1) * per_stage) if r % etp_size == 0}
                for p in range(pp_size)}
    warnings: list[str] = []
    _check_stage_files(ranks, expected, warnings)

    local: dict[tuple[int, int, int], np.ndarray] = {}  # (rank, step, local layer) -> local expert counts
    local_experts, mtp = None, 0
    for rank, path in sorted(ranks.items()):
        if rank % etp_size:
            continue
        for line, record in read_jsonl(path, ("iter", "block", "layer", "tpe"), warnings):
            if record["block"] != "decoder":
                mtp += 1
                continue
            tpe = np.asarray(record["tpe"], dtype=np.int64)
            if tpe.ndim != 2 or tpe.shape[0] == 0:
                raise UsageError(f"{path}:{line}: 'tpe' is not a list of per-micro-batch count lists")
            if local_experts is None:
                local_experts = tpe.shape[1]
            if tpe.shape[1] != local_experts:
                raise UsageError(f"{path}:{line}: {tpe.shape[1]} local experts, but earlier records have "
                                 f"{local_experts}: inconsistent expert counts")
            key = (rank, int(record["iter"]) - 1, int(record["layer"]))
            local[key] = local.get(key, 0) + tpe.sum(axis=0)
    if mtp:
        warnings.append(f"skipped {mtp} multi-token-prediction (mtp) records")
    if local_experts is None:
        raise UsageError(f"{src}: no decoder records")
    num_experts = local_experts * ep_size
    if experts is not None and experts != num_experts:
        raise UsageError(f"--experts {experts}, but the files hold {local_experts} local experts x --ep-size "
                         f"{ep_size} = {num_experts}")

    per_stage_blocks = _blocks_per_stage(num_layers, pp_size, {layer for _, _, layer in local})
    rows: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros(num_experts, dtype=np.int64))
    contributors: dict[tuple[int, int], set[int]] = defaultdict(set)
    stage_of_layer = {}
    for (rank, step, layer), counts in local.items():
        stage, ep = rank // per_stage, (rank // etp_size) % ep_size
        block = stage * per_stage_blocks + layer
        stage_of_layer[block] = stage
        rows[(step, block)][ep * local_experts:(ep + 1) * local_experts] += counts
        contributors[(step, block)].add(rank)
    steps, layers = _complete_steps(contributors, expected, stage_of_layer, warnings)
    return Imported(stack(rows, steps, layers) if steps else np.zeros((0, len(layers), num_experts), np.int64),
                    np.asarray(steps, dtype=np.int64), layers, top_k, "megatron tokens_per_expert",
                    {"world_size": world, "ep_size": ep_size, "pp_size": pp_size, "etp_size": etp_size,
                     "rank_order": RANK_ORDER, "blocks_per_stage": per_stage_blocks}, warnings)


def read_router_trace(src: str | Path, *, pp_size: int = 1, experts: int | None = None,
                      num_layers: int | None = None) -> Imported:
    """Megatron's ``router_trace_rank{r}.jsonl`` files (``--moe-routing-trace-path``)."""
    src = Path(src)
    ranks = _rank_files(src, r"router_trace_rank(\d+)\.jsonl", "router_trace_rank*.jsonl")
    world = _world_size(ranks, pp_size, f"--pp-size {pp_size}")
    per_stage = world // pp_size
    expected = {p: set(range(p * per_stage, (p + 1) * per_stage)) for p in range(pp_size)}
    warnings: list[str] = []
    _check_stage_files(ranks, expected, warnings)

    selected: dict[tuple[int, int, int], list[np.ndarray]] = defaultdict(list)  # (rank, step, layer) -> ids
    top_k, mtp = None, 0
    for rank, path in sorted(ranks.items()):
        for line, record in read_jsonl(path, ("step", "block", "layer", "topk", "top_indices"), warnings):
            if record["block"] != "decoder":
                mtp += 1
                continue
            ids = np.asarray(record["top_indices"], dtype=np.int64).reshape(-1, int(record["topk"]))
            if top_k is None:
                top_k = int(record["topk"])
            if int(record["topk"]) != top_k:
                raise UsageError(f"{path}:{line}: topk {record['topk']}, but earlier records have {top_k}")
            if "num_tokens" in record and len(ids) != int(record["num_tokens"]):
                raise UsageError(f"{path}:{line}: {len(ids)} rows of top_indices for num_tokens {record['num_tokens']}")
            if (ids < 0).any():
                raise UsageError(f"{path}:{line}: negative expert ids")
            selected[(rank, int(record["step"]), int(record["layer"]))].append(ids.reshape(-1))
    if mtp:
        warnings.append(f"skipped {mtp} multi-token-prediction (mtp) records")
    if top_k is None:
        raise UsageError(f"{src}: no decoder records")
    highest = max(int(ids.max()) for chunks in selected.values() for ids in chunks if ids.size)
    num_experts = experts if experts is not None else highest + 1
    if highest >= num_experts:
        raise UsageError(f"expert id {highest} is not below --experts {num_experts}")
    if experts is None:
        warnings.append(f"assumed {num_experts} experts (the highest id seen + 1; pass --experts)")

    per_stage_blocks = _blocks_per_stage(num_layers, pp_size, {layer for _, _, layer in selected})
    rows: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros(num_experts, dtype=np.int64))
    contributors: dict[tuple[int, int], set[int]] = defaultdict(set)
    stage_of_layer = {}
    for (rank, step, layer), chunks in selected.items():
        stage = rank // per_stage
        block = stage * per_stage_blocks + layer
        stage_of_layer[block] = stage
        rows[(step, block)] += np.bincount(np.concatenate(chunks), minlength=num_experts)
        contributors[(step, block)].add(rank)
    steps, layers = _complete_steps(contributors, expected, stage_of_layer, warnings)
    return Imported(stack(rows, steps, layers) if steps else np.zeros((0, len(layers), num_experts), np.int64),
                    np.asarray(steps, dtype=np.int64), layers, top_k, "megatron router_trace",
                    {"world_size": world, "pp_size": pp_size, "rank_order": RANK_ORDER,
                     "blocks_per_stage": per_stage_blocks}, warnings)
