"""Each router variant trains on CPU: conserved counts, drops within the capacity, the variant in the trace
metadata and config.json, exact resume (the auxiliary-loss-free bias restored), and the bias balancing load."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from moe_trace import trace
from moe_trace.model import make_config
from moe_trace.train import TrainConfig, train

SMALL = dict(n_blocks=2, hidden=32, heads=2, num_experts=8, top_k=1, moe_every=1, seq_len=32)
MICRO_BATCH, GLOBAL_BATCH = 2, 4  # two micro-batches per step: capacity applies to each

VARIANTS = {
    "aux": {},
    "seq_aux": dict(balance="seq_aux"),
    "aux_free": dict(balance="aux_free", bias_update_rate=0.01),
    "none": dict(balance="none"),
    "capacity 1.25": dict(capacity_factor=1.25),
    "sigmoid top-2, shared": dict(score="sigmoid", top_k=2, shared_experts=1),
    "fine-grained": dict(num_experts=16, top_k=4, expert_ffn=32, shared_experts=1),
}


def _train(out, steps: int, lr: float = 1e-3, **variant):
    torch.set_num_threads(1)
    config = TrainConfig(out=str(out), steps=steps, global_batch=GLOBAL_BATCH, micro_batch=MICRO_BATCH, warmup=2,
                         lr=lr, eval_every=1000, checkpoint_every=10, flush_every=5)
    model_config = make_config("gpt-tiny-moe", **{**SMALL, **variant})
    train(model_config, config, "cpu")
    return model_config, config


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_trains_with_conserved_counts(corpus_cache, tmp_path, variant):
    model_config, _ = _train(tmp_path, steps=12, **variant)
    loaded = trace.load(tmp_path)
    tokens = GLOBAL_BATCH * model_config.seq_len
    assert loaded.steps.tolist() == list(range(12))
    assert (loaded.counts.sum(axis=2) == tokens * model_config.top_k).all()
    for name in ("score", "balance", "capacity_factor", "shared_experts"):
        assert loaded.meta[name] == getattr(model_config, name)
    assert loaded.meta["expert_ffn"] == model_config.moe_ffn
    assert json.loads((tmp_path / "config.json").read_text())["model"]["balance"] == model_config.balance
    if model_config.capacity_factor is None:
        assert loaded.dropped is None
        return
    # Each micro-batch's expert keeps at most its capacity; the rest of what it was chosen for is dropped.
    capacity = math.ceil(model_config.capacity_factor * MICRO_BATCH * model_config.seq_len * model_config.top_k
                         / model_config.num_experts)
    kept = loaded.counts - loaded.dropped
    assert (kept <= capacity * GLOBAL_BATCH // MICRO_BATCH).all() and loaded.dropped.sum() > 0
    assert (loaded.dropped[loaded.counts <= capacity] == 0).all()


def test_resume_restores_the_bias_and_reproduces_every_variant_exactly(corpus_cache, tmp_path):
    variant = dict(balance="aux_free", bias_update_rate=0.01, score="sigmoid", top_k=2, capacity_factor=1.0,
                   shared_experts=1)
    model_config, config = _train(tmp_path / "full", steps=20, **variant)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "step-0000000020.pt").unlink()
    train(model_config, dataclasses.replace(config, out=str(tmp_path / "resumed")), "cpu", resume=True)

    full, resumed = trace.load(tmp_path / "full"), trace.load(tmp_path / "resumed")
    assert np.array_equal(full.counts, resumed.counts) and np.array_equal(full.dropped, resumed.dropped)
    losses = [trace.load_metrics(tmp_path / run)["loss"] for run in ("full", "resumed")]
    assert np.array_equal(*losses)
    biases = [torch.load(tmp_path / run / "checkpoints" / "step-0000000020.pt", weights_only=False)["model"]
              for run in ("full", "resumed")]
    bias_keys = [k for k in biases[0] if k.endswith("expert_bias")]
    assert len(bias_keys) == 2 and all(biases[0][k].abs().sum() > 0 for k in bias_keys)
    assert all(torch.equal(biases[0][k], biases[1][k]) for k in bias_keys)


def test_aux_free_bias_moves_load_toward_uniform_in_training(corpus_cache, tmp_path):
    """Same seed and data, no balance loss in either run: the collapse 'none' drifts into, the bias undoes.

    A high learning rate makes the unbalanced router collapse within tens of steps; load is the heaviest
    expert's tokens over the mean expert's (8 at total collapse, top-1 of 8), averaged over the last 30 steps.
    """
    skew = {}
    for balance in ("none", "aux_free"):
        _train(tmp_path / balance, steps=60, lr=1e-2, balance=balance, bias_update_rate=0.01)
        counts = trace.load(tmp_path / balance).counts[-30:].astype(float)
        skew[balance] = float((counts.max(axis=-1) / counts.mean(axis=-1)).mean())
    assert skew["none"] > 5.0 and skew["aux_free"] < 0.8 * skew["none"], skew
