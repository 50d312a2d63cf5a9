"""The language-model loss on one GPU: the fused Triton cross-entropy against F.cross_entropy, forward+backward.

    PYTHONPATH=. python benchmarks/cross_entropy.py [--rows 16384] [--out benchmarks/results/cross_entropy.json]

Shape: gpt-125m-moe's training step, 16k tokens x 50304 padded columns (50257 real), bf16 logits, as
GPT.forward produces them under autocast. Each variant runs loss + backward to the logits; times are
medians of ``triton.testing.do_bench``. The floor is one read of the logits and one write of their
gradient (2 x 1.65 GB); "fraction_of_floor_bandwidth" divides those bytes by the time and by the
reference bandwidth of a bf16 copy of the same tensor measured in the same run. A sweep of the kernel's
(BLOCK_V, num_warps) alone shows whether the default launch configuration is the right one on this GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moe_trace.cross_entropy import _cross_entropy_loss_and_grad_kernel, _launch_config, cross_entropy

VOCAB, PADDED_VOCAB = 50257, 50304
SWEEP = [(block, warps) for block in (4096, 8192, 16384) for warps in (8, 16, 32)]


def reference_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What GPT.forward computed before: F.cross_entropy on the float32 upcast of the real columns."""
    return F.cross_entropy(logits[:, :VOCAB].float(), targets)


def fused_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, targets, VOCAB)


def time_loss_and_backward(loss_fn, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Median milliseconds of ``loss_fn(logits, targets).backward()``."""
    logits = logits.detach().requires_grad_()

    def step():
        loss_fn(logits, targets).backward()

    return do_bench(step, grad_to_none=[logits])


def time_kernel(logits: torch.Tensor, targets: torch.Tensor, block: int, num_warps: int) -> float:
    """Median milliseconds of the forward kernel alone (it also writes the gradient) at one launch config."""
    rows = logits.shape[0]
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)

    def launch():
        _cross_entropy_loss_and_grad_kernel[(rows,)](
            logits, logits.stride(0), targets, losses, grad, grad.stride(0), VOCAB, PADDED_VOCAB, 1.0 / rows,
            BLOCK_V=block, num_warps=num_warps,
        )

    return do_bench(launch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cross_entropy.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(args.rows, PADDED_VOCAB, device="cuda", generator=generator) * 4).bfloat16()
    targets = torch.randint(0, VOCAB, (args.rows,), device="cuda", generator=generator)
    floor_bytes = 2 * logits.numel() * logits.element_size()
    copy_ms = do_bench(lambda: torch.empty_like(logits).copy_(logits))  # reads and writes floor_bytes
    copy_bandwidth = floor_bytes / copy_ms * 1e-6  # GB/s

    # Correctness at this shape before any timing: a fast wrong kernel is worth nothing.
    fused = logits.detach().clone().requires_grad_()
    fused_loss(fused, targets).backward()
    reference = logits.detach().clone().requires_grad_()
    expected = reference_loss(reference, targets)
    expected.backward()
    torch.testing.assert_close(fused_loss(logits, targets), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.grad.float(), reference.grad.float(), rtol=2**-7,
                               atol=1e-6 * reference.grad.abs().max())

    variants = {
        "f_cross_entropy_eager": reference_loss,
        "f_cross_entropy_compiled": torch.compile(reference_loss),
        "fused_eager": fused_loss,
        "fused_compiled": torch.compile(fused_loss, fullgraph=True),
    }
    results = []
    for name, loss_fn in variants.items():
        ms = time_loss_and_backward(loss_fn, logits, targets)
        results.append({"variant": name, "forward_backward_ms": round(ms, 4),
                        "fraction_of_floor_bandwidth": round(floor_bytes / ms * 1e-6 / copy_bandwidth, 3)})
        print(f"{name:28s} {ms:7.3f} ms")

    default_config = _launch_config(PADDED_VOCAB)
    sweep = []
    for block, warps in SWEEP:
        ms = time_kernel(logits, targets, block, warps)
        sweep.append({"block_v": block, "num_warps": warps, "kernel_ms": round(ms, 4),
                      "default": (block, warps) == default_config})
        print(f"kernel BLOCK_V={block:5d} num_warps={warps:2d} {ms:7.3f} ms")

    record = {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": metadata.version("triton"),
        "shape": {"rows": args.rows, "vocab": VOCAB, "padded_vocab": PADDED_VOCAB, "dtype": "bfloat16"},
        "floor_bytes": floor_bytes,
        "copy_ms": round(copy_ms, 4),
        "copy_bandwidth_gb_s": round(copy_bandwidth, 1),
        "variants": results,
        "kernel_sweep": sweep,
        "default_launch_config": {"block_v": default_config[0], "num_warps": default_config[1]},
        "best_launch_config": min(sweep, key=lambda r: r["kernel_ms"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
