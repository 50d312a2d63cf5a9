"""``moe-trace train``: train a GPT-MoE preset and record its per-step expert load."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

from moe_trace.errors import UsageError

# moe_trace.model.PRESETS, without importing torch
PRESET_NAMES = ("gpt-tiny-moe", "gpt-125m-moe", "gpt-350m-moe", "gpt-125m-moe-fine", "gpt-350m-moe-fine")
HF_PREFIX = "hf:"  # moe_trace.integrations.hf.PREFIX, without torch
HF_BASE_PRESET = "gpt-tiny-moe"  # the sizes an hf:<family> model starts from before overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a GPT-MoE model and record per-step expert load",
                              description="Train a GPT-MoE preset; writes OUT/trace/, OUT/metrics.parquet, "
                                          "OUT/config.json and OUT/checkpoints/.")
    p.add_argument("--model", help=f"preset: {', '.join(PRESET_NAMES)}, or hf:<family> for a transformers MoE "
                                   "architecture (hf:olmoe, hf:deepseek_v3, ...; random init at gpt-tiny-moe's size "
                                   "unless overridden) (not needed with --resume)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with its saved settings "
                        "(only --steps, --device and --profile may change)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--data", help="text file, directory of text files, or token ids (.bin uint16 / .npy); "
                                  "default: this Python installation's source files")
    p.add_argument("--corpus-mb", type=float, help="size cap of the default corpus (default 8, or 128 for "
                                                   "GPT-2-sized vocabularies; 0: every source file of the "
                                                   "installation, the tokenizer learnt on the first 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--attention", choices=("auto", "int8", "sdpa"), default="auto")
    p.add_argument("--moe-backend", choices=("auto", "torch", "megablocks"), default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for the torch backend on GPUs, where it trains "
                        "gpt-125m-moe 1.21x faster on an H100, expert parallel included; off on CPUs)")
    p.add_argument("--compile-mode", choices=("auto", "default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"), default=None,
                   help="torch.compile's mode; reduce-overhead replays the step as CUDA graphs, which auto (the "
                        "default) takes on one GPU with one micro-batch a step (measured 2-4 %% faster), else "
                        "torch's default")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core); "
                                               "1 is much faster on a machine shared with other jobs")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not write the expert-load trace")
    p.add_argument("--json", help="also write the run's summary (tokens/s, step, evaluation and checkpoint time, "
                                  "peak GPU memory, the optimizer used) as JSON to this file ('-': stdout)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write TensorBoard scalars there: loss, lr, grad norm, tokens/s, aux loss, and per MoE "
                        "layer the load imbalance (max/mean expert load) and aux loss (GPT presets)")
    p.add_argument("--log-every", type=int, help="steps between TensorBoard scalars (default 10)")
    p.add_argument("--profile", metavar="START:STOP",
                   help="profile steps START..STOP-1 with torch.profiler into OUT/profile/: a Chrome trace "
                        "(trace.json, for ui.perfetto.dev) and the ops by device time (ops.txt); one per rank "
                        "under torchrun; allowed with --resume")

    model = p.add_argument_group("model (override the preset)")
    model.add_argument("--blocks", type=int, dest="n_blocks")
    model.add_argument("--hidden", type=int)
    model.add_argument("--heads", type=int)
    model.add_argument("--experts", type=int, dest="num_experts")
    model.add_argument("--top-k", type=int)
    model.add_argument("--moe-every", type=int)
    model.add_argument("--seq-len", type=int)
    model.add_argument("--vocab-size", type=int)
    model.add_argument("--lb-weight", type=float, dest="load_balancing_weight", help="load-balancing loss weight")
    model.add_argument("--z-loss-weight", type=float)
    model.add_argument("--expert-ffn", type=int, help="width of one routed expert (default: 4 x hidden)")

    router = p.add_argument_group("router variants")
    router.add_argument("--balance", choices=("aux", "seq_aux", "aux_free", "none"),
                        help="aux: the batch-level load-balancing loss (default); seq_aux: its per-sequence form; "
                             "aux_free: a per-expert selection bias stepped toward uniform load, no loss; "
                             "none: no balancing")
    router.add_argument("--bias-update-rate", type=float, help="aux_free bias step per optimizer step (default 1e-3)")
    router.add_argument("--score", choices=("softmax", "sigmoid"),
                        help="router scores (default softmax); sigmoid gates are normalised over the top-k")
    router.add_argument("--capacity-factor", type=float,
                        help="each expert takes at most ceil(C x tokens x k / experts) assignments per "
                             "micro-batch, in token order; the rest are dropped (default: dropless)")
    router.add_argument("--shared-experts", type=int, help="always-on experts beside the routed ones (default 0)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--global-batch", type=int, help="sequences per optimizer step (default: the preset's)")
    opt.add_argument("--micro-batch", type=int, help="sequences per forward on one rank")
    opt.add_argument("--optimizer", choices=CHOICES, default="auto",
                     help="adamw: float32 weights and AdamW state (16 bytes a parameter); adamw_bf16 (8) and "
                          "adamw8bit (~6): bf16 weights with stochastically rounded updates (adamw8bit: torchao, "
                          "CUDA); auto: the most exact one whose state fits the GPU")
    opt.add_argument("--lr", type=float)
    opt.add_argument("--warmup", type=int, help="warm-up steps")
    opt.add_argument("--eval-every", type=int)
    opt.add_argument("--checkpoint-every", type=int,
                     help="steps between checkpoints; 0: none, not even at the end (for state too large to write)")
    opt.add_argument("--flush-every", type=int, help="steps between trace part files")

    place = p.add_argument_group("expert placement (expert parallel, under torchrun)")
    place.add_argument("--placement", help="policy that places experts on the ranks, as moe-trace simulate replays "
                                           "it: static (default, the even sharding), history, predict, phase")
    place.add_argument("--redundant", type=int, help="spare expert slots over all ranks for copies of hot experts "
                                                     "(a multiple of the ranks; default 0)")
    place.add_argument("--replan-every", type=int, help="steps between re-plans (history 1000, predict 50, "
                                                        "phase 25 while loads move)")
    place.add_argument("--expert-exchange", choices=("auto", "counts", "padded"),
                       help="how MoE layers exchange tokens: counts (all-to-all sized from the counts read on the "
                            "host; a replicated expert's tokens water-filled over its copies) or padded (no host "
                            "read, the step compiles whole; ranks x the traffic; each copy an equal share); auto "
                            "(default): padded when compiled on 2-4 GPUs, where it was measured faster, else counts")
    place.add_argument("--ddp-bucket-mb", type=float,
                       help="gradient bucket size of the data-parallel (non-expert) parameters, MB (torch's "
                            "default 25), all-reduced after the backward (compiled, the step stays one graph)")
    # What --resume compares against to tell which settings the user changed.
    p.set_defaults(run=run, setting_defaults={f: p.get_default(f) for f in (*MODEL_FIELDS, *TRAIN_FIELDS)})


ROUTER_FIELDS = ("expert_ffn", "balance", "bias_update_rate", "score", "capacity_factor", "shared_experts")
MODEL_FIELDS = ("n_blocks", "hidden", "heads", "num_experts", "top_k", "moe_every", "seq_len", "vocab_size",
                "load_balancing_weight", "z_loss_weight", *ROUTER_FIELDS)
_OPTIONS = {"n_blocks": "--blocks", "num_experts": "--experts", "load_balancing_weight": "--lb-weight"}
TRAIN_FIELDS = ("steps", "global_batch", "micro_batch", "lr", "warmup", "eval_every", "checkpoint_every",
                "flush_every", "data", "corpus_mb", "optimizer", "compile_mode", "tensorboard", "log_every",
                "placement", "redundant", "replan_every", "expert_exchange", "ddp_bucket_mb")
CHOICES = ("auto", "adamw", "adamw_bf16", "adamw8bit")  # moe_trace.optim.CHOICES, without importing torch


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_trace import model as model_lib
    from moe_trace import train as train_lib

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)

    if args.resume:
        changed = [_option(name) for name, default in args.setting_defaults.items()
                   if name != "steps" and getattr(args, name) != default]
        if changed:
            raise UsageError(f"--resume continues the run with its saved settings; only --steps, --device and "
                             f"--profile may change (got {', '.join(changed)})")
        out = Path(args.out or f"runs/{args.model}")
        model_config, config = train_lib.read_run_config(out)
        if args.steps is not None:
            config = dataclasses.replace(config, steps=args.steps)
    else:
        if args.model is None:
            raise UsageError("--model is required (one of " + ", ".join(PRESET_NAMES) + ", or hf:<family>)")
        family = args.model.startswith(HF_PREFIX)
        if not family and args.model not in model_lib.PRESETS:
            raise UsageError(f"unknown model {args.model!r}; presets: {', '.join(model_lib.PRESETS)}, "
                             "or hf:<family> (a transformers MoE architecture)")
        if args.data is not None and not Path(args.data).exists():
            raise UsageError(f"--data {args.data}: no such file or directory")
        _check_sizes(args)
        overrides = {f: getattr(args, f) for f in MODEL_FIELDS}
        if family:
            _check_hf_overrides(args)
            # The family's own attention and experts run; the preset gives the sizes only.
            overrides.update(name=args.model, attention="sdpa", moe_backend="torch")
        else:
            overrides["moe_backend"] = _moe_backend(args.moe_backend, device)
        try:
            model_config = model_lib.make_config(HF_BASE_PRESET if family else args.model, **overrides)
        except ValueError as e:
            raise UsageError(str(e)) from None
        train_fields = {f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None}
        train_fields.setdefault("global_batch", model_config.global_batch)
        train_fields.setdefault("warmup", min(100, train_fields.get("steps", 1000) // 10))
        train_fields.setdefault("corpus_mb", 8.0 if model_config.vocab_size <= 8192 else 128.0)
        compile_model = (_default_compile(device, model_config) and not family) if args.compile is None \
            else args.compile
        config = train_lib.TrainConfig(out=args.out or f"runs/{args.model}", seed=args.seed, record=args.record,
                                       compile=compile_model, **train_fields)
    _check_positive(config)
    from moe_trace.profiling import parse_window

    config = dataclasses.replace(config, profile=parse_window(args.profile) if args.profile else None)
    if not args.resume:
        if model_config.name.startswith(HF_PREFIX):
            config = dataclasses.replace(config, attention_reason=f"{model_config.name} runs its own attention")
        else:
            model_config, config = _choose_attention(args.attention, device, model_config, config)
    if int(os.environ.get("RANK", 0)) == 0:  # the run's first line: which attention runs, and why
        print(f"attention {model_config.attention}" + (f" ({config.attention_reason})" if config.attention_reason
                                                        else ""), flush=True)

    build_model = model_lib.GPT
    if model_config.name.startswith(HF_PREFIX):
        from moe_trace.integrations import hf

        hf.check_family(model_config.name)
        build_model = hf.CausalLM
    summary = train_lib.train(model_config, config, device, resume=args.resume, build_model=build_model)
    if summary["rank"] != 0:
        return 0
    print(f"{model_config.name}: steps {summary['start_step']}..{summary['steps'] - 1}"
          f"{' (stopped early)' if summary['stopped_early'] else ''}, "
          f"{summary['tokens_per_s']:,.0f} tokens/s, final loss {summary['final_loss']:.3f}, "
          f"val loss {summary['val_loss']:.3f}, {summary['elapsed_s']:.0f} s")
    if summary["placement_plans"] is not None:
        plans = summary["placement_plans"]
        print(f"placement {config.placement}, {config.redundant} spare slots: plans from steps "
              f"{', '.join(map(str, plans[:8]))}{' ...' if len(plans) > 8 else ''} (placement.parquet)")
    written = ["trace/"] * config.record + ["metrics.parquet", "config.json"] + ["checkpoints/"] * bool(
        config.checkpoint_every) + ["placement.parquet"] * (summary["placement_plans"] is not None) + [
        "profile/"] * (Path(config.out, "profile").is_dir() and config.profile is not None)
    print("wrote " + ", ".join(f"{config.out}/{name}" for name in written))
    if args.json:
        text = json.dumps(summary, indent=2) + "\n"
        if args.json == "-":
            print(text, end="")
        else:
            Path(args.json).write_text(text)
    return 130 if summary["stopped_early"] else 0  # the shell's code for "interrupted", as the CLI uses


def _check_hf_overrides(args: argparse.Namespace) -> None:
    """Options a transformers family decides itself are refused rather than ignored."""
    refused = [flag for flag, given in (("--moe-every", args.moe_every is not None),
                                        ("--z-loss-weight", args.z_loss_weight is not None),
                                        ("--moe-backend", args.moe_backend != "auto"),
                                        ("--attention", args.attention != "auto"),
                                        *((f"--{f.replace('_', '-')}", getattr(args, f) is not None)
                                          for f in ROUTER_FIELDS)) if given]
    if refused:
        raise UsageError(f"{args.model}: {', '.join(refused)} apply to the GPT presets; the family decides "
                         "where its MoE blocks sit and runs its own attention, router and experts")


def _choose_attention(requested: str, device: str, model_config, config):  # -> (model.ModelConfig, TrainConfig)
    """``--attention`` resolved at the run's per-GPU attention shape (``auto`` measures; attention_choice says how)."""
    from moe_trace import attention_choice
    from moe_trace.train import micro_batch_size

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    shape = attention_choice.AttentionShape(micro_batch_size(model_config, config, world_size), model_config.heads,
                                            model_config.seq_len, model_config.hidden // model_config.heads)
    if device == "cuda":  # this rank's GPU (train() makes it the current device only later)
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    choice = attention_choice.choose_attention(requested, device, shape, world_size=world_size)
    return (dataclasses.replace(model_config, attention=choice.impl),
            dataclasses.replace(config, attention_reason=choice.reason))


def _moe_backend(requested: str, device: str) -> str:
    """``auto`` is the torch backend: 1.13x megablocks on gpt-125m-moe eager, 1.37x compiled (H100, bf16,
    benchmarks/results/train_throughput.json), and the one expert parallelism runs."""
    if requested != "megablocks":
        return "torch"
    if device != "cuda" or importlib.util.find_spec("megablocks") is None:
        raise UsageError("--moe-backend megablocks needs a CUDA GPU and the megablocks GPU extra "
                         "(pip install 'moe-trace[gpu]'); use --moe-backend torch")
    return "megablocks"


def _default_compile(device: str, model_config) -> bool:  # a model.ModelConfig
    """Compile where it was measured to help: the torch backend on GPUs (benchmarks/results/train_throughput.json),
    expert parallel too, where each MoE layer's exchange runs eager between compiled graphs
    (results/expert_parallel_scaling_x2.json: gpt-350m-moe --experts 32 on 2 H200s, 154.6k tokens/s compiled;
    results/expert_parallel_scaling.json: 140.9k eager, measured on another day)."""
    return device == "cuda" and model_config.moe_backend == "torch"


def _option(field: str) -> str:
    """The command-line option that sets a model or training field."""
    return _OPTIONS.get(field, f"--{field.replace('_', '-')}")


def _check_sizes(args: argparse.Namespace) -> None:
    """Model sizes given on the command line are positive (the model's own checks cover how they combine)."""
    for name in ("n_blocks", "hidden", "heads", "num_experts", "top_k", "moe_every", "seq_len", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"{_option(name)} must be positive, got {value}")


def _check_positive(config) -> None:  # a train.TrainConfig
    for name in ("steps", "global_batch", "eval_every", "checkpoint_every", "flush_every", "warmup", "log_every"):
        value = getattr(config, name)
        if value is None or value < (0 if name in ("warmup", "checkpoint_every") else 1):
            raise UsageError(f"{_option(name)} must be positive, got {value}")
    if config.micro_batch is not None and config.micro_batch < 1:
        raise UsageError(f"--micro-batch must be positive, got {config.micro_batch}")
    for name in ("lr", "ddp_bucket_mb"):
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{_option(name)} must be a positive number, got {value}")
    if not (math.isfinite(config.corpus_mb) and config.corpus_mb >= 0):
        raise UsageError(f"--corpus-mb must be 0 (no cap) or a positive number, got {config.corpus_mb}")
