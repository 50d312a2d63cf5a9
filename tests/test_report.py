"""moe_trace.report: the numbers behind the figures, and `moe-trace report` writing every figure it promises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_trace import report, synth, trace
from moe_trace.cli import main
from moe_trace.errors import UsageError
from moe_trace.report import balancing

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROTOCOL = ["--horizons", "200", "400", "--min-history", "300", "--stride", "100"]  # fits the 1200-step run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as `moe-trace train` leaves it: trace/ and metrics.parquet."""
    root = tmp_path_factory.mktemp("run")
    counts, meta = synth.generate(layers=3, experts=8, steps=1200, tokens_per_step=2048, seq_len=256,
                                  switch_step=400, seed=3)
    trace.write(root / "trace", counts, meta)
    steps = np.arange(len(counts))
    trace.write_metrics(root / "metrics.parquet", {
        "step": steps, "loss": 6.0 * np.exp(-steps / 300) + 3.0, "lr": np.full(len(steps), 3e-4),
        "grad_norm": np.ones(len(steps)), "aux_loss": np.full(len(steps), 0.01),
        "step_time_s": np.full(len(steps), 0.1), "tokens": np.full(len(steps), 2048),
    })
    return root


def test_windowed_stats_match_a_loop_over_windows():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=(53, 2))  # 53 steps: the last 3 do not fill a window
    steps = np.arange(100, 153)
    stats = report.windowed_stats(p, steps, window=10)
    assert stats.starts.tolist() == [100, 110, 120, 130, 140]
    for w in range(5):
        block = p[10 * w: 10 * w + 10]
        np.testing.assert_allclose(stats.mean[w], block.mean(axis=0))
        np.testing.assert_allclose(stats.variance[w], block.var(axis=0).mean(axis=-1))
        np.testing.assert_allclose(stats.range[w], (block.max(axis=0) - block.min(axis=0)).mean(axis=-1))


def test_skew_is_max_over_mean_and_ignores_expert_order():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6), size=(40, 3))
    stats = report.windowed_stats(p, np.arange(40), window=8)
    shuffled = report.windowed_stats(p[..., rng.permutation(6)], np.arange(40), window=8)
    np.testing.assert_allclose(stats.skew, stats.mean.max(axis=-1) / stats.mean.mean(axis=-1))
    np.testing.assert_allclose(stats.skew, shuffled.skew)
    assert (stats.skew >= 1.0 - 1e-12).all()


def test_binned_mean_conserves_the_total():
    rng = np.random.default_rng(2)
    p = rng.random((101, 2, 4))
    edges, means = report.binned_mean(p, np.arange(101), bins=7)
    widths = np.diff(edges)
    assert widths.sum() == 101 and edges[0] == 0
    np.testing.assert_allclose((means * widths[:, None, None]).sum(axis=0), p.sum(axis=0))


def test_load_distance_is_zero_for_one_run_and_symmetric():
    rng = np.random.default_rng(3)
    a = report.windowed_stats(rng.dirichlet(np.ones(4), size=(60, 2)), np.arange(60), 10)
    b = report.windowed_stats(rng.dirichlet(np.ones(4), size=(60, 2)), np.arange(60), 10)
    assert np.all(report.load_distance(a, a) == 0)
    np.testing.assert_allclose(report.load_distance(a, b), report.load_distance(b, a))
    np.testing.assert_allclose(report.load_distance(a, b), np.abs(a.mean - b.mean).sum(axis=-1))


def test_compare_findings_of_a_run_with_itself(run_dir):
    run = report.load_run(run_dir)
    a, b = report.analyse_pair(run, run)
    for row in report.compare_findings(a, b):
        assert row["variance early, b / a"] == pytest.approx(1.0)
        assert row["variance late, b / a"] == pytest.approx(1.0)
        assert row["load distance late / within-run drift"] == 0.0


def test_markdown_table():
    text = report.markdown_table([{"a": 1, "b": 0.123456}, {"a": None, "b": "x"}])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| – | x |"]


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert path.stat().st_size > 10_000, f"{path.name} is only {path.stat().st_size} bytes"


def test_report_command_writes_every_figure(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), *PROTOCOL]) == 0
    promised = ["loss", "load_heatmap", "load_spread", "predictor_error", "placement_imbalance"]
    summary = (out / "summary.md").read_text()
    for name in promised:
        _assert_png(out / f"{name}.png")
        assert f"({name}.png)" in summary
    assert capsys.readouterr().out.split() == [*(str(out / f"{n}.png") for n in promised), str(out / "summary.md")]
    assert "best predictor of the next 400 steps" in summary and "| oracle | all |" in summary


