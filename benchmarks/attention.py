"""Attention forward on one GPU: INT8 Triton kernel (every mode, with and without quantization) against
SDPA (flash, cuDNN), the bf16 Triton kernel built the same way, and SageAttention 1.0.6, in one run; also
every mode of the other INT8 kernels ``moe_trace.attention.kernels`` offers on this GPU (rows named
``"<kernel> <mode>"``, e.g. ``gluon int8_qk``; the Triton kernel's rows are named by the mode alone).

    PYTHONPATH=. python benchmarks/attention.py [--sweep] [--goal-shapes | --training-shapes]
        [--out benchmarks/results/attention.json]

Shapes: 16k tokens per batch, H=16, S in {1k..16k}, D in {64, 128}, causal and not, plus the training
shapes of gpt-125m-moe (12 heads) and gpt-350m-moe (16 heads), S=2048, D=64, causal. Times are medians of
``triton.testing.do_bench``; TFLOP/s counts 4·B·H·S²·D (halved when causal). Accuracy is measured against
float64 on the first batch element's first two heads. ``--sweep`` first times tile configurations (with
and without Triton's warp specialisation) and records whether the compiler actually specialised;
``--goal-shapes`` keeps only the shapes issue 4's speed goals name (S >= 2048, non-causal) and sweeps only
``int8_qk`` and bf16, so that sweep and table fit in a few minutes; ``--training-shapes`` keeps only the
models' training shapes. An implementation that refuses a shape (raises on its first call) is left out of it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe_trace.attention import MODES
from moe_trace.attention.bf16_attention import _bf16_attention_kernel, bf16_flash_attention
from moe_trace.attention.int8_attention import _int8_attention_kernel, attend_quantized, block_config, quantize_inputs
from moe_trace.attention.kernels import int8_kernels
from moe_trace.attention.reference import accuracy, attention_float64

TOKENS = 16384
SHAPES = [(TOKENS // s, 16, s, d, causal, "") for d in (64, 128) for causal in (False, True)
          for s in (1024, 2048, 4096, 8192, 16384)]  # fmt: skip
SHAPES += [(8, 12, 2048, 64, True, "gpt-125m-moe"), (8, 16, 2048, 64, True, "gpt-350m-moe")]
# block_m, block_n, num_warps, num_stages, warp_specialize
SWEEP = [(128, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 128, 4, 3, False),
         (64, 64, 4, 3, False), (128, 64, 4, 4, False), (128, 128, 4, 2, False), (128, 128, 4, 4, False),
         (128, 64, 4, 3, True), (128, 128, 4, 3, True), (128, 128, 8, 3, True)]  # fmt: skip


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def implementations(q, k, v, causal, configs):
    """name -> zero-argument callable returning the attention output."""
    impls = {}
    sm = 1.0 / math.sqrt(q.shape[-1])
    for mode in MODES:
        cfg = configs.get((mode, q.shape[-1], causal)) or block_config(q.shape[-1], mode)
        impls[mode] = lambda mode=mode, cfg=cfg, sm=sm: attend_quantized(
            quantize_inputs(q, k, v, sm, mode, cfg["block_n"]), q.dtype, causal, **cfg
        )
        pre = quantize_inputs(q, k, v, sm, mode, cfg["block_n"])
        impls[f"{mode} (no quant)"] = lambda pre=pre, cfg=cfg: attend_quantized(pre, q.dtype, causal, **cfg)
    for kernel_name, kernel in int8_kernels(q.device).items():
        if kernel_name != "triton":  # the Triton kernel's rows are above, with their tile configurations
            for mode in MODES:
                impls[f"{kernel_name} {mode}"] = lambda kernel=kernel, mode=mode: kernel(q, k, v, causal, sm, mode)
    bf16_cfg = configs.get(("bf16", q.shape[-1], causal)) or {}
    impls["triton bf16"] = lambda: bf16_flash_attention(q, k, v, causal, **bf16_cfg)
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls[name] = run
    try:
        from sageattention import sageattn

        k_copy = k.clone()  # SageAttention 1.0.6 subtracts the mean of K in place
        impls["sageattention"] = lambda: sageattn(q, k_copy, v, tensor_layout="HND", is_causal=causal)
    except ImportError:
        pass
    return impls


def warp_specialized_kernels(jit_fn) -> int | None:
    """How many of ``jit_fn``'s compiled kernels the compiler split into warp-specialised partitions."""
    try:
        caches = [entry[0] for entry in jit_fn.device_caches.values()]
        return sum("warp_specialize" in kernel.asm["ttgir"] for cache in caches for kernel in cache.values())
    except (AttributeError, KeyError, TypeError, IndexError):  # the cache's layout is Triton-internal
        return None


