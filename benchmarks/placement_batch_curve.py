"""Step time the ``phase`` placement policy saves against tokens per step, from the reference traces resampled.

The reference traces were recorded at 16k tokens per step; the papers train at 512k (256 x 2048). A step's
expert loads at another batch size are drawn here, step by step and layer by layer, around the trace's smoothed
proportions (a centred mean over ``--smooth`` steps): a resampling, not a recording. It keeps the trace's drift
and phases and redraws its per-step noise in one of two ways:

* ``multinomial``: ``tokens x top_k`` independent draws. Real routing is far burstier (a sequence's tokens pick
  alike): on the 16k traces the per-step variance of the counts around the smoothed load is 76-155 times the
  multinomial's, per layer. So this noise is far below the real one;
* ``overdispersed``: a Dirichlet-multinomial whose variance is ``c`` times the multinomial's, ``c`` measured per
  layer on the recorded trace; at 16k tokens it reproduces the trace's noise, and it shrinks as 1/tokens as if
  sequences routed independently of each other.

The ``16k (recorded)`` rows replay the trace itself. Each trace is replayed (``placement.simulator``) under
``static``, ``history`` and ``phase`` with one spare expert slot per GPU and the cost model named in the output
(default: the shipped measured calibration). gpt-125m-moe has 16 experts: it runs on 8 GPUs only (expert
parallelism over 32 GPUs would leave half of them without an expert); gpt-350m-moe runs on 8 and 32.

    python benchmarks/placement_batch_curve.py --jobs 3          # placement_batch_curve.json and .png
    python benchmarks/placement_batch_curve.py --cost linear --tokens 16384 131072 524288 --multinomial-tokens \
        --jobs 2 --out benchmarks/results/placement_batch_curve_linear.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
CASES = (("gpt-125m-moe", 8), ("gpt-350m-moe", 8), ("gpt-350m-moe", 32))
TOKENS = (16384, 65536, 131072, 262144, 524288)
MULTINOMIAL_TOKENS = (16384, 524288)  # the noise-free reference at both ends
POLICIES = "static,history,phase"


def smoothed_proportions(props: np.ndarray, window: int) -> np.ndarray:
    """Centred mean of ``props[steps, layers, experts]`` over ``window`` steps (shorter at the ends)."""
    import pandas as pd

    flat = pd.DataFrame(props.reshape(len(props), -1))
    return flat.rolling(window, center=True, min_periods=1).mean().to_numpy().reshape(props.shape)


def burstiness(counts: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """Per layer, the variance of ``counts`` around ``tokens x smooth`` over the multinomial's: ``[layers]``."""
    n = counts.sum(axis=-1, keepdims=True)
    expected = n * smooth
    return ((counts - expected) ** 2).sum(axis=(0, 2)) / (expected * (1 - smooth)).sum(axis=(0, 2))


def resample(smooth: np.ndarray, assignments: int, seed: int, overdispersion: np.ndarray | None = None
             ) -> np.ndarray:
    """int64 counts ``[steps, layers, experts]`` of ``assignments`` per step and layer around ``smooth``.

    ``overdispersion[layers]`` (``c`` > 1): each step's proportions are first drawn from a Dirichlet of
    concentration ``(n - c) / (c - 1)``, which makes the counts' variance ``c`` times the multinomial's.
    """
    rng = np.random.default_rng(seed)
    p = smooth / smooth.sum(axis=-1, keepdims=True)
    if overdispersion is not None:
        c = np.clip(overdispersion, 1 + 1e-9, assignments - 1e-9)[None, :, None]
        p = rng.gamma(p * (assignments - c) / (c - 1))  # Dirichlet by normalised gammas
        p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    return rng.multinomial(assignments, p)


def run_case(model: str, gpus: int, tokens: int | None, cost_spec: str | None, smooth_window: int,
             seed: int, noise: str = "overdispersed") -> dict:
    """Replay one trace (``tokens=None``: as recorded; else resampled with ``noise``) on ``gpus`` GPUs."""
    from moe_trace import trace
    from placement import calibration, policies, simulator
    from placement.cost import CostModel

    loaded = trace.load(ROOT / "traces" / model)
    meta = dict(loaded.meta)
    if tokens is None:  # the recorded trace itself
        counts, label = loaded.counts, f"{meta['tokens_per_step'] // 1024}k (recorded)"
        tokens = int(meta["tokens_per_step"])
    else:
        smooth = smoothed_proportions(loaded.proportions(), smooth_window)
        c = burstiness(loaded.counts, smooth) if noise == "overdispersed" else None
        counts = resample(smooth, tokens * int(meta["top_k"]), seed, c)
        label = f"{tokens // 1024}k ({noise})"
        meta["tokens_per_step"] = tokens
    setting = policies.Setting(gpus=gpus, redundant=gpus,
                               cost=CostModel.from_meta(meta, calibration.resolve(cost_spec)))
    stable_from = simulator.whole_model_stable_from(counts / counts.sum(axis=-1, keepdims=True))
    started = time.perf_counter()
    records = simulator.simulate(counts, policies.get(POLICIES), setting, stable_from=stable_from)
    by_policy = {r["policy"]: r for r in records}
    static_s = by_policy["static"]["est_step_time_s"]
    per_layer_tokens = tokens * int(meta["top_k"]) / gpus
    relative = {name: by_policy[name]["step_time_vs_static"] for name in ("phase", "history")}
    print(f"{model} {gpus:>2} GPUs {label:>20}: static {1e3 * static_s:8.2f} ms, phase {relative['phase']:.3f}x, "
          f"history {relative['history']:.3f}x ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"model": model, "gpus": gpus, "redundant": gpus, "tokens_per_step": tokens, "label": label,
            "noise": "recorded" if "recorded" in label else noise, "mean_tokens_per_gpu_per_layer": per_layer_tokens,
            "stable_from": stable_from, "cost_model": setting.cost.name,
            "saved_by_phase": 1 - by_policy["phase"]["step_time_vs_static"],
            "saved_by_history": 1 - by_policy["history"]["step_time_vs_static"],
            "records": records}


