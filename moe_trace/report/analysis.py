"""One run's analysis: compute the numbers once (phases, spread, predictor errors, placement replay), then
draw, tabulate or write them (``moe-trace report``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_trace.errors import UsageError
from moe_trace.report.figures import (
    plot_imbalance,
    plot_loss,
    plot_predictor_error,
    plot_proportion_heatmaps,
    plot_window_stats,
    whole_model_stable,
)
from moe_trace.report.runs import Run
from moe_trace.report.stats import WindowStats, default_window, windowed_stats
from moe_trace.report.style import save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from predictors.evaluate import Scores


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as a GitHub Markdown table (numbers to 4 significant digits)."""
    if not rows:
        return ""
    columns = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


DEFAULT_PREDICTORS = ("sw_avg:window=100", "sw_avg:window=1000", "ema:halflife=300")
PHASE_BLOCK = 100  # steps per block of the phase rule: predictors.phases.stable_from's default


@dataclass(frozen=True)
class Protocol:
    """The evaluation protocol's parameters (DESIGN.md): which predictors, how far ahead, how often."""

    predictors: tuple[str, ...] = DEFAULT_PREDICTORS
    horizons: tuple[int, ...] = (1000, 2000)
    stride: int = 250
    min_history: int = 1000


@dataclass(frozen=True)
class Cluster:
    """The simulated cluster for the placement figures (``redundant=None``: one spare expert slot per GPU)."""

    gpus: int = 8
    redundant: int | None = None
    policies: str = "all"
    cost: str | None = None  # --cost: measured, linear or a calibration file (None: placement's default)

    @property
    def spare_slots(self) -> int:
        return (self.gpus if self.gpus > 1 else 0) if self.redundant is None else self.redundant


@dataclass
class Analysis:
    """Everything the figures and the findings table of one run need.

    Steps here are row indices of the trace, which equal optimizer steps for a complete run (the trace
    holds every step from 0 exactly once); the predictors' origins and ``stable_from`` use the same indices.
    """

    run: Run
    stats: WindowStats
    stable_from: list[int | None] | None = None  # per layer, from predictors.phases; None: never stable
    predictor_scores: dict[str, dict[int, Scores]] | None = None  # spec -> horizon -> per-origin errors
    cluster: Cluster | None = None
    placement: dict[str, dict[str, np.ndarray]] | None = None  # policy -> placement.simulator.replay outcome


def analyse(run: Run, window: int | None = None, protocol: Protocol | None = Protocol(),
            cluster: Cluster | None = Cluster(), phase_block: int = PHASE_BLOCK) -> Analysis:
    """Compute the numbers behind every figure of ``run``; ``protocol=None`` skips the predictor
    evaluation, ``cluster=None`` the placement replay. ``phase_block`` is the phase rule's block length
    (``predictors.phases.stable_from``): shorter blocks let a short run show its phases."""
    from predictors.phases import stable_from

    window = window or default_window(len(run.trace))
    analysis = Analysis(run=run, stats=windowed_stats(run.proportions, run.trace.steps, window), cluster=cluster,
                        stable_from=stable_from(run.proportions, block=phase_block))
    if protocol is not None:
        analysis.predictor_scores = evaluate_predictors(run.proportions, protocol)
    if cluster is not None:
        analysis.placement = replay_policies(run, cluster)
    return analysis


def _setting(run: Run, cluster: Cluster):
    from placement import calibration
    from placement.cost import CostModel
    from placement.planners import even_slots_per_gpu
    from placement.policies import Setting

    even_slots_per_gpu(int(run.trace.meta["num_experts"]), cluster.gpus, cluster.spare_slots)
    cost = CostModel.from_meta(run.trace.meta, calibration.resolve(cluster.cost))
    return Setting(gpus=cluster.gpus, redundant=cluster.spare_slots, cost=cost)


def replay_policies(run: Run, cluster: Cluster) -> dict[str, dict[str, np.ndarray]]:
    """Per-step outcome (imbalance, step time, migrations) of every policy, from ``placement``'s simulator."""
    from placement.policies import get
    from placement.simulator import replay_policies

    return replay_policies(run.trace.counts, get(cluster.policies), _setting(run, cluster))


