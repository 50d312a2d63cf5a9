"""The picture of a run: figures and a findings table for one trace, and a comparison of two.

Each ``plot_*`` function takes computed arrays and returns a matplotlib Figure, so a notebook shows it inline
and :func:`write_report` (behind ``moe-trace report``) saves it as PNG. The numbers behind the figures come
from the packages that own them: stable-phase starts from ``predictors.phases``, predictor errors from
``predictors.evaluate``, imbalance from ``placement``. This module only arranges and draws them.

Colours are the Okabe-Ito palette and the ``cividis`` colour map, both readable with colour-vision
deficiencies and in greyscale print.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moe_trace import trace as trace_io
from moe_trace.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from predictors.evaluate import Scores

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
DPI = 150
HEATMAP_BINS = 400  # step bins per heatmap row: finer than a printed page resolves, coarse enough to draw fast


@dataclass
class Run:
    """A trace with its per-step metrics (None when the run has no ``metrics.parquet``)."""

    name: str
    trace: trace_io.Trace
    metrics: dict[str, np.ndarray] | None = None
    path: Path | None = field(default=None, repr=False)

    @cached_property
    def proportions(self) -> np.ndarray:
        """``p[t, l, e]``, computed once per run."""
        return self.trace.proportions()

    def layer_labels(self) -> list[str]:
        return [f"block {b}" for b in self.trace.layers]


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read a trace (directory, ``.parquet`` file or run directory) and the metrics beside it, if any."""
    tr = trace_io.load(path)
    metrics_file = trace_io.metrics_path(path)
    metrics = trace_io.load_metrics(metrics_file) if metrics_file.exists() else None
    return Run(name=name or _default_name(Path(path)), trace=tr, metrics=metrics, path=Path(path))


def _default_name(path: Path) -> str:
    path = path.resolve()
    return path.parent.name if path.name == "trace" else path.stem


# ---------------------------------------------------------------------------------------------------
# Numbers behind the figures


@dataclass(frozen=True)
class WindowStats:
    """Per-window summary of the load proportions over windows of ``window`` steps: each expert's mean, and
    the variance and range (max - min) of each expert's proportion over the window, averaged over experts.
    """

    window: int
    starts: np.ndarray  # [windows] first step of each window
    mean: np.ndarray  # [windows, layers, experts]
    variance: np.ndarray  # [windows, layers]
    range: np.ndarray  # [windows, layers]

    @property
    def skew(self) -> np.ndarray:
        """``[windows, layers]`` heaviest expert's mean load over the average expert's: the imbalance one
        expert per GPU would suffer. Independent of how experts are numbered, so it compares across seeds."""
        return self.mean.max(axis=-1) * self.mean.shape[-1]


def windowed_stats(p: np.ndarray, steps: np.ndarray, window: int) -> WindowStats:
    """Variance and range of ``p[t, l, e]`` over consecutive, non-overlapping windows of ``window`` steps.

    A trailing partial window is dropped so that every point averages the same number of steps.
    """
    if window < 2:
        raise UsageError(f"a window needs at least 2 steps (got {window})")
    n_windows = p.shape[0] // window
    if n_windows < 2:
        raise UsageError(f"a {window}-step window needs a trace of at least {2 * window} steps "
                         f"(this one has {p.shape[0]}); pass a smaller window")
    blocks = p[: n_windows * window].reshape(n_windows, window, *p.shape[1:])
    return WindowStats(
        window=window,
        starts=steps[: n_windows * window : window],
        mean=blocks.mean(axis=1),
        variance=blocks.var(axis=1).mean(axis=-1),
        range=np.ptp(blocks, axis=1).mean(axis=-1),
    )


