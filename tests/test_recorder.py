"""The count recorder and metrics log: blocks, flushes and resume truncation."""

import numpy as np
import pytest
import torch

from moe_trace import trace
from moe_trace.recorder import CountRecorder, MetricsLog

META = trace.make_meta(model="test", num_experts=3, top_k=1, moe_layers=[1, 3], tokens_per_step=6, seq_len=2,
                       global_batch=3, seed=0, moe_backend="torch", attention="sdpa", world_size=1)


def test_micro_batches_sum_and_parts_cover_every_step(tmp_path):
    recorder = CountRecorder(tmp_path / "trace", META, torch.device("cpu"), block=4)
    rng = np.random.default_rng(0)
    expected = rng.integers(0, 10, size=(11, 2, 2, 3))  # steps, micro-batches, layers, experts
    for step in range(11):
        for micro in range(2):
            recorder.add(torch.from_numpy(expected[step, micro]))
        recorder.end_step(step)
        if step in (5, 10):  # flushes mid-block and at a block boundary
            recorder.flush()
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == list(range(11))
    assert np.array_equal(loaded.counts, expected.sum(axis=1))
    assert len(list((tmp_path / "trace").glob("part-*.parquet"))) == 2


def test_disabled_writer_writes_nothing(tmp_path):
    recorder = CountRecorder(tmp_path / "trace", META, torch.device("cpu"), block=2, write=False)
    recorder.add(torch.ones(2, 3, dtype=torch.int64))
    recorder.end_step(0)
    recorder.flush()
    assert not (tmp_path / "trace").exists()


def test_metrics_log_keeps_rows_before_the_resume_step(tmp_path):
    path = tmp_path / "metrics.parquet"
    log = MetricsLog(path)
    for step in range(6):
        log.add(step=step, loss=torch.tensor(float(step)), lr=0.1, grad_norm=torch.tensor(1.0),
                aux_loss=torch.tensor(0.01), step_time_s=0.5, tokens=6)
    log.flush()
    resumed = MetricsLog(path, resume_step=4)
    resumed.add(step=4, loss=40.0, lr=0.1, grad_norm=1.0, aux_loss=0.01, step_time_s=0.5, tokens=6)
    resumed.flush()
    columns = trace.load_metrics(path)
    assert columns["step"].tolist() == [0, 1, 2, 3, 4]
    assert columns["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 40.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_moe_step_and_recording_do_not_sync_with_the_host(tmp_path):
    """Training steps across several recorder blocks (each ends in an all-reduce-free copy to pinned host
    memory) run without a host sync; only the flush, which training runs every ``--flush-every`` steps, waits."""
    from moe_trace.moe import MoELayer

    layer = MoELayer(hidden=64, ffn=128, num_experts=4, top_k=1).cuda()
    meta = {**META, "moe_layers": [1], "num_experts": 4}
    recorder = CountRecorder(tmp_path / "trace", meta, torch.device("cuda"), block=4)
    x = torch.randn(256, 64, device="cuda")
    layer(x)  # warm-up: first calls may allocate with syncs
    torch.cuda.synchronize()
    recorded = []

    def train_steps(steps):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in steps:
                for _ in range(2):  # micro-batches
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = layer(x)
                    (out.float().square().mean() + layer.aux_loss).backward()
                    recorder.add(layer.tokens_per_expert.unsqueeze(0))
                    recorded.append(layer.tokens_per_expert.clone())
                recorder.end_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    train_steps(range(10))  # blocks [0, 4) and [4, 8) copied to the host, steps 8, 9 still on the device
    recorder.flush()  # mid-block
    train_steps(range(10, 17))  # a fresh block after the flush: [10, 14), then 14..16
    recorder.flush()
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == list(range(17))
    expected = torch.stack(recorded).view(17, 2, 1, 4).sum(dim=1).cpu().numpy()
    assert np.array_equal(loaded.counts, expected)
    assert (loaded.counts.sum(axis=2) == 2 * 256).all()
