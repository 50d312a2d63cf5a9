"""TensorBoard scalars of `train --tensorboard` and `record.attach(tensorboard=...)`, read back from the event files."""

import numpy as np
import pytest
import torch

from moe_trace import record, trace
from moe_trace.cli import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

SMALL = ["--model", "gpt-tiny-moe", "--blocks", "2", "--hidden", "32", "--heads", "2", "--experts", "4",
         "--moe-every", "1", "--seq-len", "32", "--global-batch", "4", "--micro-batch", "2", "--device", "cpu",
         "--eval-every", "1000", "--threads", "1"]


def scalars(log_dir) -> dict[str, dict[int, float]]:
    events = event_accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def imbalance(counts: np.ndarray) -> np.ndarray:
    return counts.max(axis=-1) / counts.mean(axis=-1)


def test_train_tensorboard_logs_every_scalar_and_per_layer_imbalance(corpus_cache, tmp_path):
    out, board = tmp_path / "run", tmp_path / "tb"
    assert main(["train", *SMALL, "--steps", "7", "--flush-every", "3", "--log-every", "2", "--out", str(out),
                 "--tensorboard", str(board)]) == 0
    logged = scalars(board)
    loaded = trace.load(out)
    for i, block in enumerate(loaded.layers):
        values = logged[f"load_imbalance/block_{block}"]
        assert sorted(values) == [0, 2, 4, 6]
        assert np.allclose([values[s] for s in (0, 2, 4, 6)], imbalance(loaded.counts[[0, 2, 4, 6], i]))
        assert sorted(logged[f"aux_loss/block_{block}"]) == [0, 2, 4, 6]
    metrics = trace.load_metrics(out / "metrics.parquet")
    assert np.allclose([logged["train/loss"][s] for s in (0, 2, 4, 6)], metrics["loss"][[0, 2, 4, 6]])
    assert np.allclose([logged["train/grad_norm"][s] for s in (0, 2)], metrics["grad_norm"][[0, 2]])
    assert {"train/lr", "train/aux_loss", "train/tokens_per_s"} <= set(logged)
    assert all(v > 0 for v in logged["train/tokens_per_s"].values())


def test_attach_tensorboard_logs_imbalance_of_a_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers", minversion="5")
    config = transformers.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    recorder = record.attach(model, tmp_path / "run", tensorboard=tmp_path / "tb", log_every=1)
    for step in range(3):
        ids = torch.randint(0, 64, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        recorder.step(step)
    recorder.close()
    logged = scalars(tmp_path / "tb")
    loaded = trace.load(tmp_path / "run")
    for i, block in enumerate(loaded.layers):
        values = logged[f"load_imbalance/block_{block}"]
        assert np.allclose([values[s] for s in range(3)], imbalance(loaded.counts[:, i]))
