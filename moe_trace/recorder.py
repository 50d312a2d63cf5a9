"""Per-step expert-load recording without host-device syncs in the training step.

:class:`Recorder` accumulates the current step's per-layer, per-expert counts on the device (from expert
ids with ``scatter_add_``, or from a layer's own count vector); :meth:`Recorder.step` moves them into a
device buffer of ``block`` steps. When the buffer is full it is summed over data-parallel ranks (one
all-reduce per block) and copied to pinned host memory with a non-blocking copy and a CUDA event;
:meth:`Recorder.flush` waits for those events (long completed by then) and writes the steps as one
schema-1 part file. What feeds a recorder (forward hooks on a model's MoE layers) is
:mod:`moe_trace.record`'s job.

:class:`MetricsLog` does the same for the per-step scalars of ``metrics.parquet``: the loss, aux loss and
gradient norm stay device tensors until a flush or a progress update reads them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_trace import trace


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class Recorder:
    """Counts of ``len(meta["moe_layers"])`` MoE layers x ``meta["num_experts"]`` experts, written as a trace.

    ``write=False`` (data-parallel ranks other than 0) still takes part in the all-reduce but writes nothing.
    A part file is written every ``flush_every`` steps (``None``: only when :meth:`flush` is called).
    ``on_block(steps, counts)`` is called with every block of summed host counts (for loggers such as
    TensorBoard), when the block reaches the host at a flush. The first flush drops the trace's rows from
    the first recorded step on (a resumed run records those steps again). ``dropped=True`` also records the
    trace's optional ``dropped`` column (:meth:`add_dropped`; capacity-limited routing) in the same buffers,
    all-reduce and copies as the counts.
    """

    def __init__(self, trace_dir: str | os.PathLike, meta: Mapping[str, Any], device: torch.device,
                 block: int = 25, write: bool = True, group: dist.ProcessGroup | None = None,
                 flush_every: int | None = None, on_block: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 dropped: bool = False):
        self.trace_dir, self.meta, self.write, self.group = Path(trace_dir), dict(meta), write, group
        self.num_layers, self.num_experts = len(self.meta["moe_layers"]), int(self.meta["num_experts"])
        self.enabled = True  # hooks feeding this recorder do nothing while False
        self.flush_every, self.on_block, self.records_dropped = flush_every, on_block, dropped
        # [counts (+ dropped), layers, experts]
        shape = (1 + dropped, self.num_layers, self.num_experts)
        self._current = torch.zeros(shape, dtype=torch.int64, device=device)
        if device.type == "cuda":
            # Hooks add to this tensor inside compiled graphs: a fixed address lets CUDA-graph replay
            # (--compile-mode reduce-overhead) keep mutating it instead of refusing to capture the graph.
            torch._dynamo.mark_static_address(self._current)
        self._buffer = torch.zeros((block, *shape), dtype=torch.int64, device=device)
        self._pin = device.type == "cuda"
        self._steps: list[int] = []  # steps held in the device buffer
        self._last_step: int | None = None
        self._unflushed = 0  # steps closed since the last flush
        self._sequences, self._seq_len = 0, 0  # input shapes seen in the current step (add_sequences)
        self._truncated = False
        self._pending: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]] = []
        self._collected: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]] | None = None  # see collect
        self._cleanup: list[Callable[[], None]] = []

    # -- feeding counts (called from forward hooks; never reads device values) --------------------------

    def layer_index(self, layer: int) -> torch.Tensor:
        """MoE layer ``layer`` as a one-element tensor on the recorder's device, for hooks torch.compile traces.

        Where a graph breaks inside each MoE layer (expert parallelism's exchange), every layer's hook is traced
        on its own: an int ``layer`` would specialise it, one recompilation per layer until Dynamo's limit sends
        the rest back to eager; a tensor is an input like any other.
        """
        return torch.tensor([layer], device=self._current.device)

    def add_counts(self, layer: int | torch.Tensor, counts: torch.Tensor) -> None:
        """Add an int64 count vector ``[experts]`` to MoE layer ``layer`` (position in ``moe_layers``)."""
        self._add(0, layer, counts)

    def add_dropped(self, layer: int | torch.Tensor, dropped: torch.Tensor) -> None:
        """Add the assignments ``[experts]`` a capacity limit dropped in MoE layer ``layer`` (``dropped=True``)."""
        self._add(1, layer, dropped)

    def _add(self, kind: int, layer: int | torch.Tensor, values: torch.Tensor) -> None:
        if isinstance(layer, int):
            layer = self.layer_index(layer)
        # index_add_ reads the layer on the device: indexing with it would make Dynamo guard on its value.
        self._current[kind].index_add_(0, layer, values.view(1, -1))

    def add_expert_ids(self, layer: int | torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Count each selected expert id once; ids outside ``0..experts-1`` (padding sentinels) are dropped."""
        ids = expert_ids.reshape(-1).to(torch.int64)
        valid = (ids >= 0) & (ids < self.num_experts)
        # scatter_add_, not bincount: bincount reads the largest id on the host to size its output (a sync). The
        # layer's row of the flattened [layers, experts] counts is found on the device, as in _add.
        slots = layer * self.num_experts + ids.clamp(0, self.num_experts - 1)
        self._current[0].view(-1).scatter_add_(0, slots, valid.to(torch.int64))

    def add_sequences(self, sequences: int, seq_len: int) -> None:
        """Host-side shape of one counted forward's token ids: fills the sizes ``meta`` leaves as None."""
        self._sequences += sequences
        self._seq_len = seq_len

    def _fill_sizes(self) -> None:
        if self._sequences:
            world = int(self.meta["world_size"])
            observed = {"global_batch": self._sequences * world, "seq_len": self._seq_len,
                        "tokens_per_step": self._sequences * self._seq_len * world}
            for key, value in observed.items():
                if self.meta.get(key) is None:
                    self.meta[key] = value
        self._sequences = 0

    # -- steps and flushing ----------------------------------------------------------------------------

    def step(self, step: int) -> None:
        """Close the current step as optimizer step ``step``: what was counted since the last call."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} does not follow step {self._last_step}: steps must increase")
        self._last_step = step
        self._fill_sizes()
        self._buffer[len(self._steps)].copy_(self._current)
        self._current.zero_()
        self._steps.append(step)
        if len(self._steps) == len(self._buffer):
            self._copy_to_host()
        self._unflushed += 1
        if self.flush_every and self._unflushed >= self.flush_every:
            self.flush()

    def _copy_to_host(self) -> None:
        if not self._steps:
            return
        block = self._buffer[: len(self._steps)]
        if is_distributed(self.group):
            dist.all_reduce(block, group=self.group)
        host = torch.empty(block.shape, dtype=torch.int64, pin_memory=self._pin)
        host.copy_(block, non_blocking=self._pin)
        event = None
        if self._pin:
            event = torch.cuda.Event()
            event.record()
        # Stream order makes it safe to reuse the buffer while the copy above is still in flight.
        self._pending.append((self._steps, host, event))
        if self._collected is not None:
            self._collected.append(self._pending[-1])
        self._steps = []

    def flush(self) -> None:
        """Write every step closed so far as one part file (crash-safe: it appears only complete)."""
        self._copy_to_host()
        self._unflushed = 0
        if not self._pending:
            return
        steps, recorded = _on_host(self._pending)
        counts, dropped = recorded[:, 0], (recorded[:, 1] if self.records_dropped else None)
        self._pending.clear()
        if self.on_block is not None:
            self.on_block(steps, counts)
        if self.write:
            if not self._truncated:
                trace.truncate(self.trace_dir, int(steps[0]))
                self._truncated = True
            trace.write_part(self.trace_dir, steps, counts, self.meta, dropped)

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """The steps closed since the previous call (at the first call: those not yet flushed) and their counts
        ``[steps, layers, experts]`` summed over ranks, on the host; they are still written at the next flush.
        One sync, and under data parallelism a collective that every rank calls at the same step."""
        self._copy_to_host()
        blocks = self._pending if self._collected is None else self._collected
        self._collected = []
        if not blocks:
            return np.empty(0, dtype=np.int64), np.empty((0, self.num_layers, self.num_experts), dtype=np.int64)
        steps, recorded = _on_host(blocks)
        return steps, recorded[:, 0]

    def close(self) -> None:
        """Flush, merge the trace's parts into one, and remove the hooks that fed this recorder."""
        self.flush()
        for cleanup in reversed(self._cleanup):
            cleanup()
        self._cleanup.clear()
        if self.write and self.trace_dir.is_dir():
            trace.compact(self.trace_dir)

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (e.g. a hook handle's ``remove``) at :meth:`close`."""
        self._cleanup.append(cleanup)


def _on_host(blocks: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and recorded values ``[steps, counts (+ dropped), layers, experts]`` of blocks copied to the host,
    once their copies have completed."""
    for _, _, event in blocks:
        if event is not None:
            event.synchronize()
    steps = np.concatenate([np.asarray(s, dtype=np.int64) for s, _, _ in blocks])
    return steps, np.concatenate([host.numpy() for _, host, _ in blocks])


class MetricsLog:
    """Per-step scalars for ``metrics.parquet``, device tensors until read; rewritten whole at each flush."""

    def __init__(self, path: str | os.PathLike, resume_step: int = 0, write: bool = True):
        """``resume_step``: steps from there on are dropped, from the file too (a resumed run records them again,
        and until its first flush the file must not hold steps the trace no longer has)."""
        self.path, self.write = Path(path), write
        self._rows: list[dict[str, Any]] = []
        if self.path.exists():
            kept = trace.load_metrics(self.path)
            keep = kept["step"] < resume_step
            self._rows = [{c: kept[c][i].item() for c in trace.METRIC_COLUMNS} for i in np.flatnonzero(keep)]
            if write and not keep.all():
                if self._rows:
                    self.flush()
                else:
                    self.path.unlink()

    def add(self, **row: Any) -> None:
        """One step's ``trace.METRIC_COLUMNS``; tensor values are read from the device later."""
        self._rows.append(row)

    def amend_last(self, **values: Any) -> None:
        """Change columns of the newest step (its step time once the step's whole iteration is over)."""
        self._rows[-1].update(values)

    def last(self, column: str) -> float:
        return float(self._rows[-1][column])

    def flush(self) -> None:
        """Atomically rewrite the whole file (this reads any pending device values)."""
        for row in self._rows:
            for column, value in row.items():
                if isinstance(value, torch.Tensor):
                    row[column] = value.item()
        if self.write and self._rows:
            trace.write_metrics(self.path, {c: [row[c] for row in self._rows] for c in trace.METRIC_COLUMNS})
