"""moe-trace train --model hf:<family>: transformers architectures through the harness's loop and recorder."""

import sys

import numpy as np
import pytest
import torch

from moe_trace import trace
from moe_trace.cli import main

pytest.importorskip("transformers", minversion="5")

TINY = ["--blocks", "2", "--hidden", "32", "--heads", "2", "--experts", "4", "--top-k", "2", "--seq-len", "16",
        "--global-batch", "4", "--micro-batch", "2", "--device", "cpu", "--eval-every", "1000", "--threads", "1"]


@pytest.mark.parametrize("family, moe_layers", [("olmoe", [0, 1]), ("deepseek_v3", [1])])
def test_hf_family_trains_and_records(corpus_cache, tmp_path, capsys, family, moe_layers):
    out = tmp_path / family
    assert main(["train", "--model", f"hf:{family}", *TINY, "--steps", "6", "--out", str(out)]) == 0
    assert f"hf:{family}: steps 0..5" in capsys.readouterr().out
    loaded = trace.load(out)
    assert loaded.meta["model"] == f"hf:{family}" and loaded.layers == moe_layers
    assert loaded.steps.tolist() == list(range(6))
    assert loaded.meta["num_experts"] == 4 and loaded.meta["top_k"] == 2
    assert (loaded.counts.sum(axis=2) == 4 * 16 * 2).all()  # two micro-batches of 2 x 16 tokens, top-2
    metrics = trace.load_metrics(out / "metrics.parquet")
    assert np.isfinite(metrics["loss"]).all() and metrics["loss"][0] > 7.0  # ln(4096) = 8.3 at init


def test_hf_family_resumes_with_each_step_once(corpus_cache, tmp_path):
    out = str(tmp_path / "run")
    assert main(["train", "--model", "hf:olmoe", *TINY, "--steps", "4", "--checkpoint-every", "2", "--out", out]) == 0
    assert main(["train", "--out", out, "--resume", "--steps", "6", "--device", "cpu"]) == 0
    assert trace.load(out).steps.tolist() == list(range(6))


@pytest.mark.parametrize("args, message", [
    (["--model", "hf:nope"], "unknown transformers family 'nope'"),
    (["--model", "hf:olmoe", "--moe-every", "2"], "--moe-every apply to the GPT presets"),
])
def test_hf_bad_options_are_one_line(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_missing_transformers_says_which_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert main(["train", "--model", "hf:olmoe", "--out", str(tmp_path / "r"), "--device", "cpu"]) == 2
    assert "pip install 'moe-trace[hf]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_hf_family_trains_on_the_gpu(corpus_cache, tmp_path, compiled):
    """bf16 autocast with the experts' grouped GEMM in bf16 (fp32 master weights), eager and compiled."""
    out = tmp_path / "gpu"
    assert main(["train", "--model", "hf:olmoe", "--blocks", "2", "--hidden", "128", "--heads", "4", "--experts", "8",
                 "--top-k", "2", "--seq-len", "128", "--global-batch", "8", "--steps", "30", "--device", "cuda",
                 "--eval-every", "1000", "--out", str(out), "--compile" if compiled else "--no-compile"]) == 0
    loaded = trace.load(out)
    assert loaded.steps.tolist() == list(range(30))
    assert (loaded.counts.sum(axis=2) == 8 * 128 * 2).all()
    loss = trace.load_metrics(out / "metrics.parquet")["loss"]
    assert np.isfinite(loss).all() and loss[-5:].mean() < loss[0]