def evaluate_predictors(p: np.ndarray, protocol: Protocol) -> dict[str, dict[int, Scores]]:
    """Per-origin errors of every predictor in ``protocol`` (``predictors.evaluate`` does the work)."""
    from predictors import evaluate

    longest = max(protocol.horizons)
    if not len(evaluate.origins(len(p), longest, protocol.stride, protocol.min_history)):
        raise UsageError(f"the trace has {len(p)} steps, too few for a {longest}-step horizon after "
                         f"{protocol.min_history} steps of history; pass shorter --horizons or --min-history")
    try:
        return {spec: evaluate.evaluate(p, spec, protocol.horizons, protocol.stride, protocol.min_history)
                for spec in protocol.predictors}
    except ValueError as e:  # an unknown predictor or a bad parameter in a spec
        raise UsageError(str(e)) from None


def figures(analysis: Analysis) -> dict[str, Figure]:
    """Every figure of the report, by file stem, in reading order (the loss only if metrics exist)."""
    run, stats = analysis.run, analysis.stats
    out: dict[str, Figure] = {}
    if run.metrics is not None:
        out["loss"] = plot_loss(run.metrics)
    out["load_heatmap"] = plot_proportion_heatmaps(run, analysis.stable_from)
    out["load_spread"] = plot_window_stats(stats, run.layer_labels(), analysis.stable_from)
    if analysis.predictor_scores:
        out["predictor_error"] = plot_predictor_error(analysis.predictor_scores, analysis.stable_from)
    if analysis.placement:
        cluster = analysis.cluster
        out["placement_imbalance"] = plot_imbalance(
            analysis.placement, run.trace.steps, stats.window, analysis.stable_from,
            f"{cluster.gpus} GPUs, {cluster.spare_slots} spare slots")
    return out


