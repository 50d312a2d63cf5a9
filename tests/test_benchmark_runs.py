"""benchmarks/cli_runs.py: the figures the training benchmarks report are those of the run's own files.

One tiny CPU run of ``moe-trace train`` through the module, as every training benchmark makes it; its steady-state
median and tokens/s must be those of ``metrics.parquet`` read independently, and the benchmarks' readers of a run
(attention_training's rates and INT8-vs-SDPA parity, balancing_study's trained figures) must read the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import each other as they do when run

import attention_training  # noqa: E402
import balancing_study  # noqa: E402
import cli_runs  # noqa: E402
import expert_parallel_scaling  # noqa: E402
import placement_training  # noqa: E402

from moe_trace import trace  # noqa: E402
from moe_trace.train import PROGRESS_EVERY  # noqa: E402

STEPS, SKIP, BATCH, SEQ = 20, 4, 2, 16
TINY = ["--model", "gpt-tiny-moe", "--blocks", "1", "--moe-every", "1", "--hidden", "16", "--heads", "2",
        "--experts", "4", "--seq-len", str(SEQ), "--vocab-size", "256", "--device", "cpu", "--threads", "1",
        "--global-batch", str(BATCH), "--steps", str(STEPS), "--eval-every", str(STEPS), "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> cli_runs.TrainRun:
    work = tmp_path_factory.mktemp("cli_runs")
    np.save(work / "ids.npy", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint16))
    return cli_runs.train([*TINY, "--data", str(work / "ids.npy")], work / "run")


def test_steady_state_is_the_mean_over_whole_progress_periods(run):
    """From the first step after a progress-bar read (the host's wait for the GPU) to the run's end."""
    step_s = pq.read_table(run.run_dir / "metrics.parquet").column("step_time_s").to_numpy()
    assert len(step_s) == STEPS
    rate = run.steady_state(SKIP)
    first = -(-SKIP // PROGRESS_EVERY) * PROGRESS_EVERY
    assert first % PROGRESS_EVERY == 0 and SKIP <= first < STEPS
    assert rate["step_s"] == float(np.mean(step_s[first:])) and rate["steps_timed"] == [first, STEPS]
    assert rate["tokens_per_s"] == BATCH * SEQ / rate["step_s"]
    assert rate["median_step_s"] == float(np.median(step_s[first:]))


def test_the_run_keeps_its_summary_log_and_command(run):
    assert run.summary == json.loads((run.run_dir.parent / "run.json").read_text())
    assert run.summary["steps"] == STEPS and np.isfinite(run.summary["val_loss"])
    assert run.line("attention ").startswith("attention sdpa")
    assert run.line("gpt-tiny-moe:").startswith(f"gpt-tiny-moe: steps 0..{STEPS - 1}")
    assert not any("\r" in line or "step/s" in line for line in run.log_lines)  # no progress bar
    assert run.shown.startswith("moe-trace train --model gpt-tiny-moe") and run.shown.endswith("run.json")
    assert (run.run_dir.parent / "run.command").read_text() == run.shown  # written before the run starts
    assert run.wall_s > 0


def test_scaling_analysis_takes_the_early_window_and_skips_runs_without_steps(run, tmp_path):
    """The early window is the mean of steps 10..19 of metrics.parquet (one progress-bar period); one GPU's
    busiest load is 1; a run cut before its first step is skipped, not an error."""
    import shutil

    shutil.copytree(run.run_dir, tmp_path / "weak-g1-compiled")
    for suffix in (".json", ".command"):
        shutil.copy(run.run_dir.parent / f"run{suffix}", tmp_path / f"weak-g1-compiled{suffix}")
    (tmp_path / "weak-g2-compiled_padded").mkdir()  # cut by a time limit before any step was recorded
    (tmp_path / "weak-g2-compiled_padded.json").write_text(json.dumps({"stopped_early": True}))
    result = expert_parallel_scaling.analyse(tmp_path, STEPS, settled_from=80)
    [row] = result["runs"]
    step_s = pq.read_table(run.run_dir / "metrics.parquet").column("step_time_s").to_numpy()
    assert (row["window"], row["steps_timed"]) == ("early", [10, 20])
    assert row["step_s"] == float(np.mean(step_s[10:20])) and row["busiest_gpu_load"] == 1.0
    assert result["goals"] == []


def test_busiest_gpu_load_by_hand(run):
    counts = trace.load(run.run_dir).counts.astype(float)  # [steps, layers, 4 experts]: GPU 0 hosts 0-1, GPU 1 2-3
    per_gpu = np.stack([counts[..., :2].sum(-1), counts[..., 2:].sum(-1)], axis=-1)
    expected = (per_gpu.max(-1) / per_gpu.mean(-1)).mean(-1)
    np.testing.assert_allclose(expert_parallel_scaling.busiest_rank_load(run.run_dir, 2), expected)


def test_placement_records_name_their_run_directories():
    for experts, name in ((None, "gpt-350m-moe-t16384-phase"), (64, "gpt-350m-moe-e64-t16384-phase")):
        record = {"model": "gpt-350m-moe", "experts": experts, "tokens_per_step": 16384, "policy": "phase"}
        assert placement_training.run_name(*placement_training._batch(record), record["policy"]) == name


def test_a_finished_run_is_reused_when_asked(run, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("ran")

    monkeypatch.setattr(cli_runs.subprocess, "run", refuse)
    again = cli_runs.train([*TINY, "--data", "ignored"], run.run_dir, reuse=True)
    assert again.wall_s is None and again.summary == run.summary
    with pytest.raises(AssertionError, match="ran"):  # nothing finished there: it runs
        cli_runs.train(TINY, tmp_path / "new", reuse=True)


def test_a_failed_run_raises_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)exit 2.*unrecognized arguments: --no-such-option"):
        cli_runs.train([*TINY, "--no-such-option"], tmp_path / "bad")
    assert "unrecognized arguments: --no-such-option" in (tmp_path / "bad.log").read_text()


def test_torchrun_command_is_shown_as_typed():
    command = cli_runs.train_command(["--model", "gpt-tiny-moe"], ranks=2)
    assert command[0] == sys.executable
    assert cli_runs.shown(command) == "torchrun --standalone --nproc-per-node 2 -m moe_trace train --model gpt-tiny-moe"


def test_attention_training_reads_rates_and_parity_from_the_run(run):
    rates = attention_training.steady_state(run, SKIP)
    assert rates["median_step_s"] == run.steady_state(SKIP)["median_step_s"]
    assert rates["summary_line"] == run.line("gpt-tiny-moe:") and rates["command"] == run.shown
    parity = attention_training.parity("gpt-tiny-moe", STEPS, {"int8": run, "sdpa": run})
    assert parity["val_loss"]["int8"] == run.summary["val_loss"] and parity["val_loss_rel_diff"] == 0
    assert parity["data"] == run.config["data"]
    [goal] = attention_training.goals({"models": {}, "auto": {}, "parity": parity})
    assert goal["met"] and goal["measured"] == 0


def test_balancing_study_reads_the_summary_or_an_older_runs_printed_line(run):
    record = {"summary": run.line("gpt-tiny-moe:")}
    assert balancing_study._trained(run.run_dir, record) == {key: run.summary[key]
                                                             for key in ("val_loss", "tokens_per_s")}
    older = balancing_study._trained(run.run_dir / "trace", record)  # no summary beside: the printed figures
    assert older["val_loss"] == pytest.approx(run.summary["val_loss"], abs=5e-4)
    assert older["tokens_per_s"] == pytest.approx(run.summary["tokens_per_s"], abs=0.5)
