"""Runs side by side: windowed spread and skew of each, a table of their numbers, and for a pair how far apart
their expert loads are (``moe-trace report RUN RUN ...``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_trace.errors import UsageError
from moe_trace.report.analysis import (
    PHASE_BLOCK,
    Analysis,
    Cluster,
    Protocol,
    analyse,
    markdown_table,
    placement_table,
    predictor_table,
)
from moe_trace.report.runs import Run
from moe_trace.report.stats import WindowStats, common_windows, default_window, load_distance, window_drift
from moe_trace.report.style import OKABE_ITO, layer_grid, pyplot, save, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure


METRIC_LABELS = {"variance": "variance of proportion", "range": "range of proportion",
                 "skew": "heaviest / mean expert load"}


@styled
def plot_runs_metric(stats: Sequence[WindowStats], metric: str, names: Sequence[str], layer_labels: Sequence[str],
                     stable_from: Sequence[Sequence[int | None] | None] | None = None) -> Figure:
    """Several runs' windowed ``metric`` ("variance", "range" or "skew") per layer, one colour per run, with
    each run's stable-phase starts dashed."""
    plt = pyplot()
    stable_from = stable_from or [None] * len(stats)
    n = common_windows(*stats)
    fig, axes = layer_grid(plt, len(layer_labels), f"Windowed {metric} of expert load: {', '.join(names)}")
    centres = stats[0].starts[:n] + stats[0].window / 2
    for li, ax in enumerate(axes):
        for ri, (run_stats, name, stable) in enumerate(zip(stats, names, stable_from, strict=True)):
            colour = OKABE_ITO[ri % len(OKABE_ITO)]
            ax.plot(centres, getattr(run_stats, metric)[:n, li], color=colour, label=name)
            if stable is not None and stable[li] is not None:
                ax.axvline(stable[li], color=colour, linestyle="--", linewidth=1)
        ax.set_title(layer_labels[li], fontsize=9)
        if metric != "skew":
            ax.set_yscale("log")
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(METRIC_LABELS[metric])
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel(f"optimizer step ({stats[0].window}-step windows)")
    axes[0].legend(title="dashed: stable from" if any(s is not None for s in stable_from) else None,
                   fontsize=7, title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_compare_metric(a: WindowStats, b: WindowStats, metric: str, names: tuple[str, str],
                        layer_labels: Sequence[str], stable_from: tuple[Sequence | None, Sequence | None]
                        = (None, None)) -> Figure:
    """Two runs' windowed ``metric`` per layer (:func:`plot_runs_metric` for a pair)."""
    return plot_runs_metric((a, b), metric, names, layer_labels, stable_from)


@styled
def plot_load_distance(a: WindowStats, b: WindowStats, names: tuple[str, str],
                       layer_labels: Sequence[str]) -> Figure:
    """Per layer, how far apart the two runs' expert loads are, against how far each run moves by itself."""
    plt = pyplot()
    distance = load_distance(a, b)
    n = len(distance)
    reference = np.fmax(window_drift(a)[:n], window_drift(b)[:n])
    centres = a.starts[:n] + a.window / 2
    fig, axes = layer_grid(plt, len(layer_labels), f"Expert load difference: {names[0]} vs {names[1]}")
    for li, ax in enumerate(axes):
        ax.plot(centres, distance[:, li], color=OKABE_ITO[3], label="between the runs")
        ax.plot(centres, reference[:, li], color="black", linestyle=":", label="within a run, window to window")
        ax.set_yscale("log")
        ax.set_title(layer_labels[li], fontsize=9)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("L1 distance of\nwindow-mean loads")
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel(f"optimizer step ({a.window}-step windows)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def analyse_runs(runs: Sequence[Run], window: int | None = None, protocol: Protocol | None = None,
                 cluster: Cluster | None = None, phase_block: int = PHASE_BLOCK) -> list[Analysis]:
    """Analyse runs of one architecture with one window size, so their windowed figures line up step for step
    (no predictor evaluation or placement replay unless ``protocol`` / ``cluster`` are given)."""
    layers = {run.name: run.trace.counts.shape[1] for run in runs}
    if len(set(layers.values())) > 1:
        raise UsageError(f"runs differ in MoE layers ({', '.join(f'{n}: {k}' for n, k in layers.items())}): "
                         "compare runs of one architecture")
    window = window or default_window(min(len(run.trace) for run in runs))
    return [analyse(run, window, protocol, cluster, phase_block) for run in runs]


def analyse_pair(a: Run, b: Run, window: int | None = None) -> tuple[Analysis, Analysis]:
    """Analyse two runs with one window size so their windowed figures line up step for step."""
    first, second = analyse_runs([a, b], window)
    return first, second


def compare_figures(analyses: Sequence[Analysis]) -> dict[str, Figure]:
    """The comparison figures by file stem: every run's windowed spread and skew, the side-by-side summary, and
    for a pair of runs with the same experts, their load distance."""
    names = [a.run.name for a in analyses]
    labels = analyses[0].run.layer_labels()
    stats = [a.stats for a in analyses]
    stable = [a.stable_from for a in analyses]
    out = {f"compare_{metric}": plot_runs_metric(stats, metric, names, labels, stable)
           for metric in ("variance", "skew")}
    out["compare_summary"] = plot_runs_summary(analyses)
    if len(analyses) == 2 and stats[0].mean.shape[1:] == stats[1].mean.shape[1:]:
        out["compare_distance"] = plot_load_distance(stats[0], stats[1], tuple(names), labels)
    return out


def _quarters(stats: WindowStats, n: int) -> tuple[slice, slice]:
    """The first and last quarter of the first ``n`` windows ("early" and "late")."""
    quarter = max(1, n // 4)
    return slice(0, quarter), slice(n - quarter, n)


def comparison_table(analyses: Sequence[Analysis]) -> list[dict[str, Any]]:
    """One row per run, the numbers side by side: router variant, stable-phase starts, windowed variance and
    heaviest/mean load early and late (first and last quarter of the windows all runs have), dropped
    assignments, each predictor's ``mean_wape`` at the longest horizon (all origins, mean over layers) and
    what the best placement policy a job can run buys over static (estimated step time, all steps)."""
    n = common_windows(*(a.stats for a in analyses))
    rows = []
    for analysis in analyses:
        run, stats = analysis.run, analysis.stats
        meta, counts, dropped = run.trace.meta, run.trace.counts, run.trace.dropped
        early, late = _quarters(stats, n)
        row: dict[str, Any] = {
            "run": run.name, "balance": meta.get("balance", "aux"), "score": meta.get("score", "softmax"),
            "capacity factor": meta.get("capacity_factor"), "steps": len(run.trace),
        }
        if run.metrics is not None:
            edge = max(1, len(run.metrics["loss"]) // 100)
            row["loss, last 1 %"] = float(np.mean(run.metrics["loss"][-edge:]))
        if analysis.stable_from is not None:
            row["stable from (per layer)"] = ", ".join("–" if s is None else str(s) for s in analysis.stable_from)
            row["layers stable"] = f"{sum(s is not None for s in analysis.stable_from)}/{len(analysis.stable_from)}"
        row["variance early"] = float(stats.variance[early].mean())
        row["variance late"] = float(stats.variance[late].mean())
        row["heaviest/mean early"] = float(stats.skew[early].mean())
        row["heaviest/mean late"] = float(stats.skew[late].mean())
        row["heaviest/mean late, worst layer"] = float(stats.skew[late].mean(axis=0).max())
        row["dropped %"] = 0.0 if dropped is None else float(100 * dropped.sum() / counts.sum())
        for record in _longest_horizon_records(analysis):
            row[f"mean_wape {record['predictor']} @{record['horizon']}"] = record["mean_wape"]
        row.update(_placement_summary(analysis))
        rows.append(row)
    return rows


def _longest_horizon_records(analysis: Analysis) -> list[dict[str, Any]]:
    rows = [r for r in predictor_table(analysis) if r["phase"] == "all" and r["layer"] == "all"]
    longest = max((r["horizon"] for r in rows), default=None)
    return [r for r in rows if r["horizon"] == longest]


def _placement_summary(analysis: Analysis) -> dict[str, Any]:
    by_policy = {r["policy"]: r for r in placement_table(analysis) if r["phase"] == "all"}
    if "static" not in by_policy:
        return {}
    real = [r for name, r in by_policy.items() if name != "oracle"]
    best = min(real, key=lambda r: r["est_step_time_s"])
    summary = {"imbalance static": by_policy["static"]["mean_imbalance"], "best placement": best["policy"],
               "best step time / static": best["step_time_vs_static"]}
    if "oracle" in by_policy:
        summary["oracle step time / static"] = by_policy["oracle"]["step_time_vs_static"]
    return summary


@styled
def plot_runs_summary(analyses: Sequence[Analysis]) -> Figure:
    """The comparison table as bars, one colour per run: heaviest/mean load late per layer, windowed variance
    early and late, predictor error (longest horizon) and the best placement's step time over static."""
    plt = pyplot()
    rows = comparison_table(analyses)
    names = [row["run"] for row in rows]
    predictors = [k for k in rows[0] if k.startswith("mean_wape ")]
    panels = [("skew", "heaviest / mean load, late\n(per layer)"), ("variance", "windowed variance\n(mean of layers)")]
    if predictors:
        panels.append(("predictors", "mean_wape (%), all origins"))
    if "best step time / static" in rows[0]:
        panels.append(("placement", "est. step time / static"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), squeeze=False)
    width = 0.8 / len(rows)
    n = common_windows(*(a.stats for a in analyses))
    for (panel, ylabel), ax in zip(panels, axes[:, 0], strict=True):
        for ri, (row, analysis) in enumerate(zip(rows, analyses, strict=True)):
            colour = OKABE_ITO[ri % len(OKABE_ITO)]
            if panel == "skew":
                labels = analysis.run.layer_labels()
                values = analysis.stats.skew[_quarters(analysis.stats, n)[1]].mean(axis=0)
            elif panel == "variance":
                labels, values = ["early", "late"], [row["variance early"], row["variance late"]]
            elif panel == "predictors":
                labels = [k.removeprefix("mean_wape ") for k in predictors]
                values = [100 * row.get(k, np.nan) for k in predictors]
            else:
                labels = ["best real policy", "oracle"]
                values = [row["best step time / static"], row.get("oracle step time / static", np.nan)]
            x = np.arange(len(labels)) + (ri - (len(rows) - 1) / 2) * width
            ax.bar(x, values, width, color=colour, label=names[ri])
            ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_ylabel(ylabel)
        if panel == "variance":
            ax.set_yscale("log")
        if panel in ("skew", "placement"):
            ax.axhline(1.0, color="black", linewidth=0.8)
            low = min(p.get_height() for p in ax.patches if np.isfinite(p.get_height()))
            ax.set_ylim(bottom=min(0.95, low * 0.98) if panel == "placement" else 1.0)
    axes[0, 0].legend(ncol=min(5, len(rows)), fontsize=7)
    fig.suptitle("Runs side by side")
    fig.tight_layout()
    return fig


def compare_findings(a: Analysis, b: Analysis) -> list[dict[str, Any]]:
    """Per layer, where the two runs' load dynamics differ and by how much.

    "early"/"late" are the first and last quarter of the windows both runs have; ratios are b over a.
    """
    n = common_windows(a.stats, b.stats)
    quarter = max(1, n // 4)
    same_shape = a.stats.mean.shape[1:] == b.stats.mean.shape[1:]
    distance = load_distance(a.stats, b.stats) if same_shape else None
    drift = np.fmax(window_drift(a.stats)[:n], window_drift(b.stats)[:n])
    rows = []
    for li, label in enumerate(a.run.layer_labels()):
        row: dict[str, Any] = {"layer": label}
        if a.stable_from is not None and b.stable_from is not None:
            row["stable from (a, b)"] = f"{a.stable_from[li]}, {b.stable_from[li]}"
        for part, sl in (("early", slice(0, quarter)), ("late", slice(n - quarter, n))):
            va, vb = a.stats.variance[sl, li].mean(), b.stats.variance[sl, li].mean()
            row[f"variance {part} (a)"] = float(va)
            row[f"variance {part}, b / a"] = float(vb / va)
        row["skew late (a, b)"] = (f"{a.stats.skew[n - quarter:n, li].mean():.2f}, "
                                   f"{b.stats.skew[n - quarter:n, li].mean():.2f}")
        if distance is not None:
            late = slice(max(1, n - quarter), n)  # the first window has no drift of its own
            row["load distance late / within-run drift"] = float(distance[late, li].mean() / drift[late, li].mean())
        rows.append(row)
    return rows


def write_comparison(analyses: Sequence[Analysis], out_dir: str | os.PathLike) -> list[Path]:
    """Save :func:`compare_figures` as ``<name>.png`` and a ``summary.md`` with :func:`comparison_table` (and,
    for two runs, :func:`compare_findings` per layer); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [save(fig, out_dir / f"{name}.png") for name, fig in compare_figures(analyses).items()]
    lines = [f"# moe-trace comparison: {', '.join(a.run.name for a in analyses)}", ""]
    lines += [f"- {a.run.name}: `{a.run.path}` (model {a.run.trace.meta['model']}, seed {a.run.trace.meta['seed']}, "
              f"{len(a.run.trace)} steps)" for a in analyses]
    lines += ["", "## Side by side", "", "One column per run; early and late are the first and last quarter of "
              f"the {analyses[0].stats.window}-step windows every run has.", "",
              markdown_table(_transposed(comparison_table(analyses))), ""]
    if len(analyses) == 2:
        lines += ["## Per layer (ratios: second run over first)", "", markdown_table(compare_findings(*analyses)), ""]
    lines += ["## Figures", "", *(f"![{p.stem}]({p.name})" for p in written)]
    summary = out_dir / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    return [*written, summary]


def _transposed(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of runs as rows of figures (one column per run): long tables read better that way."""
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "run"))
    return [{"": key, **{row["run"]: row.get(key) for row in rows}} for key in keys]
