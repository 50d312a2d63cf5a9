"""One run's figures: loss, per-layer load heatmaps, windowed spread, predictor error, placement imbalance.

Each ``plot_*`` function takes computed arrays and returns a matplotlib Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from moe_trace.report.runs import Run
from moe_trace.report.stats import WindowStats, binned_mean, rolling_mean
from moe_trace.report.style import HEATMAP_BINS, OKABE_ITO, mark_stable, pyplot, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from predictors.evaluate import Scores


@styled
def plot_loss(metrics: dict[str, np.ndarray], smooth: int | None = None) -> Figure:
    """Training loss (raw and smoothed) and the load-balancing loss against the optimizer step."""
    plt = pyplot()
    steps = metrics["step"]
    smooth = smooth or max(1, len(steps) // 100)
    fig, (ax_loss, ax_aux) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(2, 1))
    ax_loss.plot(steps, metrics["loss"], color=OKABE_ITO[5], linewidth=0.5, alpha=0.6, label="per step")
    ax_loss.plot(steps, rolling_mean(metrics["loss"], smooth), color=OKABE_ITO[0],
                 label=f"mean of last {smooth} steps")
    ax_loss.set_ylabel("training loss (nats/token)")
    ax_loss.legend()
    ax_aux.plot(steps, rolling_mean(metrics["aux_loss"], smooth), color=OKABE_ITO[1])
    ax_aux.set_ylabel("load-balancing loss")
    ax_aux.set_xlabel("optimizer step")
    fig.suptitle("Loss over the run")
    fig.tight_layout()
    return fig


@styled
def plot_proportion_heatmaps(run: Run, stable_from: Sequence[int | None] | None = None,
                             bins: int = HEATMAP_BINS) -> Figure:
    """One heatmap per MoE layer: expert (rows) by step (columns), colour = load proportion (bin mean)."""
    plt = pyplot()
    p, steps = run.proportions, run.trace.steps
    step_edges, means = binned_mean(p, steps, bins)
    n_layers, n_experts = p.shape[1], p.shape[2]
    vmax = float(np.quantile(means, 0.995))
    fig, axes = plt.subplots(n_layers, 1, figsize=(7, 0.4 + 1.1 * n_layers), sharex=True, squeeze=False)
    for li, ax in enumerate(axes[:, 0]):
        image = ax.pcolormesh(step_edges, np.arange(n_experts + 1) - 0.5, means[:, li, :].T,
                              cmap="cividis", vmin=0.0, vmax=vmax, shading="flat", rasterized=True)
        ax.set_ylabel(f"{run.layer_labels()[li]}\nexpert", fontsize=8)
        ax.grid(False)
        if stable_from is not None and stable_from[li] is not None:
            ax.axvline(stable_from[li], color="white", linestyle="--", linewidth=1.2)
    axes[-1, 0].set_xlabel("optimizer step" + (" (dashed: stable phase starts)" if stable_from else ""))
    fig.colorbar(image, ax=axes[:, 0].tolist(), label=f"load proportion (uniform = {1 / n_experts:.3f})",
                 shrink=0.8)
    fig.suptitle(f"Expert load proportion per MoE layer ({run.name}; mean over {len(steps) / len(means):.0f}"
                 " steps per column)")
    return fig


@styled
def plot_window_stats(stats: WindowStats, layer_labels: Sequence[str],
                      stable_from: Sequence[int | None] | None = None, title: str = "") -> Figure:
    """Windowed variance (top) and range (bottom) of the load proportions, one line per layer, log scale."""
    plt = pyplot()
    fig, (ax_var, ax_range) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    centres = stats.starts + stats.window / 2
    for li, label in enumerate(layer_labels):
        colour = OKABE_ITO[li % len(OKABE_ITO)]
        style = "-" if li < len(OKABE_ITO) else "--"
        ax_var.plot(centres, stats.variance[:, li], color=colour, linestyle=style, label=label)
        ax_range.plot(centres, stats.range[:, li], color=colour, linestyle=style)
        if stable_from is not None and stable_from[li] is not None:
            for ax, values in ((ax_var, stats.variance), (ax_range, stats.range)):
                ax.plot(stable_from[li], np.interp(stable_from[li], centres, values[:, li]), marker="v",
                        color=colour, markeredgecolor="black", markersize=7, linestyle="none")
    ax_var.set_yscale("log")
    ax_range.set_yscale("log")
    ax_var.set_ylabel("variance of proportion\n(mean over experts)")
    ax_range.set_ylabel("range of proportion\n(max - min, mean over experts)")
    ax_range.set_xlabel(f"optimizer step (window of {stats.window} steps)"
                        + ("; triangle: stable phase starts" if stable_from else ""))
    ax_var.legend(ncol=min(4, len(layer_labels)), fontsize=7)
    fig.suptitle(title or f"Windowed spread of expert load proportions ({stats.window}-step windows)")
    fig.tight_layout()
    return fig


def _stable_summary(stable_from: Sequence[int | None] | None) -> int | None:
    """The median layer's stable-phase start (None when no layer stabilises): one line for a whole-run plot."""
    starts = [s for s in stable_from or () if s is not None]
    return int(np.median(starts)) if starts else None


