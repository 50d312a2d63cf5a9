"""Expert work per GPU against its local experts and their tokens: the calibration of the placement cost model.

What a GPU does for one MoE layer once its tokens have arrived (expert parallelism's local work, the same ops as
one GPU's whole layer): permute the rows by expert, two ``torch._grouped_mm`` with GELU between them
(``moe_trace.moe.expert_forward``, fp32 weights cast to bf16 as bf16-autocast training does), put the rows back
and weight them by their gates (``moe_trace.moe.dispatch_combine``), forward and backward. Timed for each
preset's expert shape, local experts 1..32, tokens per GPU 256..131072, and three splits of the tokens among the
local experts: ``even``, ``half`` (one expert takes half, the rest share the other half) and ``one`` (one expert
takes all). Four figures per point (milliseconds per forward + backward):

* ``gpu_ms`` -- eager code, GPU time by CUDA-graph replay: the work itself, without launch latency. The placement
  cost model (``placement/calibration.py``) uses this one, on the even split;
* ``wall_ms`` -- eager code, wall time per call with calls back to back (host launch latency shows where the
  host, not the GPU, is the limit: expert-parallel training runs eager);
* ``compiled_gpu_ms`` / ``compiled_wall_ms`` -- the same under ``torch.compile(dynamic=True)``, as one-GPU
  training runs it (null where compiling failed; ``compile_error`` says why).

With two or more GPUs visible it also times NCCL's ``all_to_all_single`` against the bytes each GPU sends to
the others (bf16 rows, equal splits), the maximum over ranks.

The calibration the cost model ships (run from the repo root; 380 points in 112 s on one H200, 2026-11-29; on two
GPUs the all-to-all adds seconds):

    PYTHONPATH=. python benchmarks/expert_cost.py --out placement/calibration/h200.json

``--quick`` times a small grid (a dry run: seconds on a GPU; on CPU it checks the script, with wall times only).
The file is rewritten after every shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_trace.moe import dispatch_combine, expert_forward

SHAPES = {"gpt-tiny-moe": (128, 512), "gpt-125m-moe": (768, 3072), "gpt-350m-moe": (1024, 4096)}
TOKENS = tuple(256 << i for i in range(10))  # 256 .. 131072 tokens on the GPU
LOCAL_EXPERTS = (1, 2, 4, 8, 16, 32)
SPLITS = ("even", "half", "one")
SKEWED_SHAPES = ("gpt-125m-moe", "gpt-350m-moe")  # the tiny model's skew would say nothing new
A2A_REMOTE_BYTES = tuple(16 << (10 + 2 * i) for i in range(9))  # 16 KiB .. 1 GiB sent to other GPUs
BLOCK_S = 0.01  # seconds of work per timed block: long enough to average, short enough for a big grid
BLOCKS = 3  # timed blocks per figure, median taken


def split(tokens: int, experts: int, kind: str) -> list[int]:
    """Tokens per local expert for a split kind (sums to ``tokens``)."""
    if kind == "one" or experts == 1:
        return [tokens] + [0] * (experts - 1)
    first = tokens // 2 if kind == "half" else tokens // experts
    rest = tokens - first
    share, extra = divmod(rest, experts - 1)
    return [first] + [share + (i < extra) for i in range(experts - 1)]


def expert_work(x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One layer's expert work on one GPU, exactly as ``MoELayer`` runs it after routing."""
    return dispatch_combine(x, expert_indices, gates, counts, lambda rows, c: expert_forward(rows, c, w1, w2))


