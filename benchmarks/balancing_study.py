"""The balancing study (issue 14): how the balancing method shapes expert load.

``train`` trains one preset once per method -- the Switch loss (``aux``), DeepSeek-V3's auxiliary-loss-free bias
(``aux_free``), the per-sequence loss (``seq_aux``), no balancing (``none``) and the Switch loss with capacity
factor 1.25 (``capacity``) -- with the same seed, data, steps and tokens per step, each through
``python -m moe_trace train`` (compiled on one GPU, its default there), into ``OUT/<method>/`` with its command
and wall time in ``study_run.json``, and beside it the run's output and ``--json`` summary (``OUT/<method>.log``,
``OUT/<method>.json``; benchmarks/cli_runs.py). A method whose run directory already holds a finished run is
skipped, so the study can be spread over several commands (or processes).

``analyse`` compares the runs (``moe_trace.report.balancing``: per method the stable-phase start per layer,
windowed variance, heaviest/mean load, dropped assignments, predictor errors of ``auto`` and the paper's
three, and what placement buys under the cost model) and writes the JSON with the training figures,
the comparison table and the goals. It needs no GPU: run it where the traces are.

GPU study (gpt-125m-moe, 16k tokens per step, ~1.5 minutes per run on one H200; two commands keep each
under the 10-minute limit), then the analysis on a CPU:

    PYTHONPATH=. python benchmarks/balancing_study.py train --data .gpu_data/pysrc-v50257.bin --steps 1000 \\
        --methods aux,aux_free,seq_aux --out traces/balancing
    PYTHONPATH=. python benchmarks/balancing_study.py train --data .gpu_data/pysrc-v50257.bin --steps 1000 \\
        --methods none,capacity --out traces/balancing
    python benchmarks/balancing_study.py analyse traces/balancing --json benchmarks/results/balancing_study.json

The CI subset the notebook runs on (gpt-tiny-moe on CPU, 1k tokens per step, ~20 minutes per run on a
shared 2-core machine):

    for m in aux aux_free seq_aux none capacity; do    # one process per method, in parallel
        python benchmarks/balancing_study.py train --model gpt-tiny-moe --device cpu --tokens-per-step 1024 \\
            --steps 300 --lr 3e-3 --threads 1 --methods $m --out traces/balancing-ci &
    done; wait
    python benchmarks/balancing_study.py analyse traces/balancing-ci --json traces/balancing-ci/study.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import cli_runs
import numpy as np

from moe_trace import __version__, trace
from moe_trace.report import balancing
from moe_trace.report.compare import comparison_table

METHOD_FLAGS = {
    "aux": [],
    "aux_free": ["--balance", "aux_free"],
    "seq_aux": ["--balance", "seq_aux"],
    "none": ["--balance", "none"],
    "capacity": ["--capacity-factor", "1.25"],
}
assert tuple(METHOD_FLAGS) == balancing.METHODS
RUN_RECORD = "study_run.json"  # beside each run: its command, wall time and summary line
RUN_BUDGET_S = 120  # the lead's GPU budget: about 1.5 minutes per run, start-up and compilation included


def train_arguments(args: argparse.Namespace, method: str) -> list[str]:
    """The ``moe-trace train`` arguments of one method's run (all but ``--out``)."""
    seq_len = {"gpt-tiny-moe": 128}.get(args.model, 2048)
    global_batch = max(1, args.tokens_per_step // seq_len)
    arguments = ["--model", args.model, "--steps", str(args.steps), "--global-batch", str(global_batch),
                 "--lr", str(args.lr), "--warmup", str(max(1, args.steps // 10)), "--seed", str(args.seed),
                 "--device", args.device, "--eval-every", str(args.steps),
                 # Pinned, not auto: auto attention times the GPU, and a close call could differ between runs.
                 "--attention", "sdpa", "--moe-backend", "torch",
                 "--checkpoint-every", "0", "--flush-every", "100", *METHOD_FLAGS[method]]
    if args.data:
        arguments += ["--data", args.data]
    if args.threads:
        arguments += ["--threads", str(args.threads)]
    if args.compile is not None:  # default: moe-trace train's (compiled on one GPU)
        arguments.append("--compile" if args.compile else "--no-compile")
    return arguments


def _finished(run_dir: Path, steps: int) -> bool:
    try:
        return len(trace.load(run_dir)) == steps
    except trace.TraceError:
        return False


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for method in args.methods.split(","):
        if method not in METHOD_FLAGS:
            sys.exit(f"balancing_study: unknown method {method!r}; methods: {', '.join(METHOD_FLAGS)}")
        run_dir = out / method
        if _finished(run_dir, args.steps):
            print(f"{method}: {run_dir} already holds {args.steps} steps, skipped")
            continue
        if run_dir.exists():
            sys.exit(f"balancing_study: {run_dir} holds an unfinished or different run; remove it and rerun")
        run = cli_runs.train(train_arguments(args, method), run_dir)
        print(f"{method}: {run.wall_s:.0f} s wall", flush=True)
        record = {"command": run.shown, "wall_s": run.wall_s, "summary": run.line(f"{args.model}:"),
                  "date": cli_runs.now(), "host": platform.node()}
        (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _trained(run_dir: Path, record: dict) -> dict[str, float | None]:
    """A run's validation loss and tokens/s: from its ``--json`` summary, or, for runs trained before the study kept
    that (traces/balancing-ci), from the summary line it printed (``val loss 3.12``, ``123,456 tokens/s``)."""
    if cli_runs.beside(run_dir, ".json").exists():
        summary = json.loads(cli_runs.beside(run_dir, ".json").read_text())
        return {"val_loss": summary["val_loss"], "tokens_per_s": summary["tokens_per_s"]}
    printed = {"val_loss": re.search(r"val loss ([0-9.]+)", record["summary"]),
               "tokens_per_s": re.search(r"([0-9,]+) tokens/s", record["summary"])}
    return {name: float(match.group(1).replace(",", "")) if match else None for name, match in printed.items()}


def analyse(args: argparse.Namespace) -> None:
    import torch  # versions only

    root = Path(args.root)
    runs = balancing.study_runs(root)
    analyses = balancing.analyse_study(runs)
    table = comparison_table(analyses)
    trained = {run.name: json.loads((root / run.name / RUN_RECORD).read_text()) for run in runs
               if (root / run.name / RUN_RECORD).exists()}
    conserved = {run.name: bool((run.trace.counts.sum(axis=2)
                                 == run.trace.meta["tokens_per_step"] * run.trace.meta["top_k"]).all())
                 for run in runs}
    drops = {run.name: int(run.trace.dropped.sum()) if run.trace.dropped is not None else 0 for run in runs}
    walls = {name: run["wall_s"] for name, run in trained.items()}
    config = json.loads((root / runs[0].name / "config.json").read_text())
    result = {
        "date": cli_runs.now(), "command": cli_runs.command_line(), "moe_trace": __version__,
        "torch_used_for_training": config.get("torch"), "device_used_for_training": config.get("device"),
        "analysis_host": {"python": platform.python_version(), "torch": torch.__version__},
        "model": config["model"]["name"], "steps": [len(run.trace) for run in runs],
        "tokens_per_step": runs[0].trace.meta["tokens_per_step"],
        "training": {name: {**record, **_trained(root / name, record)} for name, record in trained.items()},
        "protocol": vars(balancing.study_protocol(min(len(run.trace) for run in runs))),
        "phase_block": balancing.study_phase_block(min(len(run.trace) for run in runs)),
        "comparison": table,
        "goals": {
            "counts conserved in every run (sum = tokens x top-k)": {"met": all(conserved.values()),
                                                                     "runs": conserved},
            "assignments dropped only where a capacity is set": {
                "met": all((drops[r.name] > 0) == (r.trace.meta.get("capacity_factor") is not None) for r in runs),
                "dropped": drops},
            f"each run within {RUN_BUDGET_S} s wall (start-up and compilation included)": {
                "met": bool(walls) and all(w <= RUN_BUDGET_S for w in walls.values()), "wall_s": walls},
        },
    }
    cli_runs.write_json(Path(args.json), result, default=_jsonable)
    print(f"wrote {args.json}")
    for row in table:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train the study's runs")
    p.add_argument("--out", default="traces/balancing", help="study root: one run directory per method")
    p.add_argument("--methods", default=",".join(METHOD_FLAGS), help="comma list (default: all)")
    p.add_argument("--model", default="gpt-125m-moe")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="token ids or text (moe-trace train --data); default: its default corpus")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="CPU threads per run (moe-trace train --threads)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the runs (default: moe-trace train's choice, on for one GPU)")
    p.set_defaults(run=train)
    p = commands.add_parser("analyse", help="compare the study's runs and write the JSON")
    p.add_argument("root", help="study root (train --out)")
    p.add_argument("--json", default="benchmarks/results/balancing_study.json")
    p.set_defaults(run=analyse)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
