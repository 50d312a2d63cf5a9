"""Speed of the predictor evaluation (issue 5): a 20000-step x 12-layer x 128-expert synthetic trace.

Goals on 2 CPU cores: sw_avg, ema and linear at both horizons (1000, 2000) in under 30 s together; the
full set including arima in under 10 minutes. Also measures what one ARIMA series costs: the estimation
(order selection excluded) and the filter + forecast that every origin between estimations pays.
Besides wall time it records CPU seconds (this process and its worker processes): on a machine shared
with other work, CPU seconds / 2 estimates the wall time on 2 idle cores.

    python benchmarks/predict_speed.py [--out benchmarks/results/predict_speed.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

FAST = ("sw_avg", "ema", "linear")
SLOW = ("arima", "auto")


def per_series_arima_cost(p: np.ndarray, n_series: int = 24) -> dict[str, float]:
    """Median seconds per series: estimation of the default order, and the filter + 2000-step forecast."""
    import predictors

    fit_s, forecast_s = [], []
    for i in range(n_series):
        series = p[:, i % p.shape[1], i % p.shape[2]][:, None]
        model = predictors.get("arima", order=(1, 0, 1), refit_every=5000)
        start = time.perf_counter()
        model.fit(series[:10000])
        fit_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.predict(2000)
        forecast_s.append(time.perf_counter() - start)
    return {"estimate_s": float(np.median(fit_s)), "filter_and_forecast_s": float(np.median(forecast_s)),
            "block": 100, "points_per_series": 50, "order": [1, 0, 1]}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--predictors", default=",".join(FAST + SLOW))
    parser.add_argument("--out", default="benchmarks/results/predict_speed.json")
    args = parser.parse_args()

    import pandas
    import sklearn
    import statsmodels

    from moe_trace import synth
    from predictors import evaluate

    counts, _ = synth.generate(layers=args.layers, experts=args.experts, steps=args.steps, switch_step=5000)
    p = counts / counts.sum(axis=2, keepdims=True)
    timings, cpu = {}, {}
    for spec in args.predictors.split(","):
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        evaluate.evaluate(p, spec, [1000, 2000])
        timings[spec], cpu[spec] = time.perf_counter() - start, _cpu_seconds() - cpu_start
        print(f"{spec}: {timings[spec]:.1f} s wall, {cpu[spec]:.1f} CPU s", flush=True)
    fast = sum(timings.get(s, 0.0) for s in FAST)
    result = {
        "benchmark": "predict_speed", "command": shlex.join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "load_average_at_end": os.getloadavg(),  # other work on the machine slows every figure
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "pandas": pandas.__version__,
                     "scikit-learn": sklearn.__version__, "statsmodels": statsmodels.__version__},
        "trace": {"steps": args.steps, "layers": args.layers, "experts": args.experts},
        "protocol": {"horizons": [1000, 2000], "stride": 250, "min_history": 1000},
        "seconds": timings,
        "cpu_seconds": cpu,
        "fast_set_cpu_s": sum(cpu.get(s, 0.0) for s in FAST), "full_set_cpu_s": sum(cpu.values()),
        "fast_set_s": fast, "fast_set_goal_s": 30.0, "fast_set_met": fast < 30.0,
        "full_set_s": sum(timings.values()), "full_set_goal_s": 600.0, "full_set_met": sum(timings.values()) < 600,
        "arima_per_series": per_series_arima_cost(p),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
