"""The picture of a run: figures and a findings table for one trace, and comparisons of several.

Each ``plot_*`` function takes computed arrays and returns a matplotlib Figure, so a notebook shows it inline
and :func:`write_report` (behind ``moe-trace report``) saves it as PNG. The numbers behind the figures come
from the packages that own them: stable-phase starts from ``predictors.phases``, predictor errors from
``predictors.evaluate``, imbalance from ``placement``. This package only arranges and draws them, one module
per job:

* :mod:`~moe_trace.report.runs`: a trace with its metrics;
* :mod:`~moe_trace.report.stats`: windowed statistics and distances between runs (numpy);
* :mod:`~moe_trace.report.style`: colours, the figure style, PNG output;
* :mod:`~moe_trace.report.figures`: one run's figures;
* :mod:`~moe_trace.report.analysis`: one run's numbers, findings, tables and the written report;
* :mod:`~moe_trace.report.compare`: runs side by side (``moe-trace report RUN RUN ...``);
* :mod:`~moe_trace.report.balancing`: the balancing study's runs, protocol and analysis (issue 14).

Importing it needs numpy and pyarrow only; matplotlib loads when a figure is drawn.
"""

from moe_trace.report.analysis import (
    DEFAULT_PREDICTORS,
    PHASE_BLOCK,
    Analysis,
    Cluster,
    Protocol,
    analyse,
    evaluate_predictors,
    figures,
    findings,
    markdown_table,
    placement_table,
    predictor_table,
    replay_policies,
    write_report,
)
from moe_trace.report.compare import (
    analyse_pair,
    analyse_runs,
    compare_figures,
    compare_findings,
    comparison_table,
    plot_compare_metric,
    plot_load_distance,
    plot_runs_metric,
    plot_runs_summary,
    write_comparison,
)
from moe_trace.report.figures import (
    plot_imbalance,
    plot_loss,
    plot_predictor_error,
    plot_proportion_heatmaps,
    plot_window_stats,
)
from moe_trace.report.runs import Run, load_run
from moe_trace.report.stats import (
    WindowStats,
    binned_mean,
    default_window,
    load_distance,
    rolling_mean,
    window_drift,
    windowed_stats,
)
from moe_trace.report.style import DPI, HEATMAP_BINS, OKABE_ITO, save

__all__ = [
    "DEFAULT_PREDICTORS",
    "DPI",
    "HEATMAP_BINS",
    "OKABE_ITO",
    "PHASE_BLOCK",
    "Analysis",
    "Cluster",
    "Protocol",
    "Run",
    "WindowStats",
    "analyse",
    "analyse_pair",
    "analyse_runs",
    "binned_mean",
    "compare_figures",
    "compare_findings",
    "comparison_table",
    "default_window",
    "evaluate_predictors",
    "figures",
    "findings",
    "load_distance",
    "load_run",
    "markdown_table",
    "placement_table",
    "plot_compare_metric",
    "plot_imbalance",
    "plot_load_distance",
    "plot_loss",
    "plot_predictor_error",
    "plot_proportion_heatmaps",
    "plot_runs_metric",
    "plot_runs_summary",
    "plot_window_stats",
    "predictor_table",
    "replay_policies",
    "rolling_mean",
    "save",
    "window_drift",
    "windowed_stats",
    "write_comparison",
    "write_report",
]
