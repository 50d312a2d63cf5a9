"""Our load predictors beside the expert-load-prediction paper's figures (arXiv 2404.16914), with our protocol.

    python benchmarks/paper_comparison.py [--traces traces/gpt-125m-moe traces/gpt-350m-moe]
        [--out benchmarks/results/paper_comparison.json]

The paper reports, for its GPT-3 125M base (16 experts), a sliding-window average error of about 0.25 % and
ARIMA(5,1,5) about 0.5 %; for its 350M base (128 experts) a sliding-window average of 1.3 % over the next 1000
steps and 1.7-1.8 % over the next 2000, ARIMA 1.4 %. It gives no formula for its error (ANCHORS.md). For each
trace this runs ``moe-trace predict`` with the sliding-window average (window 1000), ARIMA of order (5,1,5) and
``auto`` at horizons 1000 and 2000, and writes both of our errors beside the paper's figure for the trace's
model: ``step_wape`` (per step, the kind of figure the paper plots) with its noise floor ``step_floor``, and
``mean_wape`` (the horizon mean, what placement uses), over the stable phase and over all origins.

The papers train at 256 x 2048 = 524k tokens a step. A trace at 16k tokens a step has about sqrt(32) = 5.7 times
their per-step noise, which ``step_floor`` (the error no forecast can beat) carries: its ``step_wape`` cannot be
compared with the paper's, and the JSON says so per trace. The paper-batch traces of issue 17 can.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cli_runs

from moe_trace import trace

ROOT = cli_runs.ROOT
PAPER_TOKENS_PER_STEP = 256 * 2048
HORIZONS = (1000, 2000)
PREDICTORS = {"sliding-window average": "sw_avg:window=1000", "ARIMA(5,1,5)": "arima:order=(5,1,5)",
              "auto": "auto"}
# The paper's figures by our preset standing for its model: {predictor: {horizon: error}} (ANCHORS.md).
PAPER = {
    "gpt-125m-moe": {"sliding-window average": {1000: 0.0025}, "ARIMA(5,1,5)": {1000: 0.005}},
    "gpt-350m-moe": {"sliding-window average": {1000: 0.013, 2000: 0.0175}, "ARIMA(5,1,5)": {1000: 0.014}},
}


def compare(trace_dir: Path) -> dict:
    """The trace's errors at ``HORIZONS`` under our protocol, with the paper's figure where it gives one."""
    loaded = trace.load(trace_dir)
    model, tokens = loaded.meta.get("model"), int(loaded.meta["tokens_per_step"])
    command = [sys.executable, "-m", "moe_trace", "predict", str(trace_dir), "--predictors",
               ",".join(PREDICTORS.values()), "--horizons", *map(str, HORIZONS), "--json", "-"]
    done = cli_runs.run_checked(command)
    records = [r for r in json.loads(done.stdout) if r["layer"] == "all" and r["phase"] in ("stable", "all")]
    name_of = {spec: name for name, spec in PREDICTORS.items()}
    rows = [{"predictor": name_of[r["predictor"]], "spec": r["predictor"], "horizon": r["horizon"],
             "phase": r["phase"], "step_wape": r["step_wape"], "step_floor": r["step_floor"],
             "mean_wape": r["mean_wape"], "n_origins": r["n_origins"],
             "paper": PAPER.get(model, {}).get(name_of[r["predictor"]], {}).get(r["horizon"])} for r in records]
    return {"trace": str(trace_dir.relative_to(ROOT) if trace_dir.is_relative_to(ROOT) else trace_dir),
            "model": model, "steps": len(loaded), "tokens_per_step": tokens,
            "noise_vs_paper": (PAPER_TOKENS_PER_STEP / tokens) ** 0.5,
            "comparable": tokens == PAPER_TOKENS_PER_STEP,
            "predict_command": cli_runs.shown(command), "note": done.stderr.strip() or None, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=Path, nargs="+",
                        default=[ROOT / "traces" / "gpt-125m-moe", ROOT / "traces" / "gpt-350m-moe"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "paper_comparison.json")
    args = parser.parse_args()
    traces = [compare(path.resolve()) for path in args.traces]
    cli_runs.write_json(args.out, {"benchmark": __doc__.split("\n")[0], **cli_runs.header(cuda=False),
                                   "paper": "arXiv 2404.16914", "paper_tokens_per_step": PAPER_TOKENS_PER_STEP,
                                   "traces": traces})
    for t in traces:
        for r in t["rows"]:
            paper = "" if r["paper"] is None else f"  paper {r['paper']:.2%}"
            print(f"{t['model']:<14} {r['predictor']:<24} H={r['horizon']:<5} {r['phase']:<7} step_wape "
                  f"{r['step_wape']:.2%} (floor {r['step_floor']:.2%})  mean_wape {r['mean_wape']:.2%}{paper}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
