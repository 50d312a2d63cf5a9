"""Does a change to training change what is learned? One baseline run and variants that each change one setting.

    PYTHONPATH=. python benchmarks/training_parity.py --data IDS.npy --steps 2000 \
        --variant int8="--attention int8" --variant adamw_bf16="--optimizer adamw_bf16" --out DIR

Every run is ``moe-trace train`` in a subprocess: gpt-125m-moe, 16k tokens per step (8 x 2048), compiled, same seed
and data; the baseline is ``--attention sdpa --optimizer adamw`` and each variant appends its arguments (the last
value of a flag wins). Per variant against the baseline: final validation loss (goal: within 1 %), median step time
past the first quarter (the CLI's own throughput), and how far the two runs' expert loads are apart -- ``mean_wape``
of one run's window-mean load standing in for the other's -- beside how far each run's own load moves from one
window to the next (goal: apart no more than each run drifts by itself). Writes DIR/parity.json (device, versions,
date, commands, goals) and leaves each run's files in DIR/<name>/; a run already finished there is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cli_runs
import numpy as np

from moe_trace import report, trace

BASELINE = ["--attention", "sdpa", "--optimizer", "adamw"]
VAL_LOSS_GOAL = 0.01
WINDOWS = (100, 1000)


def train(name: str, arguments: list[str], data: Path, steps: int, out: Path, common: list[str]) -> dict:
    run = cli_runs.train(["--model", "gpt-125m-moe", "--global-batch", "8", "--steps", str(steps), "--lr", "6e-4",
                          "--warmup", str(steps // 4), "--eval-every", str(steps // 4), "--checkpoint-every", "0",
                          "--seed", "0", "--data", str(data), *common, *BASELINE, *arguments], out / name,
                         reuse=True)  # the runs can be spread over several commands
    rate = run.steady_state(skip=steps // 4)
    return {"command": run.shown, "val_loss": run.summary["val_loss"], "step_s": rate["step_s"],
            "tokens_per_s": rate["tokens_per_s"], "optimizer": run.summary["optimizer"],
            "peak_gpu_memory_gib": run.summary["peak_gpu_memory_gib"]}


def val_loss_rel_diff(baseline: float, variant: float) -> float:
    return variant / baseline - 1


def val_loss_goal(rel_diff: float, goal: str = "validation loss within 1 % of the baseline") -> dict:
    """The parity goal on validation loss (also attention_training.py's, for INT8 against SDPA)."""
    return {"goal": goal, "target": VAL_LOSS_GOAL, "measured": abs(rel_diff), "met": abs(rel_diff) <= VAL_LOSS_GOAL}


def load_apart(a: Path, b: Path, window: int) -> dict:
    stats = {run: report.windowed_stats(trace.load(run).proportions(), trace.load(run).steps, window)
             for run in (a, b)}
    return {"mean_wape_between_runs": float(report.load_distance(stats[a], stats[b]).mean()),
            "self_drift": [float(np.nanmean(report.window_drift(stats[run]))) for run in (a, b)]}


def compare(baseline: dict, variant: dict, base_dir: Path, variant_dir: Path) -> dict:
    result = {"val_loss_rel_diff": val_loss_rel_diff(baseline["val_loss"], variant["val_loss"]),
              "step_time_ratio_variant_over_baseline": variant["step_s"] / baseline["step_s"],
              "load": {f"window_{w}": load_apart(variant_dir, base_dir, w) for w in WINDOWS}}
    apart = result["load"][f"window_{max(WINDOWS)}"]
    result["goals"] = [
        val_loss_goal(result["val_loss_rel_diff"]),
        {"goal": f"expert loads apart no more than each run drifts by itself ({max(WINDOWS)}-step windows)",
         "target": min(apart["self_drift"]), "measured": apart["mean_wape_between_runs"],
         "met": apart["mean_wape_between_runs"] <= min(apart["self_drift"])},
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="token ids (.npy/.bin) for every run")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="a run differing from the baseline by ARGS (repeatable)")
    parser.add_argument("--common", default="", help="arguments for every run (e.g. a smaller model for a dry run)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", metavar="NAME", help="train only this run (baseline or a variant) and stop: runs "
                        "on several GPUs at once, then one invocation without it compares them")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    wanted = {"baseline": "", **variants}
    if args.only:
        train(args.only, wanted[args.only].split(), args.data, args.steps, args.out, args.common.split())
        return
    runs = {name: train(name, extra.split(), args.data, args.steps, args.out, args.common.split())
            for name, extra in wanted.items()}
    payload = {**cli_runs.header(), "steps": args.steps, "runs": runs,
               "variants": {name: compare(runs["baseline"], runs[name], args.out / "baseline", args.out / name)
                            for name in variants}}
    cli_runs.write_json(args.out / "parity.json", payload)
    for name, result in payload["variants"].items():
        print(f"{name}: val loss {runs[name]['val_loss']:.4f} vs {runs['baseline']['val_loss']:.4f} "
              f"({result['val_loss_rel_diff']:+.2%}), step {runs[name]['step_s'] * 1e3:.1f} vs "
              f"{runs['baseline']['step_s'] * 1e3:.1f} ms, goals met: {[g['met'] for g in result['goals']]}")


if __name__ == "__main__":
    main()