def whole_model_stable(stable_from: Sequence[int | None] | None) -> int | None:
    """Placement's phase split: one for the whole model, because a re-plan concerns all layers at once."""
    from placement.simulator import every_layer_stable_from

    return every_layer_stable_from(list(stable_from or ()))


@styled
def plot_predictor_error(scores: Mapping[str, Mapping[int, Scores]],
                         stable_from: Sequence[int | None] | None = None) -> Figure:
    """Predictor error against the forecast origin, one row per horizon, mean over layers.

    Left: ``step_wape`` with the noise floor (``step_floor``, the hindsight horizon mean); middle: their
    ratio (1 = as good as any predictor can be per step); right: ``mean_wape``, the error placement sees.
    """
    plt = pyplot()
    horizons = sorted(next(iter(scores.values())))
    fig, axes = plt.subplots(len(horizons), 3, figsize=(11, 0.8 + 2.6 * len(horizons)), sharex=True,
                             squeeze=False)
    stable = _stable_summary(stable_from)
    for row, horizon in enumerate(horizons):
        ax_step, ax_ratio, ax_mean = axes[row]
        for i, (spec, by_horizon) in enumerate(scores.items()):
            s = by_horizon[horizon]
            style = dict(color=OKABE_ITO[i % len(OKABE_ITO)], marker=".", markersize=4, label=spec)
            ax_step.plot(s.origins, 100 * s.step_wape.mean(axis=1), **style)
            ax_ratio.plot(s.origins, s.step_wape.mean(axis=1) / s.step_floor.mean(axis=1), **style)
            ax_mean.plot(s.origins, 100 * s.mean_wape.mean(axis=1), **style)
        floor = next(iter(scores.values()))[horizon]
        ax_step.plot(floor.origins, 100 * floor.step_floor.mean(axis=1), color="black", linestyle=":",
                     label="noise floor")
        ax_ratio.axhline(1.0, color="black", linestyle=":")
        ax_mean.set_yscale("log")
        ax_step.set_ylabel(f"next {horizon} steps\nstep_wape (%)")
        ax_ratio.set_ylabel("step_wape / step_floor")
        ax_mean.set_ylabel("mean_wape (%)")
        for ax in axes[row]:
            mark_stable(ax, stable, label=row == 0 and ax is ax_mean)
    for ax in axes[-1]:
        ax.set_xlabel("forecast origin (optimizer step)")
    axes[0, 0].legend(fontsize=7)
    if stable is not None:
        axes[0, 2].legend(handles=axes[0, 2].get_lines()[-1:], fontsize=7, loc="upper right")
    fig.suptitle("Predictor error over the run (mean over layers; dashed: median layer's stable-phase start)")
    fig.tight_layout()
    return fig


@styled
def plot_imbalance(outcomes: Mapping[str, Mapping[str, np.ndarray]], steps: np.ndarray, smooth: int,
                   stable_from: Sequence[int | None] | None = None, setting: str = "") -> Figure:
    """Per placement policy over the run: imbalance (busiest GPU over the mean, mean over layers) and the
    estimated step time relative to ``static`` (migration stalls included), both trailing means of ``smooth``
    steps; the dashed line is where every layer is stable, the split of the placement table."""
    plt = pyplot()
    fig, (ax_imb, ax_time) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    baseline = outcomes["static"]["step_time_s"] if "static" in outcomes else None
    for i, (policy, outcome) in enumerate(outcomes.items()):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        ax_imb.plot(steps, rolling_mean(outcome["imbalance"].mean(axis=1), smooth), color=colour, label=policy)
        if baseline is not None:
            ax_time.plot(steps, rolling_mean(outcome["step_time_s"], smooth) / rolling_mean(baseline, smooth),
                         color=colour)
    ax_imb.axhline(1.0, color="black", linewidth=0.8)
    ax_imb.set_ylabel("imbalance\n(busiest GPU / mean GPU)")
    ax_time.set_ylabel("est. step time / static")
    ax_time.set_xlabel(f"optimizer step (trailing mean of {smooth} steps)")
    stable = whole_model_stable(stable_from)
    for ax in (ax_imb, ax_time):
        mark_stable(ax, stable, label=ax is ax_imb)
    ax_imb.legend(ncol=3, fontsize=7)
    fig.suptitle(f"Placement policies replayed on the trace{f' ({setting})' if setting else ''}")
    fig.tight_layout()
    return fig