class Point:
    """The tensors of one measurement: ``tokens`` rows routed by ``counts`` to local experts of one shape."""

    def __init__(self, hidden: int, ffn: int, counts: list[int], device: torch.device, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        tokens, experts = sum(counts), len(counts)
        self.counts = torch.tensor(counts, dtype=torch.int64, device=device)
        # Tokens arrive unsorted: a random order of the assignments, as a router gives.
        expert_of_token = torch.repeat_interleave(torch.arange(experts, device=device), self.counts,
                                                  output_size=tokens)
        self.indices = expert_of_token[torch.randperm(tokens, generator=g, device=device)].view(tokens, 1)
        # Under bf16 autocast the LayerNorm before the layer and the gates come out in fp32; parameters are fp32.
        self.x = torch.randn(tokens, hidden, generator=g, device=device).requires_grad_()
        self.gates = torch.rand(tokens, 1, generator=g, device=device).requires_grad_()
        self.w1 = (0.02 * torch.randn(experts, hidden, ffn, generator=g, device=device)).requires_grad_()
        self.w2 = (0.02 * torch.randn(experts, ffn, hidden, generator=g, device=device)).requires_grad_()
        self.grad_out = torch.randn(tokens, hidden, generator=g, device=device)

    def step(self, work) -> None:
        """Forward and backward once (gradients accumulate, as in gradient accumulation)."""
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.x.is_cuda):
            out = work(self.x, self.indices, self.gates, self.counts, self.w1, self.w2)
        out.backward(self.grad_out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device: torch.device) -> float:
    """Wall time per call of ``fn`` called back to back (median of blocks), after a short warm-up."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    reps = max(1, min(200, round(BLOCK_S / max(time.perf_counter() - start, 1e-6))))
    blocks = []
    for _ in range(BLOCKS):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        blocks.append((time.perf_counter() - start) / reps)
    return 1e3 * sorted(blocks)[len(blocks) // 2]


def gpu_ms(fn) -> float:
    """GPU time per call of ``fn`` by CUDA-graph replay (median of blocks): launch latency left out."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture wants
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    begin.record()
    graph.replay()
    end.record()
    end.synchronize()
    reps = max(1, min(200, round(1e3 * BLOCK_S / max(begin.elapsed_time(end), 1e-3))))
    blocks = []
    for _ in range(BLOCKS):
        begin.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        blocks.append(begin.elapsed_time(end) / reps)
    del graph
    return sorted(blocks)[len(blocks) // 2]


def measure_point(point: Point, compiled, device: torch.device, errors: dict[str, str]) -> dict[str, float | None]:
    """The four figures of one point; a mode that fails once (graph capture, compile) is skipped from then on,
    its error kept in ``errors``."""
    figures: dict[str, float | None] = {"wall_ms": wall_ms(lambda: point.step(expert_work), device)}
    modes = {"gpu_ms": lambda: gpu_ms(lambda: point.step(expert_work))}
    if compiled is not None:
        modes["compiled_wall_ms"] = lambda: wall_ms(lambda: point.step(compiled), device)
        modes["compiled_gpu_ms"] = lambda: gpu_ms(lambda: point.step(compiled))
    for name, run in modes.items():
        figures[name] = None
        if device.type != "cuda" and name.endswith("gpu_ms"):
            continue
        failed = "compiled" if name.startswith("compiled") else name
        if failed in errors:
            continue
        try:
            figures[name] = run()
        except Exception as e:  # a mode that cannot run here is recorded, not fatal: the others still count
            errors[failed] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"  {failed} disabled: {errors[failed]}", flush=True)
    return figures


def measure_experts(shapes: dict[str, tuple[int, int]], tokens: tuple[int, ...], local_experts: tuple[int, ...],
                    splits: tuple[str, ...], device: torch.device, compile_: bool, write) -> list[dict]:
    errors: dict[str, str] = {}
    compiled = None
    if compile_:
        import torch._dynamo

        for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        compiled = torch.compile(expert_work, dynamic=True)
    records: list[dict] = []
    for model, (hidden, ffn) in shapes.items():
        for experts in local_experts:
            kinds = [s for s in splits if s == "even" or (experts > 1 and model in SKEWED_SHAPES)]
            for kind in kinds:
                for n_tokens in tokens:
                    counts = split(n_tokens, experts, kind)
                    point = Point(hidden, ffn, counts, device)
                    figures = measure_point(point, compiled, device, errors)
                    records.append({"model": model, "hidden": hidden, "ffn": ffn, "local_experts": experts,
                                    "split": kind, "tokens": n_tokens, "max_expert_tokens": max(counts), **figures})
                    shown = "  ".join(f"{k} {v:.3f}" for k, v in figures.items() if v is not None)
                    print(f"{model:13s} H{hidden} F{ffn} experts {experts:>2} {kind:4s} tokens {n_tokens:>6}: "
                          f"{shown}", flush=True)
                    del point
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(records, errors)
    return records


