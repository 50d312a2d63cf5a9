"""Plans in the formats other systems load: DeepSeek EPLB's arrays and SGLang's ``--init-expert-location`` dict.

Read from their sources (deepseek-ai/EPLB ``eplb.py``; sgl-project/sglang ``python/sglang/srt/eplb/
expert_location.py``):

* EPLB's ``rebalance_experts`` returns, per MoE layer, int64 ``phy2log [layers, replicas]`` (the logical expert
  of each physical slot; slot ``p`` lives on GPU ``p // (replicas / gpus)``), ``log2phy [layers, experts, max
  copies]`` (each expert's physical slots, padded with -1 to the most copies any expert has in any layer) and
  ``logcnt [layers, experts]`` (copies per expert). Here an expert's slots are listed in ascending order.
* SGLang's ``--init-expert-location FILE`` (``.json`` or ``.pt``) passes the file's dict as keyword arguments to
  ``ExpertLocationMetadata.init_by_mapping``, so the dict holds exactly one key, ``physical_to_logical_map``:
  ``[num_hidden_layers, experts + redundant]``, one row per transformer block, dense blocks included, the MoE
  rows at their block index. SGLang builds a logical -> physical map from every row, so dense rows must hold
  valid expert ids too: they hold SGLang's own trivial map (slot ``p`` hosts expert ``p % experts``), which
  no dense block ever reads. The server must run with ``--ep-size GPUS --ep-num-redundant-experts R``.

Both need every slot filled (``experts + redundant`` a multiple of the GPUs). ``.pt`` files are written with
torch, imported only then; everything else is numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from placement.planners import PlacementError, Plan

FORMATS = ("table", "eplb", "sglang")


def eplb_arrays(plan: Plan) -> dict[str, np.ndarray]:
    """``phy2log``, ``log2phy`` and ``logcnt`` (int64) of a plan whose slots are all filled."""
    phy2log = _filled(plan)
    layers, experts = plan.replicas.shape
    logcnt = np.zeros((layers, experts), dtype=np.int64)
    rows = np.repeat(np.arange(layers), phy2log.shape[1])
    np.add.at(logcnt, (rows, phy2log.ravel()), 1)
    log2phy = np.full((layers, experts, int(logcnt.max())), -1, dtype=np.int64)
    # Slots in ascending order within each (layer, expert): a stable sort by expert keeps slot order.
    order = np.argsort(phy2log, axis=1, kind="stable")
    expert_sorted = np.take_along_axis(phy2log, order, axis=1)
    first_of_expert = np.concatenate([np.zeros((layers, 1), np.int64), np.cumsum(logcnt, axis=1)[:, :-1]], axis=1)
    copy = np.arange(phy2log.shape[1])[None, :] - np.take_along_axis(first_of_expert, expert_sorted, axis=1)
    log2phy[rows, expert_sorted.ravel(), copy.ravel()] = order.ravel()
    return {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt}


def sglang_dict(plan: Plan, moe_layers: list[int], num_hidden_layers: int) -> dict[str, np.ndarray]:
    """SGLang's ``{"physical_to_logical_map": int64 [num_hidden_layers, slots]}``: MoE layer ``i`` of the plan at
    row ``moe_layers[i]``, every other row the trivial map ``slot % experts``."""
    phy2log = _filled(plan)
    if len(moe_layers) != len(phy2log):
        raise PlacementError(f"the plan has {len(phy2log)} MoE layers but {len(moe_layers)} block indices were given")
    if not moe_layers or min(moe_layers) < 0 or max(moe_layers) >= num_hidden_layers:
        raise PlacementError(f"MoE blocks {moe_layers} do not lie within {num_hidden_layers} hidden layers")
    mapping = np.broadcast_to(np.arange(phy2log.shape[1]) % plan.num_experts, (num_hidden_layers, phy2log.shape[1]))
    mapping = mapping.astype(np.int64)
    mapping[moe_layers] = phy2log
    return {"physical_to_logical_map": mapping}


def write(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write ``arrays`` as JSON (nested lists) or, for a ``.pt`` path, as a dict of int64 torch tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        import torch  # only here: placement imports no torch otherwise

        torch.save({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}, path)
    else:
        path.write_text(json.dumps({name: a.tolist() for name, a in arrays.items()}) + "\n")
    return path


def _filled(plan: Plan) -> np.ndarray:
    if (plan.slot_expert < 0).any():
        raise PlacementError(f"the plan leaves slots empty ({plan.num_experts} experts and "
                             f"{int(plan.replicas[0].sum()) - plan.num_experts} redundant copies in "
                             f"{plan.slot_expert.shape[1]} slots); EPLB and SGLang need experts + redundant to be a "
                             f"multiple of the {plan.gpus} GPUs")
    return plan.slot_expert.astype(np.int64)
