"""Training checkpoints: written atomically (temporary file, fsync, rename), the last ``KEPT`` kept.

A checkpoint holds everything needed to continue at its step: the model, optimizer and scheduler states, every
random generator's state, and under expert parallelism the placement in force (each rank writes its own shard,
``step-NNNNNNNNNN.rank-R.pt``). Resuming takes the newest step that every rank holds.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from moe_trace import expert_placement, trace
from moe_trace.errors import UsageError

KEPT = 2


def checkpoint_paths(run_dir: Path, shard: str = "") -> list[Path]:
    """``shard`` is ``".rank-R"`` under expert parallelism (each rank holds different experts), else empty."""
    directory = run_dir / "checkpoints"
    return sorted(directory.glob(f"step-{'[0-9]' * 10}{shard}.pt")) if directory.is_dir() else []


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file continues at."""
    return int(path.name.split(".")[0].removeprefix("step-"))


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, shard: str = "",
                    placement: expert_placement.PlacementRuntime | None = None) -> Path:
    """Save everything needed to continue at ``step`` (the next step to run), the expert placement included."""
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    if placement is not None:
        state["placement"] = placement.state_dict()
    path = directory / f"step-{step:010d}{shard}.pt"
    trace.atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoint_paths(run_dir, shard)[:-KEPT]:
        old.unlink()
    return path


def load_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, shard: str = "",
                    placement: expert_placement.PlacementRuntime | None = None) -> int:
    """Restore the latest checkpoint into the given objects; return the step to continue from (0, with the
    objects untouched, when there is none: a run killed before its first checkpoint starts again)."""
    for leftover in (run_dir / "checkpoints").glob(f".step-*{shard}.pt.*.tmp"):
        leftover.unlink()  # a save killed before its rename
    paths = checkpoint_paths(run_dir, shard)
    newest = checkpoint_step(paths[-1]) if paths else 0
    if shard and dist.is_initialized():
        # A run killed while its ranks were saving has the newest step on some ranks only: take the newest
        # step that every rank holds (ranks save the same steps and keep the last KEPT).
        common = torch.tensor(newest, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(common, op=dist.ReduceOp.MIN)
        newest = int(common.item())
    if newest == 0:
        return 0
    path = next((p for p in paths if checkpoint_step(p) == newest), None)
    if path is None:
        raise UsageError(f"--resume: the ranks' checkpoints in {run_dir / 'checkpoints'} share no step")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if placement is not None:  # before the weights: they are laid out by the checkpoint's plan
        placement.load_state_dict(state["placement"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
