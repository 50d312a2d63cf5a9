"""Runs side by side: windowed spread and skew of each, and how far apart their expert loads are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_trace.errors import UsageError
from moe_trace.report.analysis import Analysis, analyse
from moe_trace.report.runs import Run
from moe_trace.report.stats import WindowStats, common_windows, default_window, load_distance, window_drift
from moe_trace.report.style import OKABE_ITO, layer_grid, pyplot, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@styled
def plot_compare_metric(a: WindowStats, b: WindowStats, metric: str, names: tuple[str, str],
                        layer_labels: Sequence[str], stable_from: tuple[Sequence | None, Sequence | None]
                        = (None, None)) -> Figure:
    """Two runs' windowed ``metric`` ("variance", "range" or "skew") per layer, with their stable starts."""
    ylabels = {"variance": "variance of proportion", "range": "range of proportion",
               "skew": "heaviest / mean expert load"}
    plt = pyplot()
    n = common_windows(a, b)
    fig, axes = layer_grid(plt, len(layer_labels), f"Windowed {metric} of expert load: {names[0]} vs {names[1]}")
    centres = a.starts[:n] + a.window / 2
    for li, ax in enumerate(axes):
        for ri, (stats, name, stable) in enumerate(zip((a, b), names, stable_from, strict=True)):
            ax.plot(centres, getattr(stats, metric)[:n, li], color=OKABE_ITO[ri], label=name)
            if stable is not None and stable[li] is not None:
                ax.axvline(stable[li], color=OKABE_ITO[ri], linestyle="--", linewidth=1)
        ax.set_title(layer_labels[li], fontsize=9)
        if metric != "skew":
            ax.set_yscale("log")
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(ylabels[metric])
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel(f"optimizer step ({a.window}-step windows)")
    axes[0].legend(title="dashed: stable from" if any(s is not None for s in stable_from) else None,
                   fontsize=7, title_fontsize=7)
    fig.tight_layout()
    return fig


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


def analyse_pair(a: Run, b: Run, window: int | None = None) -> tuple[Analysis, Analysis]:
    """Analyse two runs with one window size so their windowed figures line up step for step."""
    if a.trace.counts.shape[1] != b.trace.counts.shape[1]:
        raise UsageError(f"{a.name} has {a.trace.counts.shape[1]} MoE layers and {b.name} "
                         f"{b.trace.counts.shape[1]}: compare runs of one architecture")
    window = window or default_window(min(len(a.trace), len(b.trace)))
    return analyse(a, window, protocol=None), analyse(b, window, protocol=None)


def compare_figures(a: Analysis, b: Analysis) -> dict[str, Figure]:
    """The comparison figures by file stem: spread and skew of both runs, and their load distance."""
    names = (a.run.name, b.run.name)
    labels = a.run.layer_labels()
    stable = (a.stable_from, b.stable_from)
    out = {metric: plot_compare_metric(a.stats, b.stats, metric, names, labels, stable)
           for metric in ("variance", "skew")}
    if a.stats.mean.shape[1:] == b.stats.mean.shape[1:]:
        out["distance"] = plot_load_distance(a.stats, b.stats, names, labels)
    return out


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
