"""Does INT8 attention change training? gpt-125m-moe with --attention int8 vs sdpa, same seed and data.

On a GPU machine, trains both runs one after the other and compares them; with --analyse-only, compares
two finished runs (each directory holding the run's files and its ``train.log``, the command's output):

    PYTHONPATH=. python benchmarks/attention_training.py --data .gpu_data/pysrc-v50257.bin --out /tmp/cmp
    python benchmarks/attention_training.py --analyse-only benchmarks/results/attention_training

Reports final validation loss, median step time and how far the two runs' expert loads are apart:
``mean_wape`` (DESIGN.md) with one run's window-mean load standing in for the other's, over windows of
100 and 1000 steps, beside how far each run's own load moves from one window to the next.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from moe_trace import report, trace

ATTENTIONS = ("int8", "sdpa")
TRAIN_ARGS = ["--model", "gpt-125m-moe", "--global-batch", "8", "--steps", "2000", "--lr", "6e-4", "--warmup",
              "500", "--moe-backend", "torch", "--no-compile", "--eval-every", "500", "--checkpoint-every",
              "100000", "--flush-every", "100", "--seed", "0"]


def train(data: str, out: Path) -> None:
    for attention in ATTENTIONS:
        run_dir = out / attention
        command = [sys.executable, "-m", "moe_trace", "train", *TRAIN_ARGS, "--attention", attention,
                   "--data", data, "--out", str(run_dir)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        (run_dir / "train.log").write_text(result.stdout)


def val_loss(run_dir: Path) -> float:
    match = re.search(r"val loss ([0-9.]+)", (run_dir / "train.log").read_text())
    if match is None:
        raise ValueError(f"{run_dir / 'train.log'} has no 'val loss' summary line")
    return float(match.group(1))


def compare(out: Path) -> dict:
    runs = {a: out / a for a in ATTENTIONS}
    loaded = {a: trace.load(d) for a, d in runs.items()}
    metrics = {a: trace.load_metrics(d / "metrics.parquet") for a, d in runs.items()}
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": json.loads((runs["sdpa"] / "config.json").read_text()), "runs": {}, "load": {}}
    for a in ATTENTIONS:
        step_time = metrics[a]["step_time_s"][100:]  # past compilation and allocator warm-up
        result["runs"][a] = {"val_loss": val_loss(runs[a]),
                             "train_loss_last_100": float(metrics[a]["loss"][-100:].mean()),
                             "median_step_s": float(np.median(step_time)),
                             "tokens_per_s": float(metrics[a]["tokens"][0] / np.median(step_time))}
    int8, sdpa = result["runs"]["int8"], result["runs"]["sdpa"]
    result["val_loss_rel_diff"] = int8["val_loss"] / sdpa["val_loss"] - 1
    result["step_time_ratio_int8_over_sdpa"] = int8["median_step_s"] / sdpa["median_step_s"]
    for window in (100, 1000):
        stats = {a: report.windowed_stats(t.proportions(), t.steps, window) for a, t in loaded.items()}
        result["load"][f"window_{window}"] = {
            "mean_wape_int8_vs_sdpa": float(report.load_distance(stats["int8"], stats["sdpa"]).mean()),
            "self_drift_sdpa": float(np.nanmean(report.window_drift(stats["sdpa"]))),
            "self_drift_int8": float(np.nanmean(report.window_drift(stats["int8"]))),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_training"))
    parser.add_argument("--data", help="token ids for both runs (train mode)")
    parser.add_argument("--analyse-only", type=Path, help="compare the runs already in this directory")
    args = parser.parse_args()
    out = args.analyse_only or args.out
    if args.analyse_only is None:
        train(args.data, out)
    result = compare(out)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