def findings(analysis: Analysis) -> list[dict[str, Any]]:
    """The run's findings in numbers: rows of ``{"finding", "value"}``."""
    run, stats = analysis.run, analysis.stats
    meta, counts = run.trace.meta, run.trace.counts
    rows = [
        ("steps recorded", f"{len(run.trace)} (steps {run.trace.steps[0]}–{run.trace.steps[-1]})"),
        ("MoE layers x experts, top-k", f"{counts.shape[1]} x {counts.shape[2]}, top-{meta['top_k']}"),
        ("tokens per step", f"{meta['tokens_per_step']}"),
    ]
    if run.metrics is not None:
        loss = run.metrics["loss"]
        edge = max(1, len(loss) // 100)
        rows.append(("training loss, first → last 1 % of steps",
                     f"{np.mean(loss[:edge]):.3f} → {np.mean(loss[-edge:]):.3f}"))
    if analysis.stable_from is not None:
        rows.append(("stable phase starts at step (per layer; – = never)",
                     ", ".join("–" if s is None else str(s) for s in analysis.stable_from)))
    rows += _spread_by_phase(analysis) or [
        (f"windowed variance of proportion, first → last {stats.window}-step window (mean of layers)",
         f"{stats.variance[0].mean():.2e} → {stats.variance[-1].mean():.2e}")]
    rows.append((f"heaviest / mean expert load, last {stats.window} steps (per layer)",
                 ", ".join(f"{s:.2f}" for s in stats.skew[-1])))
    rows += _predictor_findings(analysis)
    rows += _placement_findings(analysis)
    return [{"finding": f, "value": v} for f, v in rows]


def placement_table(analysis: Analysis) -> list[dict[str, Any]]:
    """DESIGN.md's ``simulate`` figures per policy and phase (all, and transient/stable split where every
    layer stabilises), with the estimated step time relative to static."""
    from placement.simulator import policy_records

    if not analysis.placement:
        return []
    rows = []
    setting = _setting(analysis.run, analysis.cluster)
    for record in policy_records(analysis.placement, setting, whole_model_stable(analysis.stable_from)):
        common = {k: record[k] for k in ("policy", "gpus", "redundant")}
        figures = {k: v for k, v in record.items() if k not in common and k != "phases"}
        rows.append({**common, "phase": "all", **figures})
        rows += [{**common, "phase": phase, **figures} for phase, figures in record.get("phases", {}).items()]
    phase_order = {"all": 0, "transient": 1, "stable": 2}
    return sorted(rows, key=lambda row: phase_order[row["phase"]])


def _placement_findings(analysis: Analysis) -> list[tuple[str, str]]:
    """Per phase, the best policy a real job can run (not the oracle) against static and the oracle."""
    rows = []
    table = placement_table(analysis)
    if table:
        rows.append(("placement step time from (cost model)", table[0]["cost_model"]))
    for phase in ("all", "transient", "stable"):
        by_policy = {r["policy"]: r for r in table if r["phase"] == phase}
        real = [r for name, r in by_policy.items() if name != "oracle"]
        if not real or "static" not in by_policy:
            continue
        best = min(real, key=lambda r: r["est_step_time_s"])
        text = (f"{best['policy']}: step time {best['step_time_vs_static']:.3f}x static, "
                f"imbalance mean {best['mean_imbalance']:.3f} (static {by_policy['static']['mean_imbalance']:.3f})")
        if "oracle" in by_policy:
            text += f"; oracle {by_policy['oracle']['step_time_vs_static']:.3f}x"
        rows.append((f"best placement policy, {phase} steps ({best['gpus']} GPUs + {best['redundant']} spare slots)",
                     text))
    return rows


def _spread_by_phase(analysis: Analysis) -> list[tuple[str, str]]:
    """Mean windowed variance of windows wholly before vs wholly after each layer's stable start."""
    stats = analysis.stats
    before, after = [], []
    for li, start in enumerate(analysis.stable_from or ()):
        if start is None:
            continue
        ends = stats.starts + stats.window
        if (ends <= start).any() and (stats.starts >= start).any():
            before.append(stats.variance[ends <= start, li].mean())
            after.append(stats.variance[stats.starts >= start, li].mean())
    if not before:
        return []
    ratio = np.mean(before) / np.mean(after)
    return [(f"windowed variance, transient / stable phase (mean of {len(before)} layers)",
             f"{np.mean(before):.2e} / {np.mean(after):.2e} = {ratio:.1f}x")]


def predictor_table(analysis: Analysis) -> list[dict[str, Any]]:
    """DESIGN.md's ``predict`` records (predictor x horizon x phase) plus the ratio ``step_wape / step_floor``."""
    from predictors.evaluate import records

    stable_from = analysis.stable_from or [None] * len(analysis.run.trace.layers)
    rows = [r for spec, scores in (analysis.predictor_scores or {}).items()
            for r in records(spec, scores, stable_from)]
    return [{**r, "ratio": r["step_wape"] / r["step_floor"]} for r in rows]


def _predictor_findings(analysis: Analysis) -> list[tuple[str, str]]:
    """Per horizon and phase, the predictor with the lowest ``mean_wape`` and how close it gets to the floor."""
    table = predictor_table(analysis)
    rows = []
    for horizon in sorted({r["horizon"] for r in table}):
        for phase in ("transient", "stable"):
            candidates = [r for r in table if r["horizon"] == horizon and r["phase"] == phase]
            if candidates:
                best = min(candidates, key=lambda r: r["mean_wape"])
                rows.append((f"best predictor of the next {horizon} steps, {phase} phase ({best['n_origins']} origins)",
                             f"{best['predictor']}: mean_wape {100 * best['mean_wape']:.2f} %, "
                             f"step_wape / floor {best['ratio']:.3f}"))
    return rows


def write_report(analysis: Analysis, out_dir: str | os.PathLike) -> list[Path]:
    """Save every figure as ``<name>.png`` and a ``summary.md`` listing them with the findings; return paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [save(fig, out_dir / f"{name}.png") for name, fig in figures(analysis).items()]
    run = analysis.run
    lines = [f"# moe-trace report: {run.name}", "",
             f"Trace: `{run.path}` (model {run.trace.meta['model']}, seed {run.trace.meta['seed']}).", "",
             "## Findings", "", markdown_table(findings(analysis)), ""]
    predictor_rows = [{k: r[k] for k in ("predictor", "horizon", "phase", "step_wape", "step_floor", "ratio",
                                         "mean_wape", "n_origins")} for r in predictor_table(analysis)]
    placement_rows = [{k: r[k] for k in ("policy", "phase", "mean_imbalance", "p99_imbalance", "migrations",
                                         "moved_bytes", "step_time_vs_static") if k in r}
                      for r in placement_table(analysis)]
    for title, rows in (("Predictors (DESIGN.md protocol; errors as fractions)", predictor_rows),
                        ("Placement (simulated)", placement_rows)):
        if rows:
            lines += [f"## {title}", "", markdown_table(rows), ""]
    lines += ["## Figures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in written]
    if run.metrics is None:
        lines += ["", "No metrics.parquet beside the trace: no loss curve."]
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return [*written, summary]
