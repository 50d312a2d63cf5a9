"""Which attention a run uses, and why: ``--attention auto`` picks INT8 only where it was measured faster.

On CUDA, ``auto`` times one training step of attention (forward and backward, as training runs them: q, k
and v views of a fused projection, bf16, causal) at the run's shape, for the INT8 training path and for SDPA,
and takes INT8 only if it is at least :data:`MIN_SPEEDUP` times as fast. The timings are cached per GPU name,
torch and Triton version and INT8 kernel in ``$MOE_TRACE_CACHE/attention_timings.json``, so each shape is
measured once per machine and software stack. On CPU ``auto`` is SDPA: the INT8 kernels are CUDA kernels.

This module imports neither Triton nor :mod:`moe_trace.attention` until a GPU measurement needs them.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_trace.errors import UsageError

# Timing noise between two interleaved measurements of a few hundred ms is about a percent; INT8 must win by
# more than that, so that a tie (and a noisy flip) stays with SDPA, the exact and known-good default.
MIN_SPEEDUP = 1.02
TIMINGS_FILE = "attention_timings.json"
# About 10 ms of GPU sleep (at ~2 GHz) before each timed block: far more than queuing 3 steps takes the CPU.
QUEUE_AHEAD_CYCLES = 20_000_000
MEASUREMENT = "forward+backward GPU time"  # in the cache key: timings taken another way are not reused


@dataclass(frozen=True)
class AttentionShape:
    """The per-GPU attention problem of a training run (causal self-attention)."""

    batch: int
    heads: int
    seq: int
    head_dim: int

    def __str__(self) -> str:
        return f"B{self.batch} H{self.heads} S{self.seq} D{self.head_dim} causal"


@dataclass(frozen=True)
class Timing:
    """Median milliseconds of one attention forward + backward."""

    int8_ms: float
    sdpa_ms: float

    @property
    def speedup(self) -> float:
        """How many times faster INT8 is than SDPA (below 1: slower)."""
        return self.sdpa_ms / self.int8_ms


@dataclass(frozen=True)
class AttentionChoice:
    impl: str  # "int8" or "sdpa", what the model runs
    reason: str  # one line, for the log and config.json


Measure = Callable[[AttentionShape, torch.device], Timing]


def choose_attention(
    requested: str,
    device: torch.device | str,
    shape: AttentionShape,
    measure: Measure | None = None,
    cache_dir: Path | None = None,
    world_size: int = 1,
) -> AttentionChoice:
    """The attention to run for ``--attention requested`` on ``device`` at ``shape``, with the reason.

    ``measure`` times both implementations (default :func:`measure_training_step`); ``cache_dir`` holds the
    timings (default ``$MOE_TRACE_CACHE``, as for tokenized data). Under ``world_size > 1`` processes ``auto`` is
    SDPA without measuring: ranks timing their own GPUs could choose differently.
    """
    device = torch.device(device)
    if requested == "int8" and device.type != "cuda":
        raise UsageError("--attention int8 needs a CUDA GPU (it takes bf16, and training on CPU is float32); "
                         "use --attention sdpa")
    if requested != "auto":
        return AttentionChoice(requested, f"--attention {requested}")
    if device.type != "cuda":
        return AttentionChoice("sdpa", f"auto on {device.type}: the INT8 kernels run on CUDA GPUs")
    if world_size > 1:  # every rank would time its own GPU, and a close call could go two ways
        return AttentionChoice("sdpa", f"auto under {world_size} processes: sdpa, so that every rank runs the same "
                                       "attention (pass --attention int8 to choose it)")
    try:
        from moe_trace.attention import TRAINING_MODE
        from moe_trace.attention.kernels import int8_kernel
    except ImportError as e:  # no Triton in this installation
        return AttentionChoice("sdpa", f"auto: the INT8 kernels do not import ({e})")
    kernel, _ = int8_kernel(device)
    gpu = torch.cuda.get_device_name(device)
    timing = _cached_timing(_stack_key(gpu, kernel), shape, device, measure or measure_training_step,
                            (cache_dir or _default_cache_dir()) / TIMINGS_FILE)
    impl = "int8" if timing.speedup >= MIN_SPEEDUP else "sdpa"
    return AttentionChoice(impl, f"auto: {TRAINING_MODE} ({kernel}) measured {timing.speedup:.2f}x SDPA at {shape} "
                                 f"on {gpu} (forward + backward, {timing.int8_ms:.3f} vs {timing.sdpa_ms:.3f} ms)")


def _default_cache_dir() -> Path:
    from moe_trace.data import default_cache_dir

    return default_cache_dir()


def _stack_key(gpu: str, kernel: str) -> str:
    """Timings hold for one GPU model and software stack: a new torch or Triton measures again."""
    import triton

    return f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | {kernel} | {MEASUREMENT}"


def _cached_timing(key: str, shape: AttentionShape, device: torch.device, measure: Measure, path: Path) -> Timing:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure (and write a good one)
        table = {}
    entry = table.get(key, {}).get(str(shape))
    if entry is not None:
        return Timing(entry["int8_ms"], entry["sdpa_ms"])
    timing = measure(shape, device)
    table.setdefault(key, {})[str(shape)] = {
        "int8_ms": timing.int8_ms, "sdpa_ms": timing.sdpa_ms,
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)  # atomic: concurrent runs each write a whole table, the last one stays
    return timing


def measure_training_step(shape: AttentionShape, device: torch.device, rounds: int = 7, reps: int = 3) -> Timing:
    """Median GPU time of attention forward + backward, INT8 training path and SDPA, interleaved on ``device``.

    A few hundred milliseconds at the presets' shapes (plus the INT8 kernels' first compilation, which the
    run would pay anyway). q, k, v are views of one fused projection, as :class:`~moe_trace.model.GPT` makes them.
    Each timed block starts behind a GPU sleep long enough for this thread to queue all its launches, so the
    events time the GPU's work alone: a compiled training step keeps the GPU fed, and Python's launch overhead
    would otherwise count against the path with more kernel launches.
    """
    from moe_trace.attention import flash_attention_train

    impls = {
        "int8": lambda q, k, v: flash_attention_train(q, k, v, causal=True),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    samples: dict[str, list[float]] = {name: [] for name in impls}
    with torch.cuda.device(device):
        generator = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(shape.batch, shape.seq, 3, shape.heads, shape.head_dim, device=device,
                          generator=generator, dtype=torch.bfloat16).requires_grad_()
        grad_out = torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, device=device,
                               generator=generator, dtype=torch.bfloat16)

        def step(attention: Callable) -> None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            torch.autograd.grad(attention(q, k, v), qkv, grad_out)

        for attention in impls.values():  # compile, autotune and allocate outside the timed region
            step(attention)
        for _ in range(rounds):
            for name, attention in impls.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
                start.record()
                for _ in range(reps):
                    step(attention)
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / reps)
    return Timing(statistics.median(samples["int8"]), statistics.median(samples["sdpa"]))