def test_report_without_metrics_or_evaluations(run_dir, tmp_path):
    assert main(["report", str(run_dir / "trace" / next((run_dir / "trace").iterdir()).name),
                 "--out", str(tmp_path), "--no-predict", "--no-place"]) == 0  # no metrics beside a bare file
    assert {p.name for p in tmp_path.iterdir()} == {"load_heatmap.png", "load_spread.png", "summary.md"}
    _assert_png(tmp_path / "load_heatmap.png")
    assert "no loss curve" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["/no/such/trace"], "no trace at"),
    (["{run}", "--window", "1"], "at least 2 steps"),
    (["{run}", "--window", "1000"], "pass a smaller window"),
    (["{run}", "--horizons", "2000"], "too few for a 2000-step horizon"),  # given, so not scaled to the trace
    (["{run}", *PROTOCOL, "--predictors", "sw_avg,nonsense"], "unknown predictor 'nonsense'"),
    (["{run}", *PROTOCOL, "--predictors", "sw_avg:window=0"], "window must be >= 1"),
    (["{run}", *PROTOCOL, "--policy", "static,psychic"], "unknown policy 'psychic'"),
])
def test_bad_input_is_one_line_and_status_2(run_dir, tmp_path, capsys, args, message):
    args = [a.format(run=run_dir) for a in args]
    assert main(["report", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_step_time_panel_is_a_trailing_mean_not_a_cumulative_one():
    """A migration stall at step 10 raises the plotted ratio for exactly the `smooth` steps that include it."""
    steps = np.arange(60)
    flat = {"imbalance": np.ones((60, 1)), "step_time_s": np.ones(60)}
    stalled = {"imbalance": np.ones((60, 1)), "step_time_s": np.where(steps == 10, 11.0, 1.0)}
    fig = report.plot_imbalance({"static": flat, "history": stalled}, steps, smooth=10)
    ratio = fig.axes[1].get_lines()[1].get_ydata()
    np.testing.assert_allclose(ratio[10:20], 2.0)  # (9 x 1 + 11) / 10
    np.testing.assert_allclose(ratio[20:], 1.0)  # cumulative would still be above 1
    assert "trailing mean of 10 steps" in fig.axes[1].get_xlabel()


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> list[Path]:
    """Three synthetic runs of one architecture; the third with a capacity limit that dropped assignments."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in range(3):
        counts, meta = synth.generate(layers=2, experts=8, steps=900, tokens_per_step=2048, seq_len=256,
                                      switch_step=300, seed=seed)
        dropped = counts // 10 if seed == 2 else None
        meta = {**meta, "balance": ("aux", "aux_free", "aux")[seed], "capacity_factor": 1.25 if seed == 2 else None}
        paths.append(root / f"run{seed}")
        trace.write(paths[-1] / "trace", counts, meta, dropped=dropped)
    return paths


def test_comparison_table_has_one_row_per_run_with_its_variant(three_runs):
    runs = [report.load_run(path) for path in three_runs]
    analyses = report.analyse_runs(runs)
    rows = report.comparison_table(analyses)
    assert [r["run"] for r in rows] == ["run0", "run1", "run2"]
    assert [r["balance"] for r in rows] == ["aux", "aux_free", "aux"]
    assert [r["dropped %"] for r in rows][:2] == [0.0, 0.0] and 9 < rows[2]["dropped %"] <= 10
    for row, analysis in zip(rows, analyses, strict=True):
        n = len(analysis.stats.starts) // 4
        assert row["heaviest/mean late"] == pytest.approx(analysis.stats.skew[-n:].mean())
    with pytest.raises(UsageError, match="same window"):
        report.comparison_table([analyses[0], report.analyse(runs[1], window=7, protocol=None, cluster=None)])


def test_report_command_compares_several_runs(three_runs, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["report", *map(str, three_runs), "--out", str(out), "--horizons", "100", "200", "--min-history",
                 "200", "--stride", "100", "--predictors", "sw_avg:window=100", "--gpus", "4"]) == 0
    promised = ["compare_variance", "compare_skew", "compare_summary"]
    for name in promised:
        _assert_png(out / f"{name}.png")
    summary = (out / "summary.md").read_text()
    assert "| run0 | run1 | run2 |" in summary and "mean_wape sw_avg:window=100 @200" in summary
    assert "best step time / static" in summary
    assert capsys.readouterr().out.split() == [*(str(out / f"{n}.png") for n in promised), str(out / "summary.md")]


def test_comparing_runs_of_different_architectures_is_one_line(three_runs, tmp_path, capsys):
    counts, meta = synth.generate(layers=3, experts=8, steps=900, seed=0)
    trace.write(tmp_path / "other" / "trace", counts, meta)
    assert main(["report", str(three_runs[0]), str(tmp_path / "other"), "--out", str(tmp_path / "o"),
                 "--no-predict", "--no-place"]) == 2
    err = capsys.readouterr().err
    assert "compare runs of one architecture" in err and err.count("\n") == 1


def test_the_study_protocol_keeps_the_defaults_proportions():
    protocol = balancing.study_protocol(1000)
    assert protocol.horizons == (100, 200) and protocol.min_history == 100 and protocol.stride == 25
    assert protocol.predictors == ("auto", "sw_avg:window=100", "arima:block=10:history=500:refit_every=500",
                                   "linear:window=200")
    assert balancing.study_phase_block(20000) == 400 and balancing.study_phase_block(300) == 10


def test_study_without_runs_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="holds none of the study's runs"):
        balancing.study_runs(tmp_path)
