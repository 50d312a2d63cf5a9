"""Training end to end: loss, token conservation, config, crash/resume with SIGKILL, Ctrl-C, bad input."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moe_trace import cli, trace
from moe_trace.model import make_config
from moe_trace.train import TrainConfig, train

# A model small enough that a subprocess run is dominated by its start-up, on the session's corpus cache.
SMALL = ["--model", "gpt-tiny-moe", "--blocks", "2", "--hidden", "32", "--heads", "2", "--experts", "4",
         "--moe-every", "1", "--seq-len", "32", "--global-batch", "4", "--device", "cpu", "--eval-every", "1000"]


@pytest.fixture(scope="module")
def tiny_run(corpus_cache, tmp_path_factory):
    """100 steps of gpt-tiny-moe on the default corpus (half the preset's batch, to keep CI fast)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig(out=str(out), steps=100, global_batch=8, warmup=10, eval_every=50, flush_every=30)
    summary = train(make_config("gpt-tiny-moe"), config, "cpu")
    return out, summary


def test_loss_goes_down(tiny_run):
    out, summary = tiny_run
    loss = trace.load_metrics(out / "metrics.parquet")["loss"]
    assert loss[0] > 8.0  # ln(4096) = 8.3 at initialisation
    assert loss[-10:].mean() < loss[0] - 1.5
    assert summary["val_loss"] < loss[0] - 1.5


def test_the_summary_counts_passes_over_the_training_tokens(tiny_run):
    _, summary = tiny_run
    assert summary["data_passes"] == pytest.approx(100 * 8 * 128 / summary["train_tokens"])


def test_every_row_of_the_trace_conserves_tokens(tiny_run):
    out, _ = tiny_run
    loaded = trace.load(out)
    meta = loaded.meta
    assert loaded.steps.tolist() == list(range(100))
    assert loaded.layers == [1, 3] and meta["tokens_per_step"] == 8 * 128 and meta["top_k"] == 2
    assert (loaded.counts.sum(axis=2) == meta["tokens_per_step"] * meta["top_k"]).all()
    assert len(list((out / "trace").glob("part-*.parquet"))) == 1  # compacted at the end
    assert trace.load_metrics(out)["step"].tolist() == list(range(100))
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["tokenizer"].endswith("tokenizer.json")


def _train_process(*args):
    return subprocess.Popen([sys.executable, "-m", "moe_trace", "train", *SMALL, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_then_resume_records_every_step_exactly_once(corpus_cache, tmp_path):
    out = tmp_path / "run"
    process = _train_process("--out", str(out), "--steps", "2000", "--checkpoint-every", "20", "--flush-every", "10")
    _wait_for(out / "checkpoints" / "step-0000000040.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    killed = trace.load(out)  # readable: ends at the last flush, which is at or past the last checkpoint
    assert killed.steps.tolist() == list(range(len(killed))) and len(killed) >= 40

    resumed = subprocess.run([sys.executable, "-m", "moe_trace", "train", "--out", str(out), "--resume",
                              "--steps", "70"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    final = trace.load(out)
    assert final.steps.tolist() == list(range(70))
    assert (final.counts.sum(axis=2) == 4 * 32 * 2).all()
    assert trace.load_metrics(out)["step"].tolist() == list(range(70))


def test_sigint_stops_with_a_checkpoint_and_a_readable_trace(corpus_cache, tmp_path):
    out = tmp_path / "run"
    process = _train_process("--out", str(out), "--steps", "2000", "--flush-every", "10")
    _wait_for(out / "metrics.parquet", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    (checkpoint,) = (out / "checkpoints").glob("step-*.pt")
    stopped_at = int(checkpoint.stem.split("-")[1])
    assert 10 <= stopped_at < 2000
    assert trace.load(out).steps.tolist() == list(range(stopped_at))
    assert trace.load_metrics(out)["step"].tolist() == list(range(stopped_at))


@pytest.mark.parametrize("args,message", [
    (["--model", "gpt-huge"], "unknown model"),
    (["--model", "gpt-tiny-moe", "--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--model", "gpt-tiny-moe", "--moe-backend", "megablocks"], "megablocks"),
    (["--model", "gpt-tiny-moe", "--top-k", "9"], "top_k"),
    (["--resume"], "--resume"),
    (["--model", "gpt-tiny-moe", "--profile", "5"], "--profile takes START:STOP"),
    (["--model", "gpt-tiny-moe", "--profile", "4:2"], "need 0 <= START < STOP"),
    (["--model", "gpt-tiny-moe", "--compile", "--compile-mode", "reduce-overhead", "--global-batch", "8",
      "--micro-batch", "4"], "needs one micro-batch a step"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_profile_writes_the_window_of_steps(corpus_cache, tmp_path):
    """--profile 2:4 profiles steps 2 and 3: a Chrome trace with the training step's ops, and the table."""
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *SMALL, "--steps", "6", "--profile", "2:4"]) == 0
    events = json.loads((out / "profile" / "trace.json").read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    assert {"aten::mm", "Optimizer.step#AdamW.step"} <= names
    ops = (out / "profile" / "ops.txt").read_text()
    assert ops.startswith("steps 2..3, sorted by self_cpu_time_total") and "aten::mm" in ops


def test_the_gpu_timeline_splits_idle_time_by_what_the_gpu_waited_for():
    """By hand: kernel b's launch began after a ended (20 us waiting for the host); c was launched before b ended
    (its 10 us gap is something else); a copy overlapping c counts once."""
    from moe_trace.profiling import gpu_timeline

    def kernel(name, ts, correlation, cat="kernel"):
        return {"cat": cat, "name": name, "ts": ts, "dur": 10, "args": {"correlation": correlation}}

    def launch(ts, correlation):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 2,
                "args": {"correlation": correlation}}

    events = [kernel("a", 0, 1), launch(-5, 1), kernel("b", 30, 2), launch(20, 2), kernel("c", 50, 3), launch(5, 3),
              kernel("copy", 55, 4, cat="gpu_memcpy"), {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 99}]
    assert gpu_timeline(events) == {"window_ms": 0.065, "busy_ms": 0.035, "idle_ms": 0.03,
                                    "waiting_for_launch_ms": 0.02}
    assert gpu_timeline([events[-1]]) is None  # a CPU-only trace


def test_existing_run_without_resume_is_refused(corpus_cache, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert cli.main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_unknown_preset_through_the_console_script():
    result = subprocess.run([sys.executable, "-m", "moe_trace", "train", "--model", "nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown model" in result.stderr


def test_resume_reproduces_the_uninterrupted_run_exactly(corpus_cache, tmp_path):
    """Re-running steps 20..29 from the step-20 checkpoint gives the same counts and losses, bit for bit."""
    model_config = make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, moe_every=1,
                               seq_len=32)
    config = TrainConfig(out=str(tmp_path / "full"), steps=30, global_batch=4, micro_batch=2, warmup=5,
                         eval_every=1000, checkpoint_every=10, flush_every=10)
    train(model_config, config, "cpu")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "step-0000000030.pt").unlink()
    train(model_config, dataclasses.replace(config, out=str(tmp_path / "resumed")), "cpu", resume=True)

    full, resumed = trace.load(tmp_path / "full"), trace.load(tmp_path / "resumed")
    assert resumed.steps.tolist() == list(range(30))
    assert np.array_equal(full.counts, resumed.counts)
    losses = [trace.load_metrics(tmp_path / run)["loss"] for run in ("full", "resumed")]
    assert np.array_equal(*losses)


def test_checkpoint_every_zero_writes_no_checkpoint_but_the_whole_trace(corpus_cache, tmp_path):
    model_config = make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, moe_every=1,
                               seq_len=32)
    config = TrainConfig(out=str(tmp_path / "run"), steps=12, global_batch=4, warmup=2, eval_every=1000,
                         checkpoint_every=0, flush_every=5)
    train(model_config, config, "cpu")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert trace.load(tmp_path / "run").steps.tolist() == list(range(12))


def _wait_for_glob(directory, pattern, process, timeout=600):
    deadline = time.monotonic() + timeout
    while not list(directory.glob(pattern)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {pattern} in {directory}"
        time.sleep(0.02)


def test_sigkill_before_the_first_checkpoint_then_resume_starts_again(corpus_cache, tmp_path):
    """Killed after a trace flush but before any checkpoint, --resume starts again at step 0 (and says so)."""
    out = tmp_path / "run"
    process = _train_process("--out", str(out), "--steps", "2000", "--flush-every", "10")  # checkpoint every 500
    _wait_for_glob(out / "trace", "part-*.parquet", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(trace.load(out)) >= 10 and not list(out.glob("checkpoints/*.pt"))

    resumed = subprocess.run([sys.executable, "-m", "moe_trace", "train", "--out", str(out), "--resume",
                              "--steps", "25"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint" in resumed.stderr and "starting again from step 0" in resumed.stderr
    final = trace.load(out)
    assert final.steps.tolist() == list(range(25))
    assert (final.counts.sum(axis=2) == 4 * 32 * 2).all()
    assert trace.load_metrics(out)["step"].tolist() == list(range(25))


SMALL_CONFIG = dict(n_blocks=2, hidden=32, heads=2, num_experts=4, moe_every=1, seq_len=32)


def test_leftovers_of_a_kill_during_a_checkpoint_write_or_a_flush_do_not_disturb_resume(corpus_cache, tmp_path):
    """A kill inside an atomic write leaves only a hidden temporary file: resume ignores and removes it."""
    model_config = make_config("gpt-tiny-moe", **SMALL_CONFIG)
    config = TrainConfig(out=str(tmp_path / "run"), steps=20, global_batch=4, warmup=2, eval_every=1000,
                         checkpoint_every=10, flush_every=5)
    train(model_config, config, "cpu")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000000020.pt").unlink()  # as if killed while writing it ...
    (run / "checkpoints" / ".step-0000000020.pt.4242.tmp").write_bytes(b"half a checkpoint")  # ... here
    (run / "trace" / ".part-0000000015-0000000019.parquet.4242.tmp").write_bytes(b"half a part")
    train(model_config, dataclasses.replace(config, steps=25), "cpu", resume=True)
    assert trace.load(run).steps.tolist() == list(range(25))
    assert trace.load_metrics(run)["step"].tolist() == list(range(25))
    assert not list((run / "trace").glob(".*.tmp")) and not list((run / "checkpoints").glob(".*.tmp"))


def test_a_failure_before_the_first_step_leaves_no_run_directory(corpus_cache, tmp_path, monkeypatch):
    """The retry of a run that failed during set-up is not refused as 'already holds a run'."""
    from moe_trace.model import GPT

    def broken_forward(self, idx, targets=None):
        raise RuntimeError("a kernel that cannot run here")

    monkeypatch.setattr(GPT, "forward", broken_forward)
    config = TrainConfig(out=str(tmp_path / "runs" / "run"), steps=5, global_batch=4, warmup=1, eval_every=1000)
    with pytest.raises(RuntimeError, match="cannot run here"):
        train(make_config("gpt-tiny-moe", **SMALL_CONFIG), config, "cpu")
    assert not (tmp_path / "runs" / "run").exists()


def test_the_progress_bar_shows_no_validation_loss_before_the_first_evaluation(corpus_cache, tmp_path, capsys):
    config = TrainConfig(out=str(tmp_path / "run"), steps=20, global_batch=4, warmup=2, eval_every=1000,
                         checkpoint_every=0)
    train(make_config("gpt-tiny-moe", **SMALL_CONFIG), config, "cpu")
    err = capsys.readouterr().err
    assert "loss=" in err and "val=nan" not in err


def test_a_steps_time_holds_the_wait_for_the_loss_but_not_evaluation_or_checkpoints(corpus_cache, tmp_path,
                                                                                     monkeypatch):
    """The progress bar's read of the loss, where the host waits for the steps it queued on the GPU, counts in the
    step that makes it (else a run whose host runs ahead looks faster than it is); evaluation and checkpoint
    saving are reported apart. A fake clock: 1 ms a reading, 100 s a loss read, 1000 s an evaluation or a save."""
    from moe_trace import recorder
    from moe_trace import train as training

    clock = [0.0]

    def advancing(seconds, call):
        def wrapped(*args, **kwargs):
            clock[0] += seconds
            return call(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(training.time, "perf_counter", advancing(1e-3, lambda: clock[0]))
    monkeypatch.setattr(recorder.MetricsLog, "last", advancing(100.0, recorder.MetricsLog.last))
    monkeypatch.setattr(training, "evaluate", advancing(1000.0, training.evaluate))
    monkeypatch.setattr(training, "save_checkpoint", advancing(1000.0, training.save_checkpoint))
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), steps=20, global_batch=4, warmup=2, eval_every=5, checkpoint_every=10)
    summary = train(make_config("gpt-tiny-moe", **SMALL_CONFIG), config, "cpu")
    step_s = trace.load_metrics(out / "metrics.parquet")["step_time_s"]
    reads = (np.arange(len(step_s)) + 1) % training.PROGRESS_EVERY == 0
    assert len(step_s) == 20 and reads.sum() == 2
    assert (step_s[reads] > 100).all() and (step_s[reads] < 101).all() and (step_s[~reads] < 1).all()
    assert summary["eval_s"] >= 4000 and summary["checkpoint_s"] >= 2000


def test_auto_compile_mode_takes_cuda_graphs_only_for_a_one_graph_step():
    from moe_trace.train import choose_compile_mode

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_compile_mode("auto", gpu, 1, 1, True) == "reduce-overhead"
    assert choose_compile_mode("auto", gpu, 1, 4, True) == "default"  # accumulation: graphs overwrite the grads
    assert choose_compile_mode("auto", gpu, 2, 1, True) == "default"  # torchrun
    assert choose_compile_mode("auto", gpu, 1, 1, False) == "default"  # transformers models
    assert choose_compile_mode("auto", cpu, 1, 1, True) == "default"
    assert choose_compile_mode("max-autotune", cpu, 2, 4, False) == "max-autotune"


def test_config_json_records_the_compile_mode_auto_took(corpus_cache, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), steps=2, global_batch=4, warmup=1, eval_every=1000, checkpoint_every=0)
    train(make_config("gpt-tiny-moe", **SMALL_CONFIG), config, "cpu")
    assert json.loads((out / "config.json").read_text())["train"]["compile_mode"] == "default"


SECOND_SIGNAL_SCRIPT = """
import sys
import torch
from moe_trace.train import _StopRequest

q = torch.randn(1, 1, 1 << 17, 64)
with _StopRequest():
    print("in", flush=True)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)  # one call of minutes: no Python in between
print("the attention finished before the signals", flush=True)
"""


def test_a_second_signal_stops_at_once_even_inside_a_long_kernel():
    process = subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL_SCRIPT], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "in\n"
    time.sleep(1.0)  # inside the kernel by now
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)  # two signals sent back to back may reach the process as one
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # only if it is still in the kernel: then the test fails, and leaves no process behind
    assert process.returncode == 130, stderr
    assert "stopped at once" in stderr and "Traceback" not in stderr