def default_window(n_steps: int) -> int:
    """A window giving about 50 points over the run (at least 10 steps): smooth enough to show the trend."""
    return max(10, n_steps // 50)


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` samples (shorter at the start), NaNs ignored."""
    import pandas as pd

    return pd.Series(x).rolling(window, min_periods=1).mean().to_numpy()


def binned_mean(p: np.ndarray, steps: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Average ``p`` over ``bins`` equal runs of consecutive steps; return the bin edges (in steps) and means."""
    bins = min(bins, p.shape[0])
    edges = np.linspace(0, p.shape[0], bins + 1).astype(int)
    means = np.add.reduceat(p, edges[:-1], axis=0) / np.diff(edges).reshape(-1, *([1] * (p.ndim - 1)))
    step_edges = np.append(steps[edges[:-1]], steps[-1] + 1)
    return step_edges, means


# ---------------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _styled(plot):
    """Draw ``plot`` in the report's style without touching the caller's matplotlib settings."""

    @functools.wraps(plot)
    def draw(*args, **kwargs):
        import matplotlib

        _pyplot()
        style = {"axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO), "axes.grid": True, "grid.alpha": 0.3,
                 "font.size": 9}
        with matplotlib.rc_context(style):
            fig = plot(*args, **kwargs)
            # Jupyter's inline backend switches interactive mode on at its first figure; leaving the context
            # would switch it off again and later figures would no longer show, so carry it out.
            interactive = matplotlib.is_interactive()
        matplotlib.interactive(interactive)
        return fig

    return draw


def _mark_stable(ax, stable_from: int | None, label: bool = False) -> None:
    if stable_from is not None:
        ax.axvline(stable_from, color="black", linestyle="--", linewidth=1,
                   label="stable phase starts" if label else None)


@_styled
def plot_loss(metrics: dict[str, np.ndarray], smooth: int | None = None) -> Figure:
    """Training loss (raw and smoothed) and the load-balancing loss against the optimizer step."""
    plt = _pyplot()
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


@_styled
def plot_proportion_heatmaps(run: Run, stable_from: Sequence[int | None] | None = None,
                             bins: int = HEATMAP_BINS) -> Figure:
    """One heatmap per MoE layer: expert (rows) by step (columns), colour = load proportion (bin mean)."""
    plt = _pyplot()
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


@_styled
def plot_window_stats(stats: WindowStats, layer_labels: Sequence[str],
                      stable_from: Sequence[int | None] | None = None, title: str = "") -> Figure:
    """Windowed variance (top) and range (bottom) of the load proportions, one line per layer, log scale."""
    plt = _pyplot()
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


def _whole_model_stable(stable_from: Sequence[int | None] | None) -> int | None:
    """Placement's phase split: one for the whole model, because a re-plan concerns all layers at once."""
    from placement.simulator import every_layer_stable_from

    return every_layer_stable_from(list(stable_from or ()))


@_styled
def plot_predictor_error(scores: Mapping[str, Mapping[int, Scores]],
                         stable_from: Sequence[int | None] | None = None) -> Figure:
    """Predictor error against the forecast origin, one row per horizon, mean over layers.

    Left: ``step_wape`` with the noise floor (``step_floor``, the hindsight horizon mean); middle: their
    ratio (1 = as good as any predictor can be per step); right: ``mean_wape``, the error placement sees.
    """
    plt = _pyplot()
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
            _mark_stable(ax, stable, label=row == 0 and ax is ax_mean)
    for ax in axes[-1]:
        ax.set_xlabel("forecast origin (optimizer step)")
    axes[0, 0].legend(fontsize=7)
    if stable is not None:
        axes[0, 2].legend(handles=axes[0, 2].get_lines()[-1:], fontsize=7, loc="upper right")
    fig.suptitle("Predictor error over the run (mean over layers; dashed: median layer's stable-phase start)")
    fig.tight_layout()
    return fig


@_styled
def plot_imbalance(outcomes: Mapping[str, Mapping[str, np.ndarray]], steps: np.ndarray, smooth: int,
                   stable_from: Sequence[int | None] | None = None, setting: str = "") -> Figure:
    """Per placement policy over the run: imbalance (busiest GPU over the mean, mean over layers) and the
    estimated step time relative to ``static`` (migration stalls included), both trailing means of ``smooth``
    steps; the dashed line is where every layer is stable, the split of the placement table."""
    plt = _pyplot()
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
    stable = _whole_model_stable(stable_from)
    for ax in (ax_imb, ax_time):
        _mark_stable(ax, stable, label=ax is ax_imb)
    ax_imb.legend(ncol=3, fontsize=7)
    fig.suptitle(f"Placement policies replayed on the trace{f' ({setting})' if setting else ''}")
    fig.tight_layout()
    return fig


def _layer_grid(plt, n_layers: int, title: str):
    """A grid of small panels, one per layer, two columns, shared axes."""
    n_rows = (n_layers + 1) // 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(8, 0.6 + 1.9 * n_rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[n_layers:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes.flat[:n_layers]


def _common_windows(a: WindowStats, b: WindowStats) -> int:
    if a.window != b.window:
        raise UsageError(f"compare runs with the same window (got {a.window} and {b.window} steps)")
    return min(len(a.starts), len(b.starts))


@_styled
def plot_compare_metric(a: WindowStats, b: WindowStats, metric: str, names: tuple[str, str],
                        layer_labels: Sequence[str], stable_from: tuple[Sequence | None, Sequence | None]
                        = (None, None)) -> Figure:
    """Two runs' windowed ``metric`` ("variance", "range" or "skew") per layer, with their stable starts."""
    ylabels = {"variance": "variance of proportion", "range": "range of proportion",
               "skew": "heaviest / mean expert load"}
    plt = _pyplot()
    n = _common_windows(a, b)
    fig, axes = _layer_grid(plt, len(layer_labels), f"Windowed {metric} of expert load: {names[0]} vs {names[1]}")
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


def load_distance(a: WindowStats, b: WindowStats) -> np.ndarray:
    """``[windows, layers]`` L1 distance between the two runs' window-mean loads, expert by expert.

    Meaningful only where expert ``e`` of one run corresponds to expert ``e`` of the other (same seed and
    initialisation, e.g. INT8 vs bf16 attention); across seeds expert numbering is arbitrary.
    """
    if a.mean.shape[1:] != b.mean.shape[1:]:
        raise UsageError(f"runs differ in layers x experts ({a.mean.shape[1:]} vs {b.mean.shape[1:]})")
    n = _common_windows(a, b)
    return np.abs(a.mean[:n] - b.mean[:n]).sum(axis=-1)


def window_drift(stats: WindowStats) -> np.ndarray:
    """``[windows, layers]`` L1 distance of each window-mean load from the previous window's (NaN for the
    first): how much a run moves by itself in one window, noise included."""
    drift = np.abs(np.diff(stats.mean, axis=0)).sum(axis=-1)
    return np.concatenate([np.full((1, drift.shape[1]), np.nan), drift])


@_styled
def plot_load_distance(a: WindowStats, b: WindowStats, names: tuple[str, str],
                       layer_labels: Sequence[str]) -> Figure:
    """Per layer, how far apart the two runs' expert loads are, against how far each run moves by itself."""
    plt = _pyplot()
    distance = load_distance(a, b)
    n = len(distance)
    reference = np.fmax(window_drift(a)[:n], window_drift(b)[:n])
    centres = a.starts[:n] + a.window / 2
    fig, axes = _layer_grid(plt, len(layer_labels), f"Expert load difference: {names[0]} vs {names[1]}")
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


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG at the report resolution and release its memory."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Findings table and the Markdown summary


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as a GitHub Markdown table (numbers to 4 significant digits)."""
    if not rows:
        return ""
    columns = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("–" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# One run's analysis: compute once, then draw, tabulate or write


DEFAULT_PREDICTORS = ("sw_avg:window=100", "sw_avg:window=1000", "ema:halflife=300")


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
            cluster: Cluster | None = Cluster()) -> Analysis:
    """Compute the numbers behind every figure of ``run``; ``protocol=None`` skips the predictor
    evaluation, ``cluster=None`` the placement replay."""
    from predictors.phases import stable_from

    window = window or default_window(len(run.trace))
    analysis = Analysis(run=run, stats=windowed_stats(run.proportions, run.trace.steps, window), cluster=cluster,
                        stable_from=stable_from(run.proportions))
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
    for record in policy_records(analysis.placement, setting, _whole_model_stable(analysis.stable_from)):
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


# ---------------------------------------------------------------------------------------------------
# Two runs


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
    n = _common_windows(a.stats, b.stats)
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
