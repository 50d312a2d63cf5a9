"""``moe-trace import``: other tools' expert-load logs (Megatron-LM, SGLang) as schema-1 traces."""

from __future__ import annotations

import argparse
import sys

from moe_trace.errors import UsageError

FORMATS = {
    "megatron": "Megatron-LM --save-tokens-per-expert-interval: SRC/tokens_per_expert/rank*.jsonl",
    "megatron-routing": "Megatron-LM --moe-routing-trace-path: SRC/router_trace_rank*.jsonl",
    "sglang": "SGLang --expert-distribution-recorder-mode stat: expert_distribution_recorder_*.pt (file or folder)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import", help="convert Megatron-LM or SGLang expert-load logs into a trace",
        description="Convert another tool's expert-load logs into a schema-1 trace. Formats: "
                    + "; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    p.add_argument("format", choices=list(FORMATS))
    p.add_argument("src", help="the folder (or SGLang .pt file) the tool wrote")
    p.add_argument("--out", required=True, help="trace to write (a new folder, or a file ending .parquet)")
    p.add_argument("--top-k", type=int, help="experts per token (megatron, sglang: their logs do not say; "
                                             "megatron-routing reads it)")
    p.add_argument("--experts", type=int, help="experts per MoE layer, checked against the logs "
                                               "(megatron-routing: default highest id seen + 1)")
    p.add_argument("--ep-size", type=int, default=1, help="megatron: expert-parallel size (default 1)")
    p.add_argument("--etp-size", type=int, default=1, help="megatron: expert-tensor-parallel size (default 1)")
    p.add_argument("--pp-size", type=int, default=1, help="megatron*: pipeline-parallel size (default 1)")
    p.add_argument("--num-layers", type=int, help="megatron*: transformer blocks in the model (default: "
                                                  "pp-size x (highest layer seen in a stage + 1))")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, for the metadata (default: unknown)")
    p.add_argument("--model", help="model name for the metadata (default: the format)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from moe_trace.integrations import imported, megatron, sglang

    for name in ("top_k", "experts", "ep_size", "etp_size", "pp_size", "num_layers", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.format != "megatron-routing" and args.top_k is None:
        raise UsageError(f"--top-k is needed: {args.format} logs do not record how many experts each token chose")
    if args.format == "megatron":
        result = megatron.read_tokens_per_expert(args.src, top_k=args.top_k, ep_size=args.ep_size,
                                                 pp_size=args.pp_size, etp_size=args.etp_size,
                                                 experts=args.experts, num_layers=args.num_layers)
    elif args.format == "megatron-routing":
        result = megatron.read_router_trace(args.src, pp_size=args.pp_size, experts=args.experts,
                                            num_layers=args.num_layers)
    else:
        result = sglang.read_expert_distribution(args.src, top_k=args.top_k, experts=args.experts)
    for warning in result.warnings:
        print(f"moe-trace import: warning: {warning}", file=sys.stderr)
    path = imported.write_trace(result, args.out, args.model or args.format, args.seq_len)
    steps, layers, experts = result.counts.shape
    print(f"{path}: {steps} steps x {layers} MoE layers {result.layers} x {experts} experts "
          f"(steps {result.steps[0]}..{result.steps[-1]}, top-{result.top_k})")
    return 0
