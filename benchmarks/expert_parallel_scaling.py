"""Expert-parallel scaling of ``moe-trace train`` on the GPUs of one host, compiled or eager (issues 16 and 17).

    PYTHONPATH=. python benchmarks/expert_parallel_scaling.py run --data IDS --work DIR [--runs weak:1,strong:2]
    PYTHONPATH=. python benchmarks/expert_parallel_scaling.py analyse --work DIR --json benchmarks/results/X.json

Two studies, each run the way a user runs it (``moe-trace train``, under ``torchrun`` on more than one GPU):

* weak scaling: gpt-350m-moe ``--experts 32``, 8 sequences of 2048 tokens per GPU (goal at 2 GPUs >= 95 %,
  issue 16; at 4 >= 90 % and at 8 >= 85 %, issue 17);
* strong scaling: gpt-125m-moe at 128k tokens per step (64 sequences) whatever the GPU count (goal at 2 GPUs
  >= 1.8x one GPU).

Efficiency with G GPUs is tokens/s(G) / (G x tokens/s(1)); speed-up is tokens/s(G) / tokens/s(1). Tokens/s is
the mean step of each run's ``metrics.parquet`` in two windows of whole progress-bar periods: ``early`` (steps
10..19), where the router may still send most tokens to a few experts (so one GPU does most of the expert work),
and ``settled`` (``--settled-from`` on, for runs with more steps), once the balancing loss has spread them;
``busiest_gpu_load`` says which.
``--runs`` picks ``study:gpus`` pairs, so that one-GPU runs can go side by side on two GPUs
(``CUDA_VISIBLE_DEVICES``) and the rest follow; a finished run is reused, and a run cut short (a time limit's
SIGTERM stops it cleanly) is analysed over the steps it made. ``--no-compile`` measures the eager path (the
default before expert parallelism compiled); ``--expert-exchange`` names an exchange instead of the command's
``auto`` (runs named ``..._padded`` or ``..._counts``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cli_runs
import numpy as np

from moe_trace import trace
from moe_trace.train import PROGRESS_EVERY

STUDIES = {  # study: (preset and arguments, sequences per step as a function of the GPU count)
    "weak": (["--model", "gpt-350m-moe", "--experts", "32"], lambda gpus: 8 * gpus),
    "strong": (["--model", "gpt-125m-moe"], lambda gpus: 64),
}
GOALS = {("weak", 2): 0.95, ("weak", 4): 0.90, ("weak", 8): 0.85}  # efficiency
STRONG_SPEEDUP_GOAL = {2: 1.8}
SKIP = PROGRESS_EVERY  # steps of compilation and warm-up left out of the steady state: one progress-bar period
# The learning-rate warm-up of a run of 1000 steps or more (moe-trace train's default there). Without it a short
# run takes a tenth of its steps (1 at 15 steps), reaches the peak rate at once, and its router collapses onto one
# expert (10-15x the mean load, against 4-5x in the first steps of the recorded 20000-step run).
WARMUP = 100


def run_name(study: str, gpus: int, args: argparse.Namespace) -> str:
    """``study-gGPUS-MODE``, MODE compiled or eager, ``_padded`` or ``_counts`` for an exchange named on the
    command line (on more than one GPU); the exchange ``auto`` took is in each run's row."""
    exchange = f"_{args.expert_exchange}" if args.expert_exchange != "auto" and gpus > 1 else ""
    return f"{study}-g{gpus}-{'compiled' if args.compile else 'eager'}{exchange}"


def run(study: str, gpus: int, args: argparse.Namespace) -> cli_runs.TrainRun:
    preset, sequences = STUDIES[study]
    arguments = [*preset, "--global-batch", str(sequences(gpus)), "--steps", str(args.steps), "--attention", "sdpa",
                 "--moe-backend", "torch", "--compile" if args.compile else "--no-compile",
                 *(["--data", str(args.data)] if args.data else []),
                 "--eval-every", str(10 * args.steps), "--checkpoint-every", "0", "--seed", "0",
                 "--warmup", str(WARMUP), *args.extra.split(),
                 *(["--expert-exchange", args.expert_exchange] if gpus > 1 and args.expert_exchange != "auto" else [])]
    return cli_runs.train(arguments, args.work / run_name(study, gpus, args), ranks=gpus if gpus > 1 else None,
                          reuse=True)


def busiest_rank_load(run_dir: Path, gpus: int) -> np.ndarray:
    """Per step, the busiest GPU's routed tokens over the mean GPU's (mean over MoE layers): 1 is even, ``gpus``
    is every token on one GPU's experts. Static placement: expert e on GPU e // (experts / gpus)."""
    counts = trace.load(run_dir).counts.astype(np.float64)  # [steps, layers, experts]
    per_gpu = counts.reshape(*counts.shape[:2], gpus, -1).sum(axis=-1)
    return (per_gpu.max(axis=-1) / per_gpu.mean(axis=-1)).mean(axis=-1)


def machine_header() -> dict:
    """Device (with the GPU count), versions, date and command of this machine."""
    import torch

    header = cli_runs.header()
    header["device"] = f"{torch.cuda.device_count()}x {header['device']}"
    return header


