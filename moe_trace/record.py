"""Record the expert load of any MoE model: ``record.attach(model, out_dir)`` finds its MoE layers.

What it hooks, per layer kind:

* this project's MoE layers (:class:`moe_trace.moe.MoELayer`, its expert-parallel shard and the megablocks
  layer): a forward hook adds the layer's own ``tokens_per_expert`` vector (and, under a capacity limit,
  ``dropped_per_expert``: the trace's ``dropped`` column);
* transformers >= 5 MoE families (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...): every experts
  module is called as ``forward(hidden, top_k_index, top_k_weights)`` (GPT-OSS: ``router_indices``), so a
  forward pre-hook sees the experts the router really selected (DeepSeek-V3's bias-corrected,
  group-limited choice included, which recomputing a top-k from the logits would get wrong);
* Llama 4, whose experts take dense input: a forward hook on the router takes the top-k of its logits
  (the same ``topk`` call on the same tensor as the router's own).

Counting stays on the device (:class:`moe_trace.recorder.Recorder`: ``scatter_add_``, no host sync per
step). Forwards are counted in training mode only (``count_eval=True`` counts inference too), and never
while autograd runs a backward: activation checkpointing re-runs forwards there, and those tokens were
counted already. The expert count comes from the config, not the module (under transformers' expert
parallelism an experts module holds only its rank's experts but sees global ids); ids outside
``0..experts-1`` (padding sentinels) are dropped. Every token position the model is given is counted,
padding positions included, so each row sums to ``tokens * top_k``.

Counts are summed over the micro-batches of a step and, when ``torch.distributed`` is initialised, over
the ranks of ``group`` (default: all): pass the data-parallel group when tensor-parallel ranks share a batch.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_trace import trace
from moe_trace.logs import TensorBoardLog
from moe_trace.moe import MoELayer
from moe_trace.moe_megablocks import MegablocksMoELayer
from moe_trace.recorder import Recorder, is_distributed

EXPERT_ID_ARGUMENTS = ("top_k_index", "router_indices")  # the experts' forward argument holding selected ids
ROUTER_LOGITS_OUTPUT = {"Llama4Router": 1}  # routers hooked instead of dense-input experts: logits' output slot
NUM_EXPERTS_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k", "moe_k")


@dataclass(frozen=True)
class MoESite:
    """Where one MoE layer's routing decision can be seen."""

    name: str  # module path
    block: int  # transformer block index
    module: nn.Module
    kind: str  # "counts" (layer keeps tokens_per_expert), "ids" (experts' input), "router" (router's logits)
    argument: str | None = None  # "ids": the forward argument with the expert ids
    position: int | None = None  # "ids": its position among the positional arguments


def find_moe_layers(model: nn.Module) -> list[MoESite]:
    """The MoE layers of ``model`` in block order (raises ``ValueError`` if there are none)."""
    sites = []
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, (MoELayer, MegablocksMoELayer)):
            sites.append(MoESite(name, _block_index(name, len(sites)), module, "counts"))
        elif type(module).__name__ in ROUTER_LOGITS_OUTPUT:
            sites.append(MoESite(name, _block_index(name, len(sites)), module, "router"))
        elif (found := _expert_id_argument(module)) is not None:
            sites.append(MoESite(name, _block_index(name, len(sites)), module, "ids", *found))
    if not sites:
        raise ValueError(f"found no MoE layer in {type(model).__name__}: neither moe_trace MoE layers nor "
                         f"experts modules taking {' or '.join(EXPERT_ID_ARGUMENTS)}")
    blocks = [s.block for s in sites]
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"several MoE layers in one block: {[s.name for s in sites]}")
    return sorted(sites, key=lambda s: s.block)


def model_meta(model: nn.Module, sites: list[MoESite]) -> dict[str, Any]:
    """What the model's config says: experts, top-k, MoE block indices, hidden size, blocks, model name."""
    config = _config(model)
    num_experts = _first_attr(config, NUM_EXPERTS_KEYS)
    top_k = _first_attr(config, TOP_K_KEYS)
    first = sites[0].module
    if num_experts is None:  # no config: this project's layers know the global count
        num_experts = getattr(first, "num_experts", None)
    if top_k is None:
        top_k = getattr(first, "top_k", None)
    if num_experts is None or top_k is None:
        raise ValueError(f"{type(model).__name__}: cannot tell the number of experts and top-k from its config; "
                         "pass meta={'num_experts': E, 'top_k': K}")
    name = getattr(config, "name", None) or getattr(config, "model_type", None) or type(_unwrap(model)).__name__
    return {"model": name, "num_experts": int(num_experts), "top_k": int(top_k),
            "moe_layers": [s.block for s in sites],
            "hidden": _first_attr(config, ("hidden_size", "hidden", "d_model")),
            "n_blocks": _first_attr(config, ("num_hidden_layers", "n_blocks", "num_layers")),
            "moe_backend": getattr(config, "moe_backend", None) or "transformers",
            "attention": getattr(config, "attention", None) or getattr(config, "_attn_implementation", None)}


