"""INT8 vs SDPA attention through ``moe-trace train`` itself: steady-state tokens/s and loss parity.

    PYTHONPATH=. python benchmarks/attention_training.py [--quick] [--models gpt-125m-moe,gpt-350m-moe]
        [--steps 60] [--skip 20] [--parity-steps 2000] [--runs DIR] [--json FILE]
    PYTHONPATH=. python benchmarks/attention_training.py --auto-only [--models ...] [--json FILE]
    python benchmarks/attention_training.py --recheck [--json FILE]    # the goals of stored results, no GPU

Every figure comes from the real command line, run as a subprocess: ``moe-trace train --compile
--global-batch 8`` (16,384 tokens per step at the presets' sequence length 2048), ``--attention int8``
then ``--attention sdpa`` for each model, same seed and data, in one invocation (so one machine and one
software stack), sharing one TORCHINDUCTOR_CACHE_DIR. Models: gpt-125m-moe, and gpt-350m-moe with
``--experts 16`` (the 128-expert preset does not fit one GPU). Tokens/s is steady state: tokens per step over
the median ``step_time_s`` of the run's metrics.parquet past its first ``--skip`` steps (compilation,
autotuning, allocator warm-up).

Every run trains on the default corpus (the Python sources of this installation, ``--corpus-mb`` of them,
tokenized once into $MOE_TRACE_CACHE). Loss parity: gpt-125m-moe trains ``--parity-steps`` steps with each
attention; the goal is training_parity.py's, a final validation loss within 1 %. Those two runs also give
gpt-125m-moe's tokens/s. The JSON also holds what ``--attention auto`` chooses at each model's shape (its
measurement, cached per GPU and software stack) and whether that was the faster attention through the CLI.
``--quick``: gpt-125m-moe only, 300 parity steps. Writes benchmarks/results/attention_training.json (``--json``) with
the device, versions, date, the command and a ``goals`` block.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cli_runs
import training_parity

ATTENTIONS = ("int8", "sdpa")
MODELS = {"gpt-125m-moe": [], "gpt-350m-moe": ["--experts", "16"]}
PARITY_MODEL = "gpt-125m-moe"
COMMON_ARGS = ["--global-batch", "8", "--compile", "--moe-backend", "torch", "--seed", "0", "--checkpoint-every", "0",
               "--flush-every", "100"]
PARITY_ARGS = ["--lr", "6e-4"]  # with --warmup a quarter of the run, as the 2000-step runs before
SPEEDUP_GOAL, SPEEDUP_STRETCH = 1.0, 1.03
AUTO_MARGIN = 0.02  # moe_trace.attention_choice.MIN_SPEEDUP - 1, not imported: --recheck runs without torch
DEFAULT_JSON = Path(__file__).parent / "results" / "attention_training.json"


def train(model: str, attention: str, steps: int, run_dir: Path, env: dict, extra: list[str]) -> cli_runs.TrainRun:
    """One ``moe-trace train`` run of ``model`` with ``attention``."""
    return cli_runs.train(["--model", model, *MODELS[model], *COMMON_ARGS, "--attention", attention,
                           "--steps", str(steps), "--eval-every", str(steps), *extra], run_dir, env=env)


def steady_state(run: cli_runs.TrainRun, skip: int) -> dict:
    return {**run.steady_state(skip), "attention_line": run.line("attention "),
            "summary_line": run.line(f"{run.config['model']['name']}:"), "command": run.shown}


def auto_choice(model: str) -> dict:
    """What ``--attention auto`` picks at ``model``'s per-GPU shape (measured now, or read from the cache)."""
    import torch

    from moe_trace.attention_choice import AttentionShape, choose_attention
    from moe_trace.model import make_config

    config = make_config(model)
    shape = AttentionShape(8, config.heads, config.seq_len, config.hidden // config.heads)
    choice = choose_attention("auto", torch.device("cuda"), shape)
    return {"shape": str(shape), "impl": choice.impl, "reason": choice.reason}


def run_all(args: argparse.Namespace, runs: Path) -> dict:
    env = {**cli_runs.subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(runs / "inductor-cache")}
    results: dict = {"models": {}, "parity": None, "auto": {}}
    for model in args.models:
        results["auto"][model] = auto_choice(model)
        compare_losses = model == PARITY_MODEL and args.parity_steps > 0
        steps = args.parity_steps if compare_losses else args.steps
        extra = ["--corpus-mb", str(args.corpus_mb)]
        extra += [*PARITY_ARGS, "--warmup", str(steps // 4)] if compare_losses else ["--no-record"]
        model_runs = {a: train(model, a, steps, runs / f"{model}-{a}", env, extra) for a in ATTENTIONS}
        rates = {a: steady_state(r, args.skip) for a, r in model_runs.items()}
        results["models"][model] = {**rates, "int8_over_sdpa": rates["int8"]["tokens_per_s"] /
                                    rates["sdpa"]["tokens_per_s"]}
        if compare_losses:
            results["parity"] = parity(model, steps, model_runs)
    return results


def parity(model: str, steps: int, runs: dict[str, cli_runs.TrainRun]) -> dict:
    """The INT8 run's final validation loss against the SDPA run's (training_parity.py's comparison)."""
    losses = {a: run.summary["val_loss"] for a, run in runs.items()}
    return {"model": model, "steps": steps, "val_loss": losses,
            "val_loss_rel_diff": training_parity.val_loss_rel_diff(losses["sdpa"], losses["int8"]),
            "data": runs["sdpa"].config["data"]}


def goals(results: dict) -> list[dict]:
    """Issue 11's end-to-end goals against the results: met, or missed by how much."""
    checks = []
    for model, rates in results["models"].items():
        ratio = rates["int8_over_sdpa"]
        checks.append({"goal": f"int8 / sdpa tokens/s through moe-trace train, {model}", "target": SPEEDUP_GOAL,
                       "stretch": SPEEDUP_STRETCH, "measured": ratio, "met": ratio >= SPEEDUP_GOAL,
                       "stretch_met": ratio >= SPEEDUP_STRETCH})
        auto = results["auto"].get(model)
        if auto is not None:
            slower = "int8" if ratio < 1 else "sdpa"
            tie = abs(ratio - 1) < AUTO_MARGIN  # within the margin auto keeps sdpa for
            checks.append({"goal": f"--attention auto does not pick the slower attention, {model}",
                           "target": f"not {slower}" + (" (a tie: either)" if tie else ""),
                           "measured": auto["impl"], "met": tie or auto["impl"] != slower})
    parity = results["parity"]
    if parity is not None:
        checks.append(training_parity.val_loss_goal(parity["val_loss_rel_diff"],
                                                    f"validation loss, int8 vs sdpa after {parity['steps']} steps"))
    return checks


def environment() -> dict:
    import torch

    from moe_trace.attention.kernels import int8_kernel

    return {"device": cli_runs.device_name(), "int8_kernel": int8_kernel(torch.device("cuda"))[0],
            "versions": cli_runs.versions()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=60, help="steps of each throughput-only run")
    parser.add_argument("--skip", type=int, default=20, help="first steps of a run left out of its median")
    parser.add_argument("--parity-steps", type=int, default=2000,
                        help=f"steps of the {PARITY_MODEL} runs, whose validation losses are compared (0: none)")
    parser.add_argument("--corpus-mb", type=float, default=32,
                        help="size of the default corpus the runs train on (tokenizing it is the first run's start-up)")
    parser.add_argument("--quick", action="store_true", help=f"{PARITY_MODEL} only, 300 parity steps")
    parser.add_argument("--runs", type=Path, help="where the run directories go (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--auto-only", action="store_true",
                        help="only what --attention auto picks at each model's shape (no training)")
    parser.add_argument("--recheck", action="store_true", help="recompute the goals of --json's results")
    args = parser.parse_args()
    if args.recheck:
        result = json.loads(args.json.read_text())
        result["goals"] = goals(result["results"])
    else:
        if args.quick:
            args.models, args.parity_steps = PARITY_MODEL, min(args.parity_steps, 300)
        args.models = args.models.split(",")
        unknown = set(args.models) - set(MODELS)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
        if args.auto_only:
            results = {"models": {}, "parity": None, "auto": {model: auto_choice(model) for model in args.models}}
        else:
            with tempfile.TemporaryDirectory() as tmp:
                runs = args.runs or Path(tmp)
                runs.mkdir(parents=True, exist_ok=True)
                results = run_all(args, runs)
        result = {**environment(), "date": cli_runs.now(), "command": cli_runs.command_line(), "results": results,
                  "goals": goals(results)}
    cli_runs.write_json(args.json, result)
    for model, auto in result["results"]["auto"].items():
        print(f"--attention auto, {model}: {auto['impl']} ({auto['reason']})")
    for check in result["goals"]:
        print(f"{'MET ' if check['met'] else 'MISS'} {check['goal']}: {check['measured']} (target {check['target']})")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