def runs_header(work: Path) -> dict:
    """The header ``run`` wrote beside the runs (``analyse`` may run elsewhere: a CPU reading the run directories
    the GPU machine sent back), else this machine's."""
    written = work / "header.json"
    if not written.exists():
        return machine_header()
    return {**json.loads(written.read_text()), "analysed": cli_runs.command_line()}


def analyse(work: Path, steps: int, settled_from: int) -> dict:
    """Every run's steady state in two windows of steps: ``early`` (SKIP..19, while the router may still send most
    tokens to a few experts) and ``settled`` (``settled_from``.., once the balancing loss has spread them)."""
    # Whole progress-bar periods (cli_runs.TrainRun.steady_state says why); settled: to the run's end, >= 10 steps.
    windows = {"early": (SKIP, SKIP + PROGRESS_EVERY), "settled": (settled_from, None)}
    rows = []
    for summary in sorted(work.glob("*-g*-*.json")):
        study, gpus, mode = summary.stem.split("-")
        measured = cli_runs.TrainRun([], summary.with_suffix(""), None)
        if not (measured.run_dir / "metrics.parquet").exists():
            print(f"skipping {measured.run_dir}: no steps recorded")
            continue
        command_file = cli_runs.beside(measured.run_dir, ".command")
        command = command_file.read_text() if command_file.exists() else None
        gpu_count = int(gpus[1:])
        step_s, load = measured.metrics["step_time_s"], busiest_rank_load(measured.run_dir, gpu_count)
        exchange = measured.config["train"].get("expert_exchange") if gpu_count > 1 else None
        for window, (first, stop) in windows.items():
            stop = stop or len(step_s)
            if len(step_s) < max(stop, first + 10):
                continue
            mean = float(np.mean(step_s[first:stop]))
            rows.append({"study": study, "gpus": gpu_count, "mode": mode, "window": window,
                         "steps_timed": [first, stop], "command": command,
                         "stopped_early": measured.summary["stopped_early"],
                         "expert_exchange": exchange,
                         "tokens_per_step": int(measured.metrics["tokens"][0]), "step_s": mean,
                         "median_step_s": float(np.median(step_s[first:stop])),
                         "tokens_per_s": float(measured.metrics["tokens"][0]) / mean,
                         "busiest_gpu_load": float(load[first:stop].mean()),
                         "peak_gpu_memory_gib": measured.summary["peak_gpu_memory_gib"]})
    goals = []
    for row in rows:
        one_gpu_mode = row["mode"].removesuffix("_padded").removesuffix("_counts")  # one GPU exchanges nothing
        one = next((r for r in rows if (r["study"], r["gpus"], r["mode"], r["window"]) ==
                    (row["study"], 1, one_gpu_mode, row["window"])), None)
        if one is None or row["gpus"] == 1:
            continue
        row["speedup"] = row["tokens_per_s"] / one["tokens_per_s"]
        row["efficiency"] = row["speedup"] / row["gpus"]
        target = (GOALS.get((row["study"], row["gpus"])) if row["study"] == "weak"
                  else STRONG_SPEEDUP_GOAL.get(row["gpus"]))
        if target is not None:
            achieved = row["efficiency"] if row["study"] == "weak" else row["speedup"]
            goals.append({"goal": f"{row['study']} scaling at {row['gpus']} GPUs ({row['mode']}, {row['window']} "
                                  f"steps {row['steps_timed'][0]}..{row['steps_timed'][1] - 1}): "
                                  + ("efficiency" if row["study"] == "weak" else "speed-up"),
                          "target": target, "measured": round(achieved, 3), "met": achieved >= target})
    return {**runs_header(work), "benchmark": __doc__.split("\n")[0], "skip_steps": SKIP, "steps": steps,
            "windows": windows, "runs": rows, "goals": goals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("run", "analyse"))
    parser.add_argument("--work", type=Path, required=True, help="where the runs go (one directory each)")
    parser.add_argument("--data", type=Path, help="token ids (.npy/.bin) for every run")
    parser.add_argument("--runs", default="weak:1,weak:2,strong:1,strong:2", help="study:gpus pairs to run")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--expert-exchange", choices=("auto", "counts", "padded"), default="auto",
                        help="moe-trace train --expert-exchange on more than one GPU (auto: the command's default)")
    parser.add_argument("--settled-from", type=int, default=80,
                        help="analyse: first step of the settled window (runs of more steps than that)")
    parser.add_argument("--json", type=Path, help="analyse: where to write the results")
    parser.add_argument("--extra", default="", help="arguments for every run (a smaller model for a CPU dry run)")
    args = parser.parse_args()
    if args.action == "run":
        cli_runs.write_json(args.work / "header.json", machine_header())
        for pair in args.runs.split(","):
            study, gpus = pair.split(":")
            run(study, int(gpus), args)
    else:
        result = analyse(args.work, args.steps, args.settled_from)
        for row in result["runs"]:
            print({k: row[k] for k in ("study", "gpus", "mode", "window", "tokens_per_s", "busiest_gpu_load")},
                  {k: round(row[k], 3) for k in ("speedup", "efficiency") if k in row})
        for goal in result["goals"]:
            print(goal)
        if args.json:
            cli_runs.write_json(args.json, result)


if __name__ == "__main__":
    main()
