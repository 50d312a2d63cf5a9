"""How far the phase rule (predictors/phases.py) lands from a known transient -> stable switch (CPU).

Synthetic traces (``moe_trace.synth``: skewed, drifting expert loads until ``switch_step``, constant mean after it,
per-sequence routing correlation) over a grid of switch steps (the rule answers in multiples of its 100-step
blocks, so the switch's offset within a block matters), drift strengths and seeds, at the shape of
``traces/gpt-125m-moe`` (16 experts, top-1, 16384 tokens per step). Per (trace, layer) the error is the detected
``stable_from`` minus the true switch; a layer found never stable is a miss. Also counts the false calls on
traces without a switch (stable from step 0) and with one at their very end (never stable).

    python benchmarks/phase_detection.py [--out benchmarks/results/phase_detection.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SWITCHES = (1030, 1500, 2750, 3579, 4321)  # offsets 30, 0, 50, 79, 21 within a 100-step block
DRIFTS = (0.2, 0.5, 1.0)
SEEDS = (0, 1, 2, 3)
LAYERS, EXPERTS, AFTER = 3, 16, 5000  # each trace runs AFTER steps past its switch


def _proportions(**kw) -> np.ndarray:
    from moe_trace import synth

    counts, _ = synth.generate(layers=LAYERS, experts=EXPERTS, **kw)
    return counts / counts.sum(axis=2, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/phase_detection.json")
    args = parser.parse_args()
    import ruptures

    from predictors import phases

    started = time.perf_counter()
    cases = []
    for switch, drift, seed in itertools.product(SWITCHES, DRIFTS, SEEDS):
        found = phases.stable_from(_proportions(steps=switch + AFTER, switch_step=switch, drift=drift, seed=seed))
        cases.append(dict(switch_step=switch, drift=drift, seed=seed, stable_from=found))
    errors = np.array([s - c["switch_step"] for c in cases for s in c["stable_from"] if s is not None])
    missed = sum(s is None for c in cases for s in c["stable_from"])
    # Without a transient every layer should be stable from 0; with the switch at the end, none should be.
    no_switch = [phases.stable_from(_proportions(steps=AFTER, switch_step=None, seed=seed)) for seed in SEEDS]
    no_stable = [phases.stable_from(_proportions(steps=AFTER, switch_step=AFTER, seed=seed)) for seed in SEEDS]
    summary = dict(
        layers_scored=len(errors) + missed, missed=missed,
        mean_abs_error_steps=float(np.abs(errors).mean()), median_abs_error_steps=float(np.median(np.abs(errors))),
        max_abs_error_steps=int(np.abs(errors).max()), mean_signed_error_steps=float(errors.mean()),
        mean_abs_error_by_drift={str(d): float(np.mean([abs(s - c["switch_step"]) for c in cases if c["drift"] == d
                                                       for s in c["stable_from"] if s is not None]))
                                 for d in DRIFTS},
        no_switch_layers_not_stable_from_0=sum(s != 0 for found in no_switch for s in found),
        switch_at_end_layers_called_stable=sum(s is not None for found in no_stable for s in found))
    result = dict(
        benchmark="phase detection error on synthetic switches", command=shlex.join(["python", *sys.argv]),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=platform.processor() or "cpu",
        versions={"python": platform.python_version(), "numpy": np.__version__, "ruptures": ruptures.__version__},
        trace=dict(layers=LAYERS, experts=EXPERTS, top_k=1, tokens_per_step=16384, steps_after_switch=AFTER,
                   switch_steps=list(SWITCHES), drifts=list(DRIFTS), seeds=list(SEEDS)),
        rule="predictors.phases.stable_from defaults (block 100, lag 5, threshold 1.5, penalty 2, min_stable 1000)",
        summary=summary, cases=cases, no_switch=no_switch, switch_at_end=no_stable,
        goals=[dict(goal="every layer's detected start within 300 steps of the switch (tests/test_phases.py)",
                    target=300, measured=summary["max_abs_error_steps"], met=summary["max_abs_error_steps"] <= 300
                    and missed == 0)],
        wall_s=round(time.perf_counter() - started, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
