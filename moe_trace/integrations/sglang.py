"""SGLang's expert distribution dumps as traces.

With ``--expert-distribution-recorder-mode stat`` SGLang's ``/dump_expert_distribution_record`` writes
``expert_distribution_recorder_<unix time>.pt`` (python/sglang/srt/eplb/expert_distribution.py): a dict
whose ``logical_count`` is int ``[forward passes, layers, logical experts]``, already summed over the
ranks. Each forward pass (one batch of prefill or decode tokens) becomes a step, in dump-time order.
Rows are all-zero where the recorder's buffer was not filled (dropped, with a warning) and for the model's
dense layers (left out of ``moe_layers``). SGLang's buffer is circular (``--expert-distribution-recorder-
buffer-size``, default 1000): after more passes than that, a dump holds the last ones in rotated order, so
record with ``-1`` (unbounded) for a trace in time order. ``per_token`` dumps (``records``) are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from moe_trace.errors import UsageError
from moe_trace.integrations.imported import Imported

FILE_RE = re.compile(r"expert_distribution_recorder_(\d+(?:\.\d+)?)(?:_\d+)?\.pt")


def dump_files(src: Path) -> list[Path]:
    """``src`` itself, or its ``expert_distribution_recorder_*.pt`` files in dump-time order."""
    if src.is_file():
        return [src]
    files = [p for p in src.iterdir() if FILE_RE.fullmatch(p.name)] if src.is_dir() else []
    if not files:
        raise UsageError(f"{src}: no expert_distribution_recorder_*.pt files")
    return sorted(files, key=lambda p: float(FILE_RE.fullmatch(p.name).group(1)))


def _logical_count(path: Path) -> np.ndarray:
    import torch

    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UsageError(f"{path} is not a readable torch file: {str(e).splitlines()[0]}") from None
    if not isinstance(dump, dict) or "logical_count" not in dump:
        hint = " (a per_token dump: record with --expert-distribution-recorder-mode stat)" \
            if isinstance(dump, dict) and "records" in dump else ""
        raise UsageError(f"{path} holds no 'logical_count'{hint}")
    counts = dump["logical_count"]
    counts = counts.numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    if counts.ndim != 3 or (counts < 0).any():
        raise UsageError(f"{path}: logical_count has shape {counts.shape}, expected [passes, layers, experts] >= 0")
    return counts.astype(np.int64)


def read_expert_distribution(src: str | Path, *, top_k: int, experts: int | None = None) -> Imported:
    """SGLang ``stat``-mode dumps at ``src`` (one ``.pt`` file or a folder of them)."""
    files = dump_files(Path(src))
    parts = [_logical_count(p) for p in files]
    for path, part in zip(files, parts, strict=True):
        if part.shape[1:] != parts[0].shape[1:]:
            raise UsageError(f"{path}: logical_count {list(part.shape[1:])} layers x experts, but {files[0].name} "
                             f"has {list(parts[0].shape[1:])}: inconsistent expert counts")
    counts = np.concatenate(parts)
    if experts is not None and experts != counts.shape[2]:
        raise UsageError(f"--experts {experts}, but logical_count has {counts.shape[2]} experts")
    warnings = []
    used = counts.sum(axis=(1, 2)) > 0
    if not used.all():
        warnings.append(f"skipped {int((~used).sum())} all-zero forward passes (unfilled recorder buffer)")
    moe_layers = np.flatnonzero(counts.sum(axis=(0, 2)) > 0).tolist()
    counts = counts[used][:, moe_layers]
    return Imported(counts, np.arange(len(counts), dtype=np.int64), moe_layers, top_k, "sglang expert_distribution",
                    {"sglang_dumps": [p.name for p in files]}, warnings)
