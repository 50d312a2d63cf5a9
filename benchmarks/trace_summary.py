"""The figures traces/README.md states about each committed trace, recomputed from the trace's own files (CPU).

Per trace directory: its steps and shape, from ``trace/``; median step time, train loss at the start and the end
and the settled aux loss, from ``metrics.parquet``; and per layer where ``moe-trace phases`` finds the stable
phase. Wall time and validation loss are not in those files (the run printed them), so they are not here.

    python benchmarks/trace_summary.py [--out benchmarks/results/trace_summary.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

TRACES = ("traces/gpt-125m-moe", "traces/gpt-350m-moe", "traces/hf-olmoe")


def summarise(path: str) -> dict:
    from moe_trace import trace
    from predictors.phases import stable_from

    recorded = trace.load(path)
    metrics = trace.load_metrics(Path(path) / "metrics.parquet")
    step_s = float(np.median(metrics["step_time_s"]))
    starts = stable_from(recorded.proportions())
    return dict(
        trace=path, first_step=int(recorded.steps[0]), last_step=int(recorded.steps[-1]),
        steps=len(recorded.steps), moe_layers=recorded.counts.shape[1], experts=recorded.counts.shape[2],
        top_k=recorded.meta["top_k"], tokens_per_step=int(metrics["tokens"][0]),
        median_step_s=step_s, tokens_per_s_at_median_step=float(metrics["tokens"][0] / step_s),
        train_loss_first_10=float(metrics["loss"][:10].mean()),
        train_loss_last_100=float(metrics["loss"][-100:].mean()),
        aux_loss_last_1000=float(metrics["aux_loss"][-1000:].mean()),
        stable_from=starts, layers_never_stable=sum(s is None for s in starts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/trace_summary.json")
    args = parser.parse_args()
    result = dict(benchmark="figures of the committed traces", command=shlex.join(["python", *sys.argv]),
                  date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  versions={"python": platform.python_version(), "numpy": np.__version__},
                  traces=[summarise(path) for path in TRACES])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["traces"], indent=1))


if __name__ == "__main__":
    main()