def attach(model: nn.Module, out_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None,
           tensorboard: str | os.PathLike | TensorBoardLog | None = None, *, block: int = 25,
           flush_every: int | None = 100,
           log_every: int = 1, count_eval: bool = False, write: bool | None = None,
           group: dist.ProcessGroup | None = None) -> Recorder:
    """Hook ``model``'s MoE layers; the returned recorder writes ``out_dir/trace/`` (schema 1).

    Call ``recorder.step(step)`` after each optimizer step and ``recorder.close()`` at the end. ``meta``
    adds to or overrides the metadata read from the config (``tokens_per_step``, ``seq_len`` and
    ``global_batch`` default to what the first step's inputs show). ``block`` steps reach the host at once,
    a part file is written every ``flush_every`` steps (``None``: only at ``flush``/``close``).
    ``tensorboard=DIR`` logs each MoE layer's load imbalance (max/mean of its expert counts) every
    ``log_every`` steps there, as ``load_imbalance/block_<b>`` (a :class:`TensorBoardLog` may be passed
    instead, to share its writer); the values reach the host with the recorder's blocks, so this adds no
    sync. ``write`` defaults to rank 0 of ``group``.
    """
    sites = find_moe_layers(model)
    fields = {**model_meta(model, sites), "seed": None, "tokens_per_step": None, "seq_len": None,
              "global_batch": None, "world_size": dist.get_world_size(group) if is_distributed(group) else 1,
              **(meta or {})}
    if write is None:
        write = not is_distributed(group) or dist.get_rank(group) == 0
    device = next(_unwrap(model).parameters()).device
    board = None
    if write and tensorboard is not None:
        board = tensorboard if isinstance(tensorboard, TensorBoardLog) else TensorBoardLog(tensorboard, log_every)
    # This project's layers with a capacity limit report what it dropped: the trace's `dropped` column.
    drops = any(getattr(getattr(site.module, "settings", None), "capacity_factor", None) is not None
                for site in sites)
    recorder = Recorder(Path(out_dir) / "trace", trace.make_meta(**fields), device, block=block, write=write,
                        group=group, flush_every=flush_every, dropped=drops,
                        on_block=(lambda steps, counts: board.add_load(steps, counts, fields["moe_layers"]))
                        if board is not None else None)
    if board is not None:
        recorder.on_close(board.close)
    for layer, site in enumerate(sites):
        handle = _hook(site, recorder.layer_index(layer), recorder, count_eval)
        recorder.on_close(handle.remove)
    if any(fields[k] is None for k in ("tokens_per_step", "seq_len", "global_batch")):
        handle = _unwrap(model).register_forward_pre_hook(_input_observer(recorder, count_eval), with_kwargs=True)
        recorder.on_close(handle.remove)
    return recorder


# ---------------------------------------------------------------------------------------------------


def _counts_now(module: nn.Module, recorder: Recorder, count_eval: bool) -> bool:
    if not recorder.enabled or not (module.training or count_eval):
        return False
    # Inside a backward pass (graph task id set) a forward is activation checkpointing's recomputation.
    # Compiled graphs never re-run Python hooks there, and dynamo cannot trace the query, so skip it then.
    return torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1


def _hook(site: MoESite, layer: torch.Tensor, recorder: Recorder,
          count_eval: bool) -> torch.utils.hooks.RemovableHandle:
    module = site.module
    if site.kind == "counts":
        def after_forward(module: nn.Module, args: Any, output: Any) -> None:
            if _counts_now(module, recorder, count_eval):
                recorder.add_counts(layer, module.tokens_per_expert)
                if recorder.records_dropped:
                    recorder.add_dropped(layer, module.dropped_per_expert)

        return module.register_forward_hook(after_forward)
    if site.kind == "router":
        slot = ROUTER_LOGITS_OUTPUT[type(module).__name__]

        def after_router(module: nn.Module, args: Any, output: Any) -> None:
            if _counts_now(module, recorder, count_eval):
                recorder.add_expert_ids(layer, output[slot].topk(module.top_k, dim=-1).indices)

        return module.register_forward_hook(after_router)

    def before_experts(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _counts_now(module, recorder, count_eval):
            ids = kwargs[site.argument] if site.argument in kwargs else args[site.position]
            recorder.add_expert_ids(layer, ids)

    return module.register_forward_pre_hook(before_experts, with_kwargs=True)


def _input_observer(recorder: Recorder, count_eval: bool) -> Callable:
    """Reads the token ids' shape (host-side, no sync) to fill tokens_per_step, seq_len and global_batch."""
    def observe(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and _counts_now(module, recorder, count_eval):
            recorder.add_sequences(*ids.shape)

    return observe


def _expert_id_argument(module: nn.Module) -> tuple[str, int] | None:
    forward = type(module).forward
    if forward is nn.Module.forward or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        return None
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for argument in EXPERT_ID_ARGUMENTS:
        if argument in parameters:
            return argument, parameters.index(argument)
    return None


def _block_index(name: str, fallback: int) -> int:
    """The transformer block a module belongs to: the first integer in its path (``model.layers.3.mlp``)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else fallback


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP/FSDP's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else None)
        if inner is None:
            return model
        model = inner


def _config(model: nn.Module) -> Any:
    config = getattr(_unwrap(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _first_attr(config: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return None