def plot(results: list[dict], path: Path, cost_model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_trace.report import OKABE_ITO

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (model, gpus) in enumerate(CASES):
        colour = OKABE_ITO[i]
        for noise, style in (("overdispersed", "-"), ("multinomial", ":")):
            rows = sorted((r for r in results if r["model"] == model and r["gpus"] == gpus and r["noise"] == noise),
                          key=lambda r: r["tokens_per_step"])
            if rows:
                ax.plot([r["tokens_per_step"] for r in rows], [100 * r["saved_by_phase"] for r in rows],
                        marker="o" if style == "-" else ".", linestyle=style, color=colour,
                        label=f"{model}, {gpus} GPUs, {noise} noise")
        for r in results:
            if r["model"] == model and r["gpus"] == gpus and r["noise"] == "recorded":
                ax.plot(r["tokens_per_step"], 100 * r["saved_by_phase"], marker="*", markersize=12, color=colour,
                        linestyle="none")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(TOKENS), [f"{t // 1024}k" for t in TOKENS])
    ax.set_xlabel("tokens per step (resampled from the 16k-token traces; star: the recorded trace itself)")
    ax.set_ylabel("est. step time saved by phase vs static (%)")
    ax.set_title(f"What placement buys against batch size\n(cost model: {cost_model})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", default=None, help="measured, linear or a calibration file (default: measured "
                                                     "where shipped, else linear)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--smooth", type=int, default=100, help="steps in the centred mean of the proportions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multinomial-tokens", type=int, nargs="*", default=list(MULTINOMIAL_TOKENS),
                        help="batch sizes also resampled with multinomial noise")
    parser.add_argument("--jobs", type=int, default=1, help="replays run at once (processes)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "placement_batch_curve.json"))
    args = parser.parse_args()

    runs = [(model, gpus, None, "recorded") for model, gpus in CASES]
    runs += [(model, gpus, tokens, "overdispersed") for model, gpus in CASES for tokens in args.tokens]
    runs += [(model, gpus, tokens, "multinomial") for model, gpus in CASES for tokens in args.multinomial_tokens]
    with ProcessPoolExecutor(args.jobs) as pool:  # each run replays a whole trace: independent, CPU-bound
        results = list(pool.map(run_case, *zip(*[(m, g, t, args.cost, args.smooth, args.seed, n)
                                                   for m, g, t, n in runs], strict=True)))
    noise_order = ("recorded", "overdispersed", "multinomial")
    results.sort(key=lambda r: (CASES.index((r["model"], r["gpus"])), noise_order.index(r["noise"]),
                                r["tokens_per_step"]))
    cost_model = results[0]["cost_model"].split(" (")[0]
    payload = {"what": __doc__.split("\n\n")[0],
               "resampling": " ".join(__doc__.split("\n\n")[1:3]).replace("\n", " "),
               "cost_model": cost_model, "policies": POLICIES, "smooth_steps": args.smooth, "seed": args.seed,
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["python", *sys.argv]), "python": platform.python_version(),
               "machine": platform.processor() or platform.machine(), "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    plot(results, out.with_suffix(".png"), cost_model)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(table(results))


def table(results: list[dict]) -> str:
    """Markdown: per case, batch size and noise, the static step time and what phase and history save."""
    lines = ["| model | GPUs | tokens/step | per-step noise | tokens per GPU per MoE layer | static step | "
             "phase saves | history saves |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        static = next(x for x in r["records"] if x["policy"] == "static")
        lines.append(f"| {r['model']} | {r['gpus']} | {r['tokens_per_step'] // 1024}k | {r['noise']} | "
                     f"{r['mean_tokens_per_gpu_per_layer']:.0f} | {1e3 * static['est_step_time_s']:.2f} ms | "
                     f"{100 * r['saved_by_phase']:.1f} % | {100 * r['saved_by_history']:.1f} % |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
