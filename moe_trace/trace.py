"""Schema-1 expert-load traces: crash-safe Parquet writer and a validating reader.

A trace is a directory of ``part-<first>-<last>.parquet`` files, one row per (step, MoE layer) with the
per-expert token counts as a list column. Every part carries the run's metadata as JSON under the
schema-metadata key ``moe_trace``, so any single part (or a one-file trace) describes itself.

Readers also take part files of any other name ending ``.parquet`` (what pyarrow, duckdb or polars write:
``part-0.parquet``, ``part-00000.parquet``) that carry the metadata: rows are ordered by ``step``, never by
file name, and a step found in two files is an error naming both.

Crash safety comes from the file system: a part is written to a temporary name, fsynced and renamed,
so a reader only ever sees complete parts. A part whose step range lies inside another part's range is
superseded by it (this is what a merge or a truncation leaves if it is killed between its rename and its
unlink), so no interruption can make a step appear twice.

This module needs numpy and pyarrow only: the predictors and the placement simulator read traces
without importing torch.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_trace import __version__
from moe_trace.errors import UsageError

SCHEMA_VERSION = 1
META_KEY = b"moe_trace"
REQUIRED_META = (
    "schema", "model", "num_experts", "top_k", "moe_layers", "tokens_per_step", "seq_len",
    "global_batch", "seed", "moe_backend", "attention", "world_size", "created", "version",
)
METRIC_COLUMNS = ("step", "loss", "lr", "grad_norm", "aux_loss", "step_time_s", "tokens")
_PART_RE = re.compile(r"^part-(\d+)-(\d+)\.parquet$")
SIDECARS = ("metrics.parquet", "placement.parquet")  # per-run files, never trace parts


class TraceError(UsageError):
    """A path that is not a readable schema-1 trace (missing, foreign, damaged or inconsistent)."""


@dataclass(frozen=True)
class Trace:
    """A loaded trace: ``counts[t, l, e]`` tokens routed to expert ``e`` of MoE layer ``l`` at ``steps[t]``."""

    counts: np.ndarray  # int64 [steps, layers, experts]
    steps: np.ndarray  # int64 [steps], strictly increasing
    meta: dict[str, Any]
    # int64 [steps, layers, experts]: assignments a capacity limit dropped (of those in counts); None when the
    # trace has no ``dropped`` column (dropless runs, older traces)
    dropped: np.ndarray | None = None

    @property
    def layers(self) -> list[int]:
        """Transformer block index of each MoE layer, in the order of the counts' second axis."""
        return list(self.meta["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    def __len__(self) -> int:
        return int(self.counts.shape[0])

    def proportions(self) -> np.ndarray:
        """Load proportion ``p[t, l, e] = counts / sum_e counts`` (float64; a step with no tokens is uniform)."""
        return proportions(self.counts)


def proportions(loads: np.ndarray) -> np.ndarray:
    """Each ``[..., experts]`` row of non-negative loads divided by its sum (uniform where the sum is 0)."""
    totals = loads.sum(axis=-1, keepdims=True)
    uniform = np.full(loads.shape, 1.0 / loads.shape[-1])
    return np.divide(loads, totals, out=uniform, where=totals > 0)


def make_meta(**fields: Any) -> dict[str, Any]:
    """Complete a metadata dict with ``schema``, ``created`` and ``version`` and check required keys."""
    meta = {"schema": SCHEMA_VERSION, "created": _now(), "version": __version__, **fields}
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"trace metadata lacks {', '.join(missing)}")
    meta["moe_layers"] = [int(x) for x in meta["moe_layers"]]
    return meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _arrow_schema(meta: Mapping[str, Any], dropped: bool = False) -> pa.Schema:
    fields = [("step", pa.int64()), ("layer", pa.int32()), ("counts", pa.list_(pa.int64()))]
    if dropped:
        fields.append(("dropped", pa.list_(pa.int64())))
    return pa.schema(fields, metadata={META_KEY: json.dumps(dict(meta), sort_keys=True).encode()})


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync the file, rename it over ``path`` and fsync the directory.

    Readers see the old file or the complete new one, never a part: used for trace parts, metrics,
    checkpoints and config files.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_array(values: np.ndarray) -> pa.ListArray:
    """``[steps, layers, experts]`` as one list of ``experts`` values per (step, layer) row."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.int64).reshape(-1))
    offsets = pa.array(np.arange(0, len(flat) + 1, values.shape[2], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _part_table(steps: np.ndarray, counts: np.ndarray, meta: Mapping[str, Any],
                dropped: np.ndarray | None = None) -> pa.Table:
    n_steps, n_layers, _ = counts.shape
    layer_ids = np.asarray(meta["moe_layers"], dtype=np.int32)
    columns = [pa.array(np.repeat(steps.astype(np.int64), n_layers)), pa.array(np.tile(layer_ids, n_steps)),
               _list_array(counts)]
    if dropped is not None:
        columns.append(_list_array(dropped))
    return pa.Table.from_arrays(columns, schema=_arrow_schema(meta, dropped is not None))


def _checked(steps: np.ndarray, counts: np.ndarray, meta: Mapping[str, Any],
             dropped: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    steps = np.asarray(steps, dtype=np.int64)
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[0] != steps.shape[0] or counts.shape[0] == 0:
        raise ValueError(f"counts {counts.shape} do not match {steps.shape[0]} steps")
    if counts.shape[1] != len(meta["moe_layers"]) or counts.shape[2] != meta["num_experts"]:
        raise ValueError(f"counts {counts.shape} do not match the metadata's layers and experts")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    if dropped is not None:
        dropped = np.asarray(dropped)
        if dropped.shape != counts.shape:
            raise ValueError(f"dropped {dropped.shape} does not match counts {counts.shape}")
        if (dropped < 0).any() or (dropped > counts).any():
            raise ValueError("dropped must lie between 0 and the counts")
    return steps, counts, dropped


def write_part(directory: str | os.PathLike, steps: np.ndarray, counts: np.ndarray,
               meta: Mapping[str, Any], dropped: np.ndarray | None = None) -> Path:
    """Write ``counts[steps, layers, experts]`` (and the optional ``dropped`` of the same shape) as one
    complete part file; return its path."""
    steps, counts, dropped = _checked(steps, counts, meta, dropped)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{steps[0]:010d}-{steps[-1]:010d}.parquet"
    table = _part_table(steps, counts, meta, dropped)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def write(path: str | os.PathLike, counts: np.ndarray, meta: Mapping[str, Any],
          steps: np.ndarray | None = None, dropped: np.ndarray | None = None) -> Path:
    """Write a whole trace: a directory with one part, or a single file if ``path`` ends in ``.parquet``."""
    counts = np.asarray(counts)
    steps = np.arange(counts.shape[0], dtype=np.int64) if steps is None else np.asarray(steps)
    path = Path(path)
    if path.suffix != ".parquet":
        return write_part(path, steps, counts, meta, dropped)
    steps, counts, dropped = _checked(steps, counts, meta, dropped)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _part_table(steps, counts, meta, dropped)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def _live_parts(directory: Path) -> list[tuple[int, int, Path]]:
    """Part files in step order, without those superseded by a part that covers their whole range."""
    parts = []
    for p in directory.iterdir():
        m = _PART_RE.match(p.name)
        if m:
            parts.append((int(m.group(1)), int(m.group(2)), p))
    parts.sort(key=lambda x: (x[0], -x[1]))
    live: list[tuple[int, int, Path]] = []
    for first, last, p in parts:
        if live and last <= live[-1][1]:
            continue  # inside the previous part's range: left behind by an interrupted merge
        live.append((first, last, p))
    return live


def truncate(directory: str | os.PathLike, from_step: int) -> None:
    """Drop every row with ``step >= from_step`` (a resumed run re-records those steps)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for first, last, p in _live_parts(directory):
        if first >= from_step:
            p.unlink()
        elif last >= from_step:
            table = pq.read_table(p)
            kept = table.filter(pa.compute.less(table["step"], pa.scalar(from_step, pa.int64())))
            kept_last = int(pa.compute.max(kept["step"]).as_py())
            new = directory / f"part-{first:010d}-{kept_last:010d}.parquet"
            atomic_write(new, lambda tmp, kept=kept: pq.write_table(kept, tmp, compression="zstd"))
            p.unlink()
    for p in directory.glob(".part-*.tmp"):
        p.unlink()
    _fsync_dir(directory)


def compact(directory: str | os.PathLike) -> Path | None:
    """Merge this writer's parts into one (safe to interrupt: the merged part supersedes the ones it covers).

    Parts of other names (another tool's) are left as they are.
    """
    directory = Path(directory)
    live = _live_parts(directory)
    if not live:
        return None
    if len(live) == 1:
        merged = live[0][2]
    else:
        trace = _load_parts([p for _, _, p in live], directory)
        merged = write_part(directory, trace.steps, trace.counts, trace.meta, trace.dropped)
    for p in directory.iterdir():
        if _PART_RE.match(p.name) and p != merged:
            p.unlink()
    _fsync_dir(directory)
    return merged


def resolve(path: str | os.PathLike) -> Path:
    """The trace a user means by ``path``: a trace directory, a ``.parquet`` file, or a run directory."""
    path = Path(path)
    is_run_dir = path.is_dir() and not any(_PART_RE.match(p.name) for p in path.iterdir())
    if is_run_dir and (path / "trace").is_dir():
        return path / "trace"
    if not path.exists():
        raise TraceError(f"no trace at {path}")
    return path


def _read_meta(schema: pa.Schema, source: Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(f"{source} is not a moe-trace trace (no '{META_KEY.decode()}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceError(f"{source} has damaged moe-trace metadata: {e}") from None
    if meta.get("schema") != SCHEMA_VERSION:
        raise TraceError(f"{source} has trace schema {meta.get('schema')!r}; this moe-trace reads schema 1")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise TraceError(f"{source} metadata lacks {', '.join(missing)}")
    return meta


def _read_table(source: Path) -> tuple[pa.Table, dict[str, Any]]:
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as e:
        raise TraceError(f"{source} is not a readable Parquet file (damaged or foreign): {e}") from None
    meta = _read_meta(table.schema, source)
    for name in ("step", "layer", "counts"):
        if name not in table.column_names:
            raise TraceError(f"{source} lacks the column '{name}'")
    return table, meta


def _sources(path: Path) -> list[Path]:
    """The files a reader reads at ``path``: this writer's live parts, then any other ``*.parquet`` part."""
    if not path.is_dir():
        return [path]
    foreign = sorted(p for p in path.glob("*.parquet") if not _PART_RE.match(p.name) and p.name not in SIDECARS)
    sources = [p for _, _, p in _live_parts(path)] + foreign
    if not sources:
        raise TraceError(f"{path} holds no .parquet part files")
    return sources


def load(path: str | os.PathLike) -> Trace:
    """Read a trace (directory of parts, single ``.parquet`` file, or run directory) and validate it.

    Raises :class:`TraceError` for anything that is not a complete, consistent schema-1 trace.
    """
    path = resolve(path)
    return _load_parts(_sources(path), path)


def _load_parts(sources: list[Path], path: Path) -> Trace:
    tables, meta = [], None
    for source in sources:
        table, part_meta = _read_table(source)
        if meta is None:
            meta = part_meta
        elif _shape_keys(part_meta) != _shape_keys(meta):
            raise TraceError(f"{source} belongs to a different run than {sources[0]}")
        tables.append(table)
    assert meta is not None
    _check_disjoint([t["step"].to_numpy() for t in tables], sources)
    with_dropped = ["dropped" in table.column_names for table in tables]
    if any(with_dropped) and not all(with_dropped):
        raise TraceError(f"{path}: some parts have a 'dropped' column and others not")
    columns = ["step", "layer", "counts"] + ["dropped"] * all(with_dropped)
    return _assemble(pa.concat_tables([table.select(columns) for table in tables]), meta, path)


def _check_disjoint(steps_per_source: list[np.ndarray], sources: list[Path]) -> None:
    """Refuse a step that two part files both hold, naming both."""
    if len(sources) < 2:
        return
    unique = [np.unique(steps) for steps in steps_per_source]
    steps = np.concatenate(unique)
    owner = np.repeat(np.arange(len(unique)), [len(u) for u in unique])
    order = np.argsort(steps, kind="stable")
    steps, owner = steps[order], owner[order]
    shared = np.flatnonzero(steps[1:] == steps[:-1])
    if len(shared):
        i = shared[0]
        first, second = sources[owner[i]], sources[owner[i + 1]]
        raise TraceError(f"step {steps[i]} is in both {first} and {second}: parts of one trace must not overlap")


def _shape_keys(meta: Mapping[str, Any]) -> tuple:
    return (meta["model"], meta["num_experts"], tuple(meta["moe_layers"]), meta["seed"])


def _assemble(table: pa.Table, meta: dict[str, Any], source: Path) -> Trace:
    n_experts = int(meta["num_experts"])
    layer_ids = list(meta["moe_layers"])
    steps = table["step"].to_numpy()
    layers = table["layer"].to_numpy()
    flat = _per_expert(table, "counts", n_experts, source)
    flat_dropped = _per_expert(table, "dropped", n_experts, source) if "dropped" in table.column_names else None

    layer_index = np.full(max(layer_ids) + 1, -1, dtype=np.int64)
    layer_index[layer_ids] = np.arange(len(layer_ids))
    if ((layers < 0) | (layers >= len(layer_index))).any() or (layer_index[layers] < 0).any():
        raise TraceError(f"{source}: rows name layers outside the metadata's moe_layers {layer_ids}")
    order = np.lexsort((layer_index[layers], steps))
    steps, layers, flat = steps[order], layers[order], flat[order]
    repeated = (np.diff(steps) == 0) & (np.diff(layers) == 0)
    if repeated.any():
        raise TraceError(f"{source}: step {steps[1:][repeated][0]} appears twice")
    n_layers = len(layer_ids)
    if len(steps) % n_layers:
        raise TraceError(f"{source}: some steps lack a row for every MoE layer")
    steps2 = steps.reshape(-1, n_layers)
    if (steps2 != steps2[:, :1]).any() or (layer_index[layers].reshape(-1, n_layers)
                                          != np.arange(n_layers)).any():
        raise TraceError(f"{source}: some steps lack a row for every MoE layer, or repeat one")
    unique_steps = steps2[:, 0]
    if (flat < 0).any():
        raise TraceError(f"{source}: negative token counts")
    shape = (len(unique_steps), n_layers, n_experts)
    counts = flat.reshape(shape).astype(np.int64, copy=False)
    dropped = None
    if flat_dropped is not None:
        dropped = flat_dropped[order].reshape(shape).astype(np.int64, copy=False)
        if (dropped < 0).any() or (dropped > counts).any():
            raise TraceError(f"{source}: dropped assignments outside 0..counts")
    return Trace(counts=counts, steps=unique_steps.astype(np.int64), meta=meta, dropped=dropped)


def _per_expert(table: pa.Table, name: str, n_experts: int, source: Path) -> np.ndarray:
    """A list column as ``[rows, n_experts]``, refusing lists of another length."""
    column = table[name].combine_chunks()
    lengths = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != n_experts).any():
        raise TraceError(f"{source}: a {name} list has {lengths[lengths != n_experts][0]} entries, "
                         f"expected {n_experts}")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_experts)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a trace without reading its rows."""
    sources = _sources(resolve(path))
    try:
        schema = pq.read_schema(sources[0])
    except (pa.ArrowException, OSError) as e:
        raise TraceError(f"{sources[0]} is not a readable Parquet file (damaged or foreign): {e}") from None
    return _read_meta(schema, sources[0])


# ---------------------------------------------------------------------------------------------------
# metrics.parquet: per-step scalars beside the trace


def metrics_path(trace_path: str | os.PathLike) -> Path:
    """Where a trace's ``metrics.parquet`` lives: beside the trace directory or file."""
    trace_path = resolve(trace_path)
    return trace_path.parent / "metrics.parquet"


def write_metrics(path: str | os.PathLike, columns: Mapping[str, Iterable[float]]) -> None:
    """Atomically (re)write ``metrics.parquet`` from equal-length columns named as in METRIC_COLUMNS."""
    missing = [c for c in METRIC_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"metrics lack {', '.join(missing)}")
    arrays = {c: np.asarray(list(columns[c]) if not isinstance(columns[c], np.ndarray) else columns[c])
              for c in METRIC_COLUMNS}
    table = pa.table({
        "step": pa.array(arrays["step"], pa.int64()),
        **{c: pa.array(arrays[c], pa.float64()) for c in METRIC_COLUMNS[1:-1]},
        "tokens": pa.array(arrays["tokens"], pa.int64()),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def load_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``metrics.parquet`` file (or the one beside a trace) as columns of numpy arrays."""
    path = Path(path)
    if path.suffix != ".parquet" or path.name != "metrics.parquet":
        path = metrics_path(path)
    if not path.exists():
        raise TraceError(f"no metrics at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise TraceError(f"{path} is not a readable Parquet file: {e}") from None
    missing = [c for c in METRIC_COLUMNS if c not in table.column_names]
    if missing:
        raise TraceError(f"{path} lacks the columns {', '.join(missing)}")
    return {c: table[c].to_numpy() for c in METRIC_COLUMNS}


# ---------------------------------------------------------------------------------------------------
# placement.parquet: the expert placement in force, beside the trace of a run that places experts

PLACEMENT_COLUMNS = ("step", "layer", "slot", "expert")


def write_placement(path: str | os.PathLike, plans: Iterable[tuple[int, np.ndarray]], layers: Iterable[int]) -> None:
    """Atomically (re)write ``placement.parquet`` from ``(step, slot_expert[layers, slots])`` pairs, each plan
    in force from its step: one row per (step, layer, slot), ``expert`` -1 for an empty slot, ``layer`` the
    block index as in the trace. Slot = GPU x slots_per_gpu + local slot."""
    layer_ids = np.asarray(list(layers), dtype=np.int32)
    columns: dict[str, list[np.ndarray]] = {c: [] for c in PLACEMENT_COLUMNS}
    for step, slot_expert in plans:
        n_layers, slots = slot_expert.shape
        columns["step"].append(np.full(n_layers * slots, step, dtype=np.int64))
        columns["layer"].append(np.repeat(layer_ids, slots))
        columns["slot"].append(np.tile(np.arange(slots, dtype=np.int32), n_layers))
        columns["expert"].append(np.asarray(slot_expert, dtype=np.int32).ravel())
    table = pa.table({c: pa.array(np.concatenate(columns[c])) for c in PLACEMENT_COLUMNS})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def load_placement(path: str | os.PathLike) -> list[tuple[int, np.ndarray]]:
    """The plans of a ``placement.parquet`` (or the one beside a trace): ``(step, slot_expert[layers, slots])``
    in step order, layers in block order."""
    path = Path(path)
    if path.name != "placement.parquet":
        path = resolve(path).parent / "placement.parquet"
    if not path.exists():
        raise TraceError(f"no placement at {path}")
    columns = {c: pq.read_table(path)[c].to_numpy() for c in PLACEMENT_COLUMNS}
    order = np.lexsort((columns["slot"], columns["layer"], columns["step"]))
    step, layer, expert = columns["step"][order], columns["layer"][order], columns["expert"][order]
    n_layers, n_slots = len(np.unique(layer)), int(columns["slot"].max()) + 1
    return [(int(s), expert[step == s].astype(np.int64).reshape(n_layers, n_slots)) for s in np.unique(step)]
