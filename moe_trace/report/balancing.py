"""The balancing study (issue 14): runs of one model that differ only in how the router balances load, read
from ``ROOT/<method>/`` (``benchmarks/balancing_study.py`` writes them) and compared side by side with
:mod:`moe_trace.report.compare`.

The study's runs are short (minutes of one GPU), so the analysis scales the evaluation protocol and the phase
rule to the run length while keeping the defaults' proportions: the defaults (horizons 1000 and 2000 steps,
origins every 250 steps after 1000, ``sw_avg`` window 1000, ``linear`` window 2000, ARIMA on 100-step blocks
of the last 5000 steps) become horizons ``H`` and ``2H`` with ``H`` a tenth of the run, origins every ``H/4``
after ``H``, ``sw_avg`` window ``H``, ``linear`` window ``2H``, ARIMA on ``H/10``-step blocks of the last
``5H``; ``auto`` keeps its own candidates. The phase rule's block is a fiftieth of the run (at least 10 steps)
instead of 100 steps, so a run of a thousand steps has enough blocks to show a stable phase.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from moe_trace.errors import UsageError
from moe_trace.report.analysis import Analysis, Cluster, Protocol
from moe_trace.report.compare import analyse_runs
from moe_trace.report.runs import Run, load_run

# The study's runs, as directory names under the study root, in display order.
METHODS = ("aux", "aux_free", "seq_aux", "none", "capacity")
DEFAULT_CLUSTER = Cluster()  # report's default: 8 GPUs, one spare expert slot per GPU


def study_runs(root: str | os.PathLike, methods: Sequence[str] = METHODS) -> list[Run]:
    """The runs of ``methods`` found under ``root`` (missing ones are skipped), named by method."""
    root = Path(root)
    runs = [load_run(root / method, name=method) for method in methods if (root / method / "trace").is_dir()]
    if not runs:
        raise UsageError(f"{root} holds none of the study's runs ({', '.join(f'{m}/' for m in methods)})")
    return runs


def study_protocol(n_steps: int) -> Protocol:
    """The evaluation protocol scaled to a run of ``n_steps`` (module docstring)."""
    horizon = max(10, n_steps // 10)
    block = max(1, horizon // 10)
    predictors = ("auto", f"sw_avg:window={horizon}",
                  f"arima:block={block}:history={5 * horizon}:refit_every={5 * horizon}",
                  f"linear:window={2 * horizon}")
    return Protocol(predictors=predictors, horizons=(horizon, 2 * horizon), stride=max(1, horizon // 4),
                    min_history=horizon)


def study_phase_block(n_steps: int) -> int:
    """The phase rule's block for a run of ``n_steps``: a fiftieth of it, at least 10 steps."""
    return max(10, n_steps // 50)


def analyse_study(runs: Sequence[Run], cluster: Cluster | None = DEFAULT_CLUSTER, predict: bool = True,
                  window: int | None = None) -> list[Analysis]:
    """Analyse the study's runs with one window, the scaled protocol and phase block (module docstring);
    ``cluster=None`` skips the placement replay, ``predict=False`` the predictor evaluation."""
    n_steps = min(len(run.trace) for run in runs)
    return analyse_runs(runs, window, study_protocol(n_steps) if predict else None, cluster,
                        study_phase_block(n_steps))