def sweep(results: list, modes: list[str]) -> dict:
    """Best tile configuration per (mode, head_dim) at S=4096, non-causal; causal runs use it too."""
    best = {}
    for d in (64, 128):
        for causal in (False,):
            q, k, v = (torch.randn(4, 16, 4096, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * q.numel() * q.shape[2]
            for mode in modes:
                kernel = _bf16_attention_kernel if mode == "bf16" else _int8_attention_kernel
                for bm, bn, warps, stages, ws in SWEEP:
                    cfg = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages,
                           "warp_specialize": ws}  # fmt: skip
                    specialised_before = warp_specialized_kernels(kernel)
                    try:
                        if mode == "bf16":
                            fn = functools.partial(bf16_flash_attention, q, k, v, causal, **cfg)
                        else:
                            x = quantize_inputs(q, k, v, d**-0.5, mode, bn)
                            fn = functools.partial(attend_quantized, x, q.dtype, causal, **cfg)
                        ms = bench(fn)
                    except Exception as e:  # a tile that does not fit in shared memory, or no Hopper WS
                        print(f"sweep {mode} d={d} causal={causal} {cfg}: {type(e).__name__} {str(e)[-300:]}")
                        continue
                    specialised_after = warp_specialized_kernels(kernel)
                    specialised = None if specialised_after is None else specialised_after > specialised_before
                    print(f"sweep {mode:8s} d={d} {bm}x{bn} w{warps} s{stages} ws={int(ws)} (in IR: {specialised}): "
                          f"{ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)  # fmt: skip
                    results.append({"mode": mode, "head_dim": d, "causal": causal, **cfg, "ms": ms,
                                    "warp_specialized_in_ir": specialised})  # fmt: skip
                    key = (mode, d, causal)
                    if key not in best or ms < best[key][0]:
                        best[key] = (ms, cfg)
            print({k: v for k, v in best.items() if k[1] == d and k[2] == causal}, flush=True)
    return {(m, d, c): cfg for (m, d, _), (_, cfg) in best.items() for c in (False, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    parser.add_argument("--sweep", action="store_true")
    shapes_group = parser.add_mutually_exclusive_group()
    shapes_group.add_argument("--goal-shapes", action="store_true")
    shapes_group.add_argument("--training-shapes", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    sweep_results: list = []
    sweep_modes = ["int8_qk", "bf16"] if args.goal_shapes else [*MODES, "bf16"]
    configs = sweep(sweep_results, sweep_modes) if args.sweep else {}
    shapes = [s for s in SHAPES if s[2] >= 2048 and not s[4] and not s[5]] if args.goal_shapes else SHAPES
    if args.training_shapes:
        shapes = [s for s in SHAPES if s[5]]
    write_json(Path(args.out), configs, sweep_results, [])

    records: list = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for batch, heads, seq, d, causal, label in shapes:
        q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = attention_float64(q[:1, :2], k[:1, :2], v[:1, :2], causal)
        flops = 4 * batch * heads * seq * seq * d / (2 if causal else 1)
        for name, fn in implementations(q, k, v, causal, configs).items():
            try:
                acc = accuracy(fn()[:1, :2], ref)
            except (ValueError, NotImplementedError) as e:  # a kernel that does not take this shape or mode
                print(f"{name} skipped at B={batch} H={heads} S={seq} D={d} causal={causal}: {e}")
                continue
            ms = bench(fn)
            records.append({"batch": batch, "heads": heads, "seq": seq, "head_dim": d, "causal": causal,
                            "label": label, "impl": name, "ms": ms, "tflops": flops / ms / 1e9, **acc})  # fmt: skip
        del q, k, v, ref
        torch.cuda.empty_cache()
        shape_recs = [r for r in records if (r["batch"], r["heads"], r["seq"], r["head_dim"], r["causal"])
                      == (batch, heads, seq, d, causal)]  # fmt: skip
        summary = "  ".join(f"{r['impl']}={r['tflops']:.0f}/{100 * r['rel_l1']:.2f}%" for r in shape_recs)
        print(f"B={batch} H={heads} S={seq} D={d} causal={causal} {label}: {summary}", flush=True)
        write_json(out, configs, sweep_results, records)  # after every shape: a cut-off run keeps its numbers
    plot(records, out.with_suffix(".png"))
    print_goal_table(records)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def print_goal_table(records: list) -> None:
    """Issue 4's speed goals, non-causal S >= 2048: TFLOP/s and the ratios the goals name (1.3x, 1.2x)."""
    impls = ["int8", "int8_qk", "triton bf16", "sdpa flash", "sdpa cudnn", "sageattention"]
    print("S D | " + " | ".join(impls) + " | int8_qk/bf16 int8_qk/sage int8/bf16")
    for seq, d in sorted({(r["seq"], r["head_dim"]) for r in records if r["seq"] >= 2048 and not r["causal"]}):
        tf = {r["impl"]: r["tflops"] for r in records if (r["seq"], r["head_dim"], r["causal"]) == (seq, d, False)}
        cells = " | ".join(f"{tf[i]:.0f}" if i in tf else "-" for i in impls)
        ratios = [tf.get(a, math.nan) / tf.get(b, math.nan) for a, b in
                  [("int8_qk", "triton bf16"), ("int8_qk", "sageattention"), ("int8", "triton bf16")]]  # fmt: skip
        print(f"{seq} {d} | {cells} | " + " ".join(f"{x:.2f}" for x in ratios))


def write_json(out: Path, configs: dict, sweep_results: list, records: list) -> None:
    result = {
        "device": torch.cuda.get_device_name(),
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "sageattention": _version("sageattention"),
        },
        "configs": {f"{m}/d{d}/{'causal' if c else 'full'}": cfg for (m, d, c), cfg in configs.items()},
        "sweep": sweep_results,
        "records": records,
    }
    out.write_text(json.dumps(result, indent=1))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plot(records: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (d, causal) in zip(axes.flat, [(64, False), (64, True), (128, False), (128, True)], strict=True):
        rows = [r for r in records if r["head_dim"] == d and r["causal"] == causal and not r["label"]]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["seq"], r["tflops"]) for r in rows if r["impl"] == impl)
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl, linestyle="--" if "no quant" in impl else "-")
        ax.set(title=f"D={d}, {'causal' if causal else 'non-causal'}, H=16, 16k tokens", xscale="log",
               xlabel="sequence length", ylabel="TFLOP/s")  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Attention forward on {torch.cuda.get_device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
