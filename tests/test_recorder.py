"""The count recorder and metrics log: blocks, flushes, sentinel ids and resume truncation."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_trace import trace
from moe_trace.recorder import MetricsLog, Recorder

META = trace.make_meta(model="test", num_experts=3, top_k=1, moe_layers=[1, 3], tokens_per_step=6, seq_len=2,
                       global_batch=3, seed=0, moe_backend="torch", attention="sdpa", world_size=1)


def add_layers(recorder, counts):
    """One micro-batch's ``[layers, experts]`` counts, as the MoE layers' hooks add them."""
    for layer, row in enumerate(counts):
        recorder.add_counts(layer, row)


def test_micro_batches_sum_and_parts_cover_every_step(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=4)
    rng = np.random.default_rng(0)
    expected = rng.integers(0, 10, size=(11, 2, 2, 3))  # steps, micro-batches, layers, experts
    for step in range(11):
        for micro in range(2):
            add_layers(recorder, torch.from_numpy(expected[step, micro]))
        recorder.step(step)
        if step in (5, 10):  # flushes mid-block and at a block boundary
            recorder.flush()
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == list(range(11))
    assert np.array_equal(loaded.counts, expected.sum(axis=1))
    assert len(list((tmp_path / "trace").glob("part-*.parquet"))) == 2


def test_disabled_writer_writes_nothing(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2, write=False)
    add_layers(recorder, torch.ones(2, 3, dtype=torch.int64))
    recorder.step(0)
    recorder.flush()
    assert not (tmp_path / "trace").exists()


def test_expert_ids_are_counted_and_sentinels_dropped(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=4)
    recorder.add_expert_ids(0, torch.tensor([[0, 2], [2, -1], [3, 1]]))  # -1 and 3 (= experts) are padding
    recorder.add_expert_ids(1, torch.tensor([1, 1], dtype=torch.int16))  # any integer dtype
    recorder.step(7)
    recorder.flush()
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == [7]
    assert loaded.counts[0].tolist() == [[1, 1, 2], [0, 2, 0]]


def test_steps_must_increase_and_flush_every_writes_parts(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2, flush_every=3)
    parts = []
    for step in (0, 2, 5, 6, 7, 9, 10):  # steps need not be consecutive
        add_layers(recorder, torch.ones(2, 3, dtype=torch.int64))
        recorder.step(step)
        parts.append(len(list((tmp_path / "trace").glob("part-*.parquet"))))
    assert parts == [0, 0, 1, 1, 1, 2, 2]  # a part every third step, not before, not after
    assert (tmp_path / "trace" / "part-0000000006-0000000009.parquet").exists()
    with pytest.raises(ValueError, match="must increase"):
        recorder.step(10)
    recorder.close()
    assert trace.load(tmp_path / "trace").steps.tolist() == [0, 2, 5, 6, 7, 9, 10]


def test_first_flush_replaces_rows_from_the_first_recorded_step(tmp_path):
    trace.write(tmp_path / "trace", np.full((6, 2, 3), 5), META)  # a killed run's steps 0..5
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"))
    for step in (3, 4):  # resumed from a checkpoint at step 3
        add_layers(recorder, torch.ones(2, 3, dtype=torch.int64))
        recorder.step(step)
    recorder.close()
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == [0, 1, 2, 3, 4]
    assert loaded.counts[:, 0, 0].tolist() == [5, 5, 5, 1, 1]


def test_metrics_log_keeps_rows_before_the_resume_step(tmp_path):
    path = tmp_path / "metrics.parquet"
    log = MetricsLog(path)
    for step in range(6):
        log.add(step=step, loss=torch.tensor(float(step)), lr=0.1, grad_norm=torch.tensor(1.0),
                aux_loss=torch.tensor(0.01), step_time_s=0.5, tokens=6)
    log.flush()
    resumed = MetricsLog(path, resume_step=4)
    assert trace.load_metrics(path)["step"].tolist() == [0, 1, 2, 3]  # at once: the trace lost steps 4 and 5 too
    resumed.add(step=4, loss=40.0, lr=0.1, grad_norm=1.0, aux_loss=0.01, step_time_s=0.5, tokens=6)
    resumed.flush()
    columns = trace.load_metrics(path)
    assert columns["step"].tolist() == [0, 1, 2, 3, 4]
    assert columns["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 40.0]



def test_counts_beyond_float32_precision_stay_exact(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2)
    big = torch.tensor([[2**40 + 1, 0, 3], [1, 2**53 - 1, 0]])
    add_layers(recorder, big)
    recorder.step(0)
    recorder.close()
    assert trace.load(tmp_path / "trace").counts[0].tolist() == big.tolist()


def test_sizes_missing_from_meta_come_from_the_first_step_whose_inputs_were_seen(tmp_path):
    meta = {**META, "tokens_per_step": None, "seq_len": None, "global_batch": None, "world_size": 2}
    recorder = Recorder(tmp_path / "trace", meta, torch.device("cpu"))
    recorder.step(0)  # no counted forward (recording was off): nothing to tell the sizes from
    for step in (1, 2):
        for _ in range(2):  # micro-batches of 3 sequences of 5 tokens on each of 2 ranks
            recorder.add_sequences(3, 5)
            add_layers(recorder, torch.ones(2, 3, dtype=torch.int64))
        recorder.step(step)
    recorder.close()
    written = trace.read_meta(tmp_path / "trace")
    assert (written["global_batch"], written["seq_len"], written["tokens_per_step"]) == (12, 5, 60)
    given = Recorder(tmp_path / "given", {**meta, "seq_len": 4}, torch.device("cpu"))  # what meta gives stays
    given.add_sequences(3, 5)
    add_layers(given, torch.ones(2, 3, dtype=torch.int64))
    given.step(0)
    given.close()
    written = trace.read_meta(tmp_path / "given")
    assert (written["global_batch"], written["seq_len"], written["tokens_per_step"]) == (6, 4, 30)


def test_dropped_assignments_are_recorded_beside_the_counts(tmp_path):
    recorder = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2, dropped=True)
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 10, size=(3, 2, 3))
    dropped = rng.integers(0, 5, size=(3, 2, 3))
    for step in range(3):
        for layer in range(2):
            recorder.add_counts(layer, torch.from_numpy(counts[step, layer]))
            recorder.add_dropped(layer, torch.from_numpy(dropped[step, layer]))
        recorder.step(step)
    recorder.close()
    loaded = trace.load(tmp_path / "trace")
    assert np.array_equal(loaded.counts, counts) and np.array_equal(loaded.dropped, dropped)


def test_a_rank_that_does_not_write_leaves_the_trace_alone(tmp_path):
    writer = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2)
    for step in range(3):
        add_layers(writer, torch.ones(2, 3, dtype=torch.int64))
        writer.step(step)
        writer.flush()  # three parts, not merged yet
    parts = sorted((tmp_path / "trace").iterdir())
    other = Recorder(tmp_path / "trace", META, torch.device("cpu"), block=2, write=False)
    add_layers(other, torch.ones(2, 3, dtype=torch.int64))
    other.step(0)
    other.close()
    assert sorted((tmp_path / "trace").iterdir()) == parts
    Recorder(tmp_path / "elsewhere", META, torch.device("cpu"), write=False).close()
    assert not (tmp_path / "elsewhere").exists()


def test_metrics_log_of_a_fresh_run_drops_a_stale_file_and_one_that_does_not_write_writes_nothing(tmp_path):
    path = tmp_path / "metrics.parquet"
    row = dict(loss=1.0, lr=0.1, grad_norm=1.0, aux_loss=0.01, step_time_s=0.5, tokens=6)
    stale = MetricsLog(path)
    for step in range(3):
        stale.add(step=step, **row)
    stale.flush()
    MetricsLog(path, write=False)  # another rank of the new run: leaves the file to rank 0
    assert trace.load_metrics(path)["step"].tolist() == [0, 1, 2]
    fresh = MetricsLog(path)  # a new run from step 0 over the same directory
    assert not path.exists()
    fresh.add(step=0, **{**row, "loss": 9.0})
    fresh.flush()
    assert trace.load_metrics(path)["loss"].tolist() == [9.0]
    resumed = MetricsLog(tmp_path / "none" / "metrics.parquet", resume_step=4)  # resumed before any flush
    resumed.add(step=4, **row)
    resumed.flush()
    assert trace.load_metrics(tmp_path / "none" / "metrics.parquet")["step"].tolist() == [4]
    quiet = MetricsLog(tmp_path / "rank1" / "metrics.parquet", write=False)
    quiet.add(step=0, **row)
    quiet.flush()
    assert not (tmp_path / "rank1").exists()


def _count_on_two_ranks(rank, store, trace_dir, block):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        recorder = Recorder(trace_dir, {**META, "world_size": 2}, torch.device("cpu"), block=block, write=rank == 0)
        for step in range(5):
            add_layers(recorder, torch.full((2, 3), 10 * rank + step, dtype=torch.int64))
            recorder.step(step)
        recorder.close()
    finally:
        dist.destroy_process_group()


def test_data_parallel_counts_are_summed_over_the_ranks(tmp_path):
    # fork, not spawn: the ranks need no fresh interpreter (gloo on CPU), and importing torch twice takes seconds
    mp.start_processes(_count_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "trace"), 2), nprocs=2,
                       start_method="fork")
    loaded = trace.load(tmp_path / "trace")
    assert loaded.steps.tolist() == list(range(5))
    assert loaded.counts[:, 0, 0].tolist() == [10 + 2 * step for step in range(5)]  # rank 0's + rank 1's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_moe_step_and_recording_do_not_sync_with_the_host(tmp_path):
    """Training steps across several recorder blocks (each ends in an all-reduce-free copy to pinned host
    memory) run without a host sync; only the flush, which training runs every ``--flush-every`` steps, waits."""
    from moe_trace import record
    from moe_trace.moe import MoELayer

    layer = MoELayer(hidden=64, ffn=128, num_experts=4, top_k=1).cuda()
    recorder = record.attach(layer, tmp_path, meta={"tokens_per_step": 512, "seq_len": 256, "global_batch": 2},
                             block=4, flush_every=None)
    x = torch.randn(256, 64, device="cuda")
    recorder.enabled = False
    layer(x)  # warm-up, not recorded: first calls may allocate with syncs
    recorder.enabled = True
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
                    recorded.append(layer.tokens_per_expert.clone())
                recorder.step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    train_steps(range(10))  # blocks [0, 4) and [4, 8) copied to the host, steps 8, 9 still on the device
    recorder.flush()  # mid-block
    train_steps(range(10, 17))  # a fresh block after the flush: [10, 14), then 14..16
    recorder.close()
    loaded = trace.load(tmp_path)
    assert loaded.steps.tolist() == list(range(17))
    expected = torch.stack(recorded).view(17, 2, 1, 4).sum(dim=1).cpu().numpy()
    assert np.array_equal(loaded.counts, expected)
    assert (loaded.counts.sum(axis=2) == 2 * 256).all()