def _all_to_all_worker(rank: int, world: int, port: int, remote_bytes: tuple[int, ...], out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    points = []
    for remote in remote_bytes:
        # Equal splits: each GPU keeps 1/world of its rows and sends the rest, ``remote`` bytes in all.
        elements = remote * world // ((world - 1) * 2) // world * world
        x = torch.randn(elements, dtype=torch.bfloat16, device="cuda")
        y = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(y, x)
        reps = max(3, min(50, (64 << 20) // max(remote, 1)))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        blocks = []
        for _ in range(BLOCKS):
            dist.barrier()
            torch.cuda.synchronize()
            begin.record()
            for _ in range(reps):
                dist.all_to_all_single(y, x)
            end.record()
            end.synchronize()
            blocks.append(begin.elapsed_time(end) / reps)
        slowest = torch.tensor([sorted(blocks)[len(blocks) // 2]], device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the exchange ends when its slowest rank does
        points.append({"remote_bytes_per_gpu": elements * 2 * (world - 1) // world, "ms": float(slowest)})
        del x, y
    if rank == 0:
        Path(out).write_text(json.dumps(points))
    dist.destroy_process_group()


def measure_all_to_all(world: int, remote_bytes: tuple[int, ...]) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "a2a.json")
        mp.spawn(_all_to_all_worker, args=(world, port, remote_bytes, out), nprocs=world, join=True)
        points = json.loads(Path(out).read_text())
    for p in points:
        print(f"all-to-all over {world} GPUs: {p['remote_bytes_per_gpu'] / 2**20:9.3f} MiB remote per GPU "
              f"{p['ms']:.3f} ms", flush=True)
    return {"gpus": world, "backend": "nccl", "dtype": "bfloat16", "points": points,
            "how": "all_to_all_single with equal splits; remote_bytes_per_gpu = bytes each GPU sends to the others; "
                   "ms = median of timed blocks per call, max over ranks"}


def environment(device: torch.device) -> dict:
    import importlib.util

    triton = None
    if importlib.util.find_spec("triton"):
        import triton as triton_module

        triton = triton_module.__version__
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "gpus_visible": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="placement/calibration/h200.json")
    parser.add_argument("--quick", action="store_true", help="a small grid: checks the script end to end")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile figures")
    parser.add_argument("--no-all-to-all", action="store_true", help="skip NCCL all-to-all even on 2+ GPUs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    shapes, tokens, local, splits = SHAPES, TOKENS, LOCAL_EXPERTS, SPLITS
    if args.quick:
        shapes = {name: SHAPES[name] for name in ("gpt-tiny-moe", "gpt-125m-moe")}
        tokens, local = (256, 1024), (1, 2)
    started = time.perf_counter()
    payload = {"kind": "moe-trace expert cost calibration", "format": 1, **environment(device),
               "provisional": bool(args.quick) or device.type != "cuda",
               "model_figure": "gpu_ms", "model_split": "even",
               "how": {"gpu_ms": "eager, GPU time by CUDA-graph replay (the cost model's figure)",
                       "wall_ms": "eager, wall time per call, calls back to back",
                       "compiled_gpu_ms": "torch.compile(dynamic=True), GPU time by CUDA-graph replay",
                       "compiled_wall_ms": "torch.compile(dynamic=True), wall time per call",
                       "work": "forward + backward of moe_trace.moe.dispatch_combine with expert_forward "
                               "(permute, torch._grouped_mm + GELU, combine), fp32 weights, bf16 autocast",
                       "splits": "even: equal shares; half: one expert takes half, the rest share the other "
                                 "half; one: one expert takes all"},
               "expert": [], "all_to_all": None}

    def write(records: list[dict], errors: dict[str, str]) -> None:
        payload.update(expert=records, errors=errors, wall_s=round(time.perf_counter() - started, 1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")

    world = torch.cuda.device_count() if device.type == "cuda" else 0
    if world >= 2 and not args.no_all_to_all:  # first: seconds, and kept if the longer grid is cut short
        payload["all_to_all"] = measure_all_to_all(world, A2A_REMOTE_BYTES[:3] if args.quick else A2A_REMOTE_BYTES)
    records = measure_experts(shapes, tokens, local, splits, device, not args.no_compile, write)
    if not any(r["gpu_ms"] for r in records):  # no CUDA graphs here: the model falls back to eager wall time
        payload["model_figure"] = "wall_ms"
    write(records, payload.get("errors", {}))
    print(f"wrote {args.out} ({len(records)} points, {payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
