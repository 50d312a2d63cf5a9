"""``--attention auto``: INT8 only where measured faster, the measurement cached, the reason recorded (CPU; the
GPU measurement is replaced by a stand-in)."""

import json
import subprocess
import sys

import pytest
import torch

from moe_trace import attention_choice
from moe_trace.attention import kernels
from moe_trace.attention_choice import AttentionShape, Timing, choose_attention
from moe_trace.errors import UsageError

SHAPE = AttentionShape(batch=8, heads=12, seq=2048, head_dim=64)
TINY_RUN = ["--model", "gpt-tiny-moe", "--blocks", "1", "--hidden", "32", "--heads", "2", "--experts", "2",
            "--moe-every", "1", "--seq-len", "32", "--global-batch", "2", "--device", "cpu", "--steps", "1",
            "--eval-every", "1", "--no-record", "--checkpoint-every", "0"]


def _never_measured(shape, device):
    raise AssertionError("measured where it should not")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A "cuda" device named like the GPU machine's, whose preferred INT8 kernel is the Triton one."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(kernels, "int8_kernel", lambda device: ("triton", None))
    return torch.device("cuda")


@pytest.mark.parametrize(("int8_ms", "impl"), [(0.80, "int8"), (1.61, "sdpa"), (0.99, "sdpa")])
def test_auto_takes_int8_only_where_it_was_measured_faster(fake_gpu, tmp_path, int8_ms, impl):
    measured = []

    def measure(shape, device):
        measured.append(shape)
        return Timing(int8_ms=int8_ms, sdpa_ms=1.0)

    choice = choose_attention("auto", fake_gpu, SHAPE, measure=measure, cache_dir=tmp_path)
    assert choice.impl == impl  # 0.99 ms is 1.01x: within timing noise, so SDPA stays
    assert f"measured {1.0 / int8_ms:.2f}x SDPA at B8 H12 S2048 D64 causal on NVIDIA H200" in choice.reason
    again = choose_attention("auto", fake_gpu, SHAPE, measure=_never_measured, cache_dir=tmp_path)
    assert again == choice and measured == [SHAPE]  # measured once, then read from the cache

    other_shape = AttentionShape(batch=8, heads=16, seq=2048, head_dim=64)
    choose_attention("auto", fake_gpu, other_shape, measure=measure, cache_dir=tmp_path)
    assert measured == [SHAPE, other_shape]
    (stack,) = json.loads((tmp_path / attention_choice.TIMINGS_FILE).read_text()).values()
    assert set(stack) == {str(SHAPE), str(other_shape)}


def test_auto_under_several_processes_is_sdpa_without_measuring(fake_gpu, tmp_path):
    """Each rank would time its own GPU; a close call could give ranks different attention."""
    choice = choose_attention("auto", fake_gpu, SHAPE, measure=_never_measured, cache_dir=tmp_path, world_size=2)
    assert choice.impl == "sdpa" and "2 processes" in choice.reason
    assert choose_attention("int8", fake_gpu, SHAPE, measure=_never_measured, world_size=2).impl == "int8"


def test_timings_are_per_gpu_and_software_stack(fake_gpu, tmp_path, monkeypatch):
    choose_attention("auto", fake_gpu, SHAPE, measure=lambda s, d: Timing(0.5, 1.0), cache_dir=tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    choice = choose_attention("auto", fake_gpu, SHAPE, measure=lambda s, d: Timing(2.0, 1.0), cache_dir=tmp_path)
    assert choice.impl == "sdpa"
    keys = json.loads((tmp_path / attention_choice.TIMINGS_FILE).read_text())
    assert len(keys) == 2 and all(f"torch {torch.__version__}" in key and "triton" in key for key in keys)


def test_cpu_auto_is_sdpa_without_measuring_and_explicit_choices_are_kept(tmp_path):
    choice = choose_attention("auto", "cpu", SHAPE, measure=_never_measured, cache_dir=tmp_path)
    assert choice.impl == "sdpa" and "cpu" in choice.reason
    assert choose_attention("sdpa", "cpu", SHAPE, measure=_never_measured).impl == "sdpa"
    with pytest.raises(UsageError, match="--attention int8 needs a CUDA GPU"):
        choose_attention("int8", "cpu", SHAPE)


def test_cli_states_the_choice_first_and_in_config_json(corpus_cache, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "moe_trace", "train", *TINY_RUN, "--attention", "auto", "--out",
                             str(out)], capture_output=True, text=True, check=True)
    reason = json.loads((out / "config.json").read_text())["train"]["attention_reason"]
    assert result.stdout.splitlines()[0] == f"attention sdpa ({reason})" and reason.startswith("auto on cpu")
    refused = subprocess.run([sys.executable, "-m", "moe_trace", "train", *TINY_RUN, "--attention", "int8", "--out",
                              str(tmp_path / "int8")], capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.strip().endswith("use --attention sdpa")
    assert not (tmp_path / "int8").exists()


def test_an_unreadable_timings_file_is_measured_again_and_replaced(fake_gpu, tmp_path):
    (tmp_path / attention_choice.TIMINGS_FILE).write_text('{"cut off')
    choice = choose_attention("auto", fake_gpu, SHAPE, measure=lambda s, d: Timing(0.5, 1.0), cache_dir=tmp_path)
    assert choice.impl == "int8"
    assert json.loads((tmp_path / attention_choice.TIMINGS_FILE).read_text())
