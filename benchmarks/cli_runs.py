"""What the benchmarks that time ``moe-trace train`` share: running it as a user does, reading what it wrote,
and the header of their JSON.

A run is the real command line in a subprocess (``python -m moe_trace train``, or under ``torchrun``), in the
caller's directory (relative paths mean the same to the script and to the run). Its output (stdout and stderr, in
order) and its ``--json`` summary are kept beside the run directory (``RUN.log``, ``RUN.json``: train refuses a
non-empty ``--out``); figures come from that summary and the run's ``metrics.parquet``, never from what it printed.
Steady state is the median of the per-step wall times past a warm-up (compilation, autotuning, allocator): with no
host sync in a step the loop runs ahead until the GPU's queue is full, after which each step's wall time is the
GPU's step time.

Imports no torch until a header asks for the versions, so that a script's ``--recheck`` stays light.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moe_trace import trace
from moe_trace.train import PROGRESS_EVERY

ROOT = Path(__file__).resolve().parent.parent
# How a command's first three words (``python -m MODULE``) are shown: the console script a user types.
SHOWN_AS = {"moe_trace": "moe-trace", "torch.distributed.run": "torchrun"}


def train_command(arguments: list[str], ranks: int | None = None) -> list[str]:
    """``python -m moe_trace train ARGUMENTS``; with ``ranks``, under ``torchrun --standalone`` on that many
    processes (expert parallelism)."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return [sys.executable, *launcher, "-m", "moe_trace", "train", *arguments]


def shown(command: list[str]) -> str:
    """The command as a user types it: ``moe-trace train ...`` or ``torchrun ... -m moe_trace train ...``."""
    return shlex.join([SHOWN_AS[command[2]], *command[3:]])


def subprocess_env() -> dict[str, str]:
    """This environment with the repository first on the path (the runs import this checkout's moe_trace, also
    under torchrun) and unbuffered output (the log keeps stdout and stderr in the order they were written)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1"}


def run_checked(command: list[str]) -> subprocess.CompletedProcess:
    """Run a ``moe-trace`` command (not training: its output is small) and return its captured output; exit with
    the command and its stderr if it fails."""
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shown(command)} failed (exit {done.returncode}):\n{done.stderr}")
    return done


@dataclass(frozen=True)
class TrainRun:
    """A finished ``moe-trace train`` run: its command, wall time, and what it wrote."""

    command: list[str]
    run_dir: Path
    wall_s: float | None  # None: a finished run reused, not run now

    @property
    def shown(self) -> str:
        return shown(self.command)

    @property
    def summary_file(self) -> Path:
        return beside(self.run_dir, ".json")

    @property
    def log_file(self) -> Path:
        return beside(self.run_dir, ".log")

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The run's ``--json`` summary (tokens/s over the whole run, val_loss, eval_s, optimizer, ...)."""
        return json.loads(self.summary_file.read_text())

    @cached_property
    def config(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "config.json").read_text())

    @cached_property
    def metrics(self) -> dict[str, np.ndarray]:
        return trace.load_metrics(self.run_dir / "metrics.parquet")

    @property
    def log_lines(self) -> list[str]:
        """The lines the run printed, less the progress bar (its updates are carriage returns on one line)."""
        text = self.log_file.read_bytes().decode(errors="replace")  # not read_text: it reads \r as \n
        return [line for line in text.split("\n") if line and "\r" not in line]

    def line(self, prefix: str) -> str:
        """The first line the run printed that starts with ``prefix`` (kept in the JSON for people to read)."""
        return next(line for line in self.log_lines if line.startswith(prefix))

    def steady_state(self, skip: int) -> dict[str, float | int]:
        """Mean step time over whole progress-bar periods past the first ``skip`` steps, and the tokens/s it makes.

        The host runs ahead of the GPU until the progress bar reads the loss, every ``PROGRESS_EVERY`` steps and at
        the last, where it waits for the GPU: one step's wall time says little (under CUDA graphs the steps after a
        read take a few milliseconds of launches, the next ones the GPU's pace), a whole period's mean is exact."""
        step_s = self.metrics["step_time_s"]
        first = -(-skip // PROGRESS_EVERY) * PROGRESS_EVERY  # the first step after a read
        mean = float(np.mean(step_s[first:]))
        return {"step_s": mean, "tokens_per_s": float(self.metrics["tokens"][0]) / mean,
                "median_step_s": float(np.median(step_s[first:])), "steps_timed": [first, len(step_s)]}


def beside(run_dir: Path, suffix: str) -> Path:
    """``RUN.json`` or ``RUN.log`` for run directory ``RUN`` (a suffix added, never one replaced)."""
    return run_dir.with_name(run_dir.name + suffix)


def train(arguments: list[str], run_dir: Path, ranks: int | None = None, env: dict[str, str] | None = None,
          reuse: bool = False) -> TrainRun:
    """Run ``moe-trace train ARGUMENTS --out RUN_DIR --json RUN_DIR.json`` (the command also goes to
    ``RUN_DIR.command``); raise with the end of its log if it fails. With ``reuse``, a run that already finished
    there (its summary says it was not stopped early) is returned as it is, so that a benchmark's runs can be
    spread over several commands."""
    run_dir = Path(run_dir)
    summary_file, log = beside(run_dir, ".json"), beside(run_dir, ".log")
    command = train_command([*arguments, "--out", str(run_dir), "--json", str(summary_file)], ranks)
    if reuse and summary_file.exists() and not json.loads(summary_file.read_text())["stopped_early"]:
        print(f"reusing the finished run in {run_dir}", flush=True)
        return TrainRun(command, run_dir, wall_s=None)
    print("$", shown(command), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    beside(run_dir, ".command").write_text(shown(command))  # first: a run cut by a time limit still says how it ran
    started = time.perf_counter()
    with log.open("w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                    env=env or subprocess_env()).returncode
    wall_s = time.perf_counter() - started
    if returncode != 0:
        raise RuntimeError(f"{shown(command)} failed (exit {returncode}); the end of {log}:\n"
                           f"{log.read_text()[-3000:]}")
    run = TrainRun(command, run_dir, wall_s)
    print("\n".join(run.log_lines), flush=True)  # the attention line, the summary, the files written
    return run


def device_name(cuda: bool = True) -> str:
    """The GPU the runs used, or the CPU when there is none (or ``cuda`` is false: a CPU dry run)."""
    import torch

    if cuda and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str | None]:
    import torch
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    """How this benchmark was invoked."""
    return shlex.join(["python", *sys.argv])


def header(cuda: bool = True) -> dict[str, Any]:
    """The head of a benchmark's JSON: device, versions, date and command (its ``goals`` are its own)."""
    return {"device": device_name(cuda), **versions(), "date": now(), "command": command_line()}


def write_json(path: Path, payload: dict, **dumps: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, **dumps) + "\n")
