"""Expert placement: planners (pure functions over numpy arrays), dispatcher rules, re-planning policies and
the trace-replay simulator. Imports no torch; reads traces only through ``moe_trace.trace``.

    from placement import plan, simulate, Setting, CostModel, get_policies
    p = plan(loads, gpus=8, redundant=8)              # loads[layers, experts] -> Plan (EPLB-style)
    records = simulate(counts, get_policies("all"), Setting(8, 8, CostModel.from_meta(meta)))
"""

from placement.cost import CostModel
from placement.dispatch import gpu_tokens, imbalance
from placement.planners import PLANNERS, PlacementError, Plan, plan
from placement.policies import POLICIES, Setting
from placement.policies import get as get_policies
from placement.simulator import replay, simulate

__all__ = ["PLANNERS", "POLICIES", "CostModel", "PlacementError", "Plan", "Setting", "get_policies", "gpu_tokens",
           "imbalance", "plan", "replay", "simulate"]
