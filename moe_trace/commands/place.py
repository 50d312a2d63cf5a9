"""``moe-trace place TRACE --gpus G --at STEP``: the expert placement a planner picks for one step."""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_trace.commands.simulate import HELP_COST, add_cluster_arguments, make_setting
from placement.formats import FORMATS  # numpy only


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "place", help="print the expert placement planned for one step",
        description="Plan expert placement for step STEP from the mean load of the WINDOW steps before it "
                    "(as EPLB does) and print, per layer and GPU, the experts hosted (* = replicated), with "
                    "the imbalance those steps would have had under the plan and under the static one.",
        epilog=HELP_COST)
    add_cluster_arguments(p)
    p.add_argument("--at", type=int, required=True, help="trace step the plan is for")
    p.add_argument("--window", type=int, default=1000, help="steps of history to plan from (default: %(default)s)")
    p.add_argument("--format", default="table", choices=FORMATS,
                   help="table: per layer and GPU, printed; eplb: DeepSeek EPLB's phy2log, log2phy and logcnt; "
                        "sglang: the dict SGLang's --init-expert-location reads (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="write the plan here (eplb, sglang: .json, or .pt for torch tensors; table: the text)")
    p.add_argument("--num-hidden-layers", type=int, default=None,
                   help="transformer blocks of the served model, for --format sglang (default: the trace's model)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from moe_trace import trace
    from moe_trace.commands._common import write_json
    from moe_trace.errors import UsageError
    from placement.dispatch import gpu_tokens, imbalance

    loaded = trace.load(args.trace)
    setting = make_setting(loaded.meta, args)
    at = int(np.searchsorted(loaded.steps, args.at))
    if not 0 < at < len(loaded) or loaded.steps[at] != args.at:
        raise UsageError(f"--at {args.at} must be a recorded step after the first "
                         f"({int(loaded.steps[0])} < STEP <= {int(loaded.steps[-1])})")
    if args.window < 1:
        raise UsageError(f"--window must be >= 1, got {args.window}")
    history = slice(max(0, at - args.window), at)
    plan = setting.plan(loaded.proportions()[history].mean(axis=0))
    static = setting.initial(*loaded.counts.shape[1:])
    tokens = {name: gpu_tokens(loaded.counts[history], p, setting.dispatch) for name, p in (("plan", plan),
                                                                                         ("static", static))}
    imb = {name: imbalance(t).mean(axis=0) for name, t in tokens.items()}
    step_s = {name: float(setting.cost.step_time_s(t.max(axis=-1), setting.gpus, plan.slots_per_gpu).mean())
              for name, t in tokens.items()}

    if args.format != "table":
        write_plan(plan, setting.redundant, loaded.meta, args)
        return 0
    blocks = plan.slot_expert.reshape(len(loaded.layers), setting.gpus, -1)
    layers, lines = [], []
    for li, block_index in enumerate(loaded.layers):
        gpus = [[int(e) for e in slots if e >= 0] for slots in blocks[li]]
        layers.append({"layer": block_index, "gpus": gpus, "replicas": plan.replicas[li].tolist(),
                       "history_imbalance": float(imb["plan"][li]), "static_imbalance": float(imb["static"][li])})
        lines.append(f"layer {block_index}: mean imbalance over steps {int(loaded.steps[history][0])}.."
                     f"{int(loaded.steps[at - 1])}: {imb['plan'][li]:.3f} planned, {imb['static'][li]:.3f} static")
        for g, experts in enumerate(gpus):
            marked = " ".join(f"{e}{'*' if plan.replicas[li, e] > 1 else ''}" for e in experts)
            lines.append(f"  gpu {g:>4}: {marked}")
    lines.append(f"estimated step time over those steps: {1e3 * step_s['plan']:.2f} ms planned, "
                 f"{1e3 * step_s['static']:.2f} ms static (cost model {setting.cost.name})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    elif args.json != "-":
        print("\n".join(lines))
    write_json(args.json, {"step": args.at, "gpus": setting.gpus, "redundant": setting.redundant,
                           "slots_per_gpu": plan.slots_per_gpu, "planner": setting.planner,
                           "window": args.window, "est_step_time_s": step_s, "cost_model": setting.cost.name,
                           "layers": layers})
    return 0


def write_plan(plan, redundant: int, meta: dict, args: argparse.Namespace) -> None:
    """The plan in EPLB's or SGLang's format, to ``--out``; the SGLang flags it needs are printed."""
    from moe_trace.errors import UsageError
    from placement import formats
    from placement.cost import PRESET_SHAPES

    if not args.out:
        raise UsageError(f"--format {args.format} needs --out FILE (.json or .pt)")
    if args.format == "eplb":
        arrays = formats.eplb_arrays(plan)
    else:
        blocks = args.num_hidden_layers or meta.get("n_blocks") or PRESET_SHAPES.get(meta.get("model"), (0, 0))[1]
        if not blocks:
            raise UsageError(f"the trace's model {meta.get('model')!r} does not say how many transformer blocks it "
                             "has; pass --num-hidden-layers")
        arrays = formats.sglang_dict(plan, list(meta["moe_layers"]), int(blocks))
    path = formats.write(arrays, args.out)
    shapes = ", ".join(f"{name} {list(a.shape)}" for name, a in arrays.items())
    print(f"wrote {path}: {shapes}, int64")
    if args.format == "sglang":
        print(f"serve with: --ep-size {plan.gpus} --ep-num-redundant-experts {redundant} "
              f"--init-expert-location {path}")
