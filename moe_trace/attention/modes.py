"""The quantization schemes the INT8 attention kernel implements, named by ``mode``.

Every mode quantizes Q and K per token to INT8 after subtracting the per-channel mean of K (a constant
shift of every key moves each score of a row by the same amount, which softmax ignores, and it takes a
channel bias out of K's scales). They differ in how the second product, P·V, is done.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    int8_pv: bool  # P and V in INT8 (INT8 tensor cores for both products), else 16-bit P·V
    description: str


MODES: dict[str, Mode] = {
    "int8": Mode(
        "int8",
        int8_pv=True,
        description="INT8 Q, K (per token), INT8 V (per channel of each key block), INT8 P over the unsigned "
        "range [0, 255] against each key block's own row maximum; FP32 online softmax between the products",
    ),
    "int8_qk": Mode(
        "int8_qk",
        int8_pv=False,
        description="INT8 Q, K (per token); P·V in the input's 16-bit type; FP32 online softmax",
    ),
}

# The most accurate INT8 mode, and the only one that ever beats the bf16 Triton kernel on the H100 (head_dim
# 128, S >= 4096, up to 1.10x); at the models' training shapes (head_dim 64, S=2048, causal) it is 0.67-0.69x
# of it. benchmarks/NOTES_attention.md has the figures.
TRAINING_MODE = "int8_qk"
