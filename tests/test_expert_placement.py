"""Placement that acts: replicas and migration in expert-parallel training, against the static sharding.

The multi-process tests run gloo on CPU: a run placing experts by ``phase`` or ``history`` (with copies of hot
experts and migrations) trains the same model as the static run, so its losses match within float rounding and
its logical counts are identical, step by step.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_trace import cli, expert_placement, synth, trace
from moe_trace.errors import UsageError
from placement import policies
from placement.cost import CostModel
from placement.dispatch import RULES, expert_tokens, gpu_tokens, routes
from placement.planners import PlacementError, Plan, plan
from placement.policies import Setting

TINY = dict(n_blocks=2, hidden=32, heads=2, num_experts=4, moe_every=1, seq_len=32)
TINY_ARGS = ["--model", "gpt-tiny-moe", "--blocks", "2", "--hidden", "32", "--heads", "2", "--experts", "4",
             "--moe-every", "1", "--seq-len", "32", "--global-batch", "8", "--device", "cpu", "--eval-every", "1000",
             "--threads", "1"]
STEPS = 40


# ---------------------------------------------------------------------------------------------------
# Pure parts: the dispatch table, the online policies, placement.parquet


def _plans_for_routes(rng):
    """Planned one-layer plans (copies of hot experts, empty slots left by greedy), and two by hand: an empty slot
    and two copies of expert 0 on GPU 0; more GPUs than experts, each expert on two of them."""
    for _ in range(40):
        ranks = int(rng.integers(2, 5))
        experts = ranks * int(rng.integers(1, 4))
        redundant = min(ranks * int(rng.integers(0, 3)), experts * (ranks - 1))
        yield plan(rng.random((1, experts)) ** 3, ranks, redundant=redundant, method=("eplb", "greedy")[_ % 2])
    yield Plan(np.array([[0, 0, 1, -1, 0, 2]]), np.array([[3, 1, 1]]), gpus=3)
    yield Plan(np.array([[1, 0, 1, 0]]), np.array([[2, 2]]), gpus=4)


@pytest.mark.parametrize("rule", RULES)
def test_routes_round_each_copys_share_to_whole_tokens_by_largest_remainder(rule):
    """Every token is sent once, as int64 rows; the tokens an expert's copies on one GPU get are its share by
    ``rule`` (expert_tokens) rounded down or up, and only the shares with the largest fractional parts go up."""
    rng = np.random.default_rng(1)
    for one_layer in _plans_for_routes(rng):
        ranks, experts = one_layer.gpus, one_layer.num_experts
        counts = rng.integers(0, 50, (ranks, experts))
        rows = routes(counts, one_layer, rule)
        assert rows.dtype == np.int64
        slot_expert = one_layer.slot_expert[0]
        gpu_of_slot = np.arange(len(slot_expert)) // one_layer.slots_per_gpu
        whole = np.zeros((ranks, experts), dtype=np.int64)  # [gpu, expert]
        for slot, expert in enumerate(slot_expert):
            if expert >= 0:
                whole[gpu_of_slot[slot], expert] += rows[:, slot].sum()
            else:
                assert not rows[:, slot].any()  # an empty slot receives nothing
        for expert in range(experts):
            assert rows[:, slot_expert == expert].sum(axis=1).tolist() == counts[:, expert].tolist()
        share = expert_tokens(counts.sum(axis=0)[None, None], one_layer, rule)[0, 0]
        floor = np.floor(share + 1e-9)
        assert ((whole == floor) | (whole == floor + 1)).all()
        fraction = share - floor
        for expert in range(experts):
            up, down = whole[:, expert] > floor[:, expert], whole[:, expert] == floor[:, expert]
            down &= one_layer.hosts()[0, :, expert]
            if up.any() and down.any():
                assert fraction[up, expert].min() >= fraction[down, expert].max() - 1e-9


def test_routes_need_a_one_layer_plan_over_the_ranks():
    two_layers = plan(np.ones((2, 4)), 2)
    with pytest.raises(PlacementError, match="one-layer plan over 2 GPUs"):
        routes(np.ones((2, 4), dtype=np.int64), two_layers)
    with pytest.raises(PlacementError, match="one-layer plan over 3 GPUs"):
        routes(np.ones((3, 4), dtype=np.int64), plan(np.ones((1, 4)), 2))


def test_expert_tokens_add_up_to_the_gpus_tokens():
    counts, _ = synth.generate(layers=3, experts=8, steps=50, tokens_per_step=512)
    plans = plan(counts[:10].mean(axis=0), 4, redundant=4)
    for rule in RULES:
        split = expert_tokens(counts, plans, rule)
        np.testing.assert_allclose(split.sum(axis=-1), gpu_tokens(counts, plans, rule))
        np.testing.assert_allclose(split.sum(axis=2), counts)
    np.testing.assert_array_equal(expert_tokens(counts, plans), expert_tokens(counts, plans, "balanced"))


@pytest.mark.parametrize("every", [None, 30])
def test_online_policies_take_the_simulators_decisions(every):
    counts, meta = synth.generate(layers=2, experts=8, steps=1200, switch_step=600, tokens_per_step=4096)
    props = trace.proportions(counts)
    setting = Setting(4, 4, CostModel.from_meta(meta))
    for policy in policies.get("history,predict,phase", replan_every=every):
        batched = policy.schedule(counts, props, setting)
        online = policies.online_schedule(policy, counts, props, setting)
        assert [t for t, _ in online] == [t for t, _ in batched], policy.name
        for (_, a), (_, b) in zip(online, batched, strict=True):
            assert np.array_equal(a.slot_expert, b.slot_expert), policy.name


def test_placement_file_round_trip(tmp_path):
    plans = [(0, np.array([[0, 1, 2, -1], [3, 2, 1, 0]])), (7, np.array([[0, 1, 2, 0], [3, 2, 1, 3]]))]
    trace.write_placement(tmp_path / "placement.parquet", plans, [1, 3])
    loaded = trace.load_placement(tmp_path / "placement.parquet")
    assert [s for s, _ in loaded] == [0, 7]
    for (_, a), (_, b) in zip(loaded, plans, strict=True):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("request_args,message", [
    (("phase", 0, None, 1, 4, True), "torchrun"),
    (("static", 2, None, 1, 4, True), "torchrun"),
    (("phase", 3, None, 2, 4, True), "not a multiple of the 2 ranks"),
    (("phase", 8, None, 2, 4, True), "at most 4 extra copies"),
    (("oracle", 2, None, 2, 4, True), "training can follow"),
    (("phase", 2, 0, 2, 4, True), "--replan-every"),
    (("phase", 2, None, 2, 4, False), "--no-record"),
    (("phase", 2, None, 2, 4, True, "adamw_bf16"), "use --optimizer adamw"),
    (("static", 0, None, 1, 4, True, "adamw", "padded"), "torchrun"),
])
def test_placements_that_cannot_run_are_refused(request_args, message):
    with pytest.raises(UsageError, match=message):
        expert_placement.check_request(*request_args)


def test_the_padded_exchange_takes_spare_slots():
    expert_placement.check_request("phase", 2, None, 2, 4, True, "adamw", "padded")  # no error


def test_placement_without_expert_parallelism_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *TINY_ARGS, "--placement", "phase"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torchrun --nproc-per-node" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# Training under gloo: the same losses and counts as the static sharding


def _worker(rank: int, world: int, base: str) -> None:
    from moe_trace.model import make_config
    from moe_trace.train import TrainConfig, train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # Placement changes only the order in which an expert's gradient is summed (per copy, then across copies). In
    # float32 that reassociation (~1e-7) can flip a near-tie in routing after a few dozen steps; in float64 it
    # stays far below any tie, so the counts must agree exactly.
    torch.set_default_dtype(torch.float64)
    # A file store has no port to race for; the timeout turns a stuck collective into a failure, not a hang.
    dist.init_process_group("gloo", init_method=f"file://{base}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model_config = make_config("gpt-tiny-moe", **TINY)
        # Short cadences force re-plans (and migrations) within the run.
        # The padded exchange (no host read) under re-plans that move experts between ranks, one slot each, and
        # under re-plans that copy them (each copy an equal run of every rank's rows of its expert).
        # The padded runs also take DDP buckets of 1 kB (many buckets): bucketing must not change the sums.
        for name, redundant, every, exchange in (("static", 0, None, "counts"), ("phase", world, 5, "counts"),
                                                 ("history", world, 10, "counts"), ("history", 0, 5, "padded"),
                                                 ("phase", world, 5, "padded")):
            config = TrainConfig(out=f"{base}/{name}-{exchange}", steps=STEPS, global_batch=8, warmup=5,
                                 eval_every=1000, checkpoint_every=STEPS, flush_every=10, placement=name,
                                 redundant=redundant, replan_every=every, expert_exchange=exchange,
                                 ddp_bucket_mb=0.001 if exchange == "padded" else None)
            train(model_config, config, "cpu")
    finally:
        # train() leaves a caller's process group alone; it ends here, once the models are freed.
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_placed_training_matches_the_static_sharding(corpus_cache, tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path)), nprocs=world)
    static = trace.load(tmp_path / "static-counts")
    static_loss = trace.load_metrics(tmp_path / "static-counts")["loss"]
    assert static.steps.tolist() == list(range(STEPS))
    assert [s for s, _ in trace.load_placement(tmp_path / "static-counts" / "placement.parquet")] == [0]
    static_experts = _final_experts(tmp_path / "static-counts", world)
    for name in ("phase-counts", "history-counts", "history-padded", "phase-padded"):
        placed = trace.load(tmp_path / name)
        assert np.array_equal(placed.counts, static.counts), name
        np.testing.assert_allclose(trace.load_metrics(tmp_path / name)["loss"], static_loss, rtol=1e-5, atol=1e-6)
        plans = trace.load_placement(tmp_path / name / "placement.parquet")
        copies = [np.bincount(row[row >= 0]).max() for _, slot_expert in plans for row in slot_expert]
        if name == "history-padded":  # no spare slots: re-plans move experts between ranks, never copy them
            assert max(copies) == 1, name
            moves = TINY["num_experts"] > world  # with one expert per rank every plan is as good as any other
        else:
            assert max(copies) >= 2, f"{name}: no expert was replicated"
            moves = True
        assert plans[0][0] == 0 and (len(plans) >= 2 or not moves), f"{name}: no migration"
        # After the last step: every copy of an expert is the same tensor, and it is the static run's expert.
        for key, weights in _final_experts(tmp_path / name, world).items():
            assert all(torch.equal(copy, weights[0]) for copy in weights[1:]), f"{name}: copies of {key} differ"
            torch.testing.assert_close(weights[0], static_experts[key][0], rtol=1e-4, atol=1e-6)


def _final_experts(run_dir, world: int) -> dict[tuple, list[torch.Tensor]]:
    """``(block, weight name, expert) -> [its copies]`` from the ranks' last checkpoints."""
    shards = [torch.load(run_dir / "checkpoints" / f"step-{STEPS:010d}.rank-{rank}.pt", weights_only=False,
                         map_location="cpu")
              for rank in range(world)]
    slot_expert = shards[0]["placement"]["slot_expert"]
    slots = slot_expert.shape[1] // world
    experts: dict[tuple, list[torch.Tensor]] = {}
    for layer, block in enumerate(trace.load(run_dir).layers):
        for slot, expert in enumerate(slot_expert[layer]):
            if expert >= 0:
                for weight in ("w1", "w2"):
                    rows = shards[slot // slots]["model"][f"blocks.{block}.mlp.{weight}"]
                    experts.setdefault((block, weight, int(expert)), []).append(rows[slot % slots])
    return experts


# ---------------------------------------------------------------------------------------------------
# kill -9 after a migration, then --resume


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "moe_trace", "train", *args]


def _checkpoints_of_both_ranks(run_dir) -> set[int]:
    steps = [{int(p.name[5:15]) for p in (run_dir / "checkpoints").glob(f"step-*.rank-{rank}.pt")} for rank in (0, 1)]
    return steps[0] & steps[1]


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for child in children for c in (child, *_descendants(int(child)))]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc (Linux)")
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sigkill_after_a_migration_then_resume_records_every_step_once(corpus_cache, tmp_path):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--placement", "history", "--redundant", "2", "--replan-every", "10",
            "--checkpoint-every", "15", "--flush-every", "5"]
    process = subprocess.Popen(_torchrun("--out", str(out), "--steps", "2000", *args),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while max(_checkpoints_of_both_ranks(out), default=0) < 30:  # past the re-plans at steps 10 and 20
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    for pid in [process.pid, *_descendants(process.pid)]:  # the launcher and its ranks (not in its session)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate()

    killed = trace.load(out)
    assert killed.steps.tolist() == list(range(len(killed))) and len(killed) >= 30
    stop = len(killed) + 15  # the run may have got further than step 30 before the kill reached it
    resumed = subprocess.run(_torchrun("--out", str(out), "--resume", "--steps", str(stop), "--threads", "1"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = trace.load(out)
    assert final.steps.tolist() == list(range(stop))
    assert (final.counts.sum(axis=2) == 8 * 32 * 2).all()
    assert trace.load_metrics(out)["step"].tolist() == list(range(stop))
    steps = [s for s, _ in trace.load_placement(out / "placement.parquet")]
    assert steps[0] == 0 and 10 in steps and steps == sorted(set(steps))  # each plan once, a migration at step 10


# ---------------------------------------------------------------------------------------------------
# On 2 GPUs: NCCL, compiled (the default there), migrations


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nvidia-h200-x2)")
@pytest.mark.parametrize("placement", [
    ["--placement", "phase", "--redundant", "2", "--replan-every", "5"],
    ["--placement", "history", "--replan-every", "5", "--expert-exchange", "padded"],
], ids=["phase-replicas", "history-padded"])
def test_placed_training_on_two_gpus_keeps_copies_identical(corpus_cache, tmp_path, placement):
    """What the gloo tests show, through the command line on NCCL and compiled: every step recorded once with
    its tokens, re-plans made, and every copy of an expert the same tensor after the last step."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--device", "cuda", "--steps", str(STEPS), "--checkpoint-every", str(STEPS), *placement]
    run = subprocess.run(_torchrun("--out", str(out), *args), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    recorded = trace.load(out)
    assert recorded.steps.tolist() == list(range(STEPS))
    assert (recorded.counts.sum(axis=2) == 8 * 32 * 2).all()
    assert len(trace.load_placement(out / "placement.parquet")) >= 2, "no re-plan"
    for key, weights in _final_experts(out, 2).items():
        assert all(torch.equal(copy, weights[0]) for copy in weights[1:]), f"copies of {key} differ"
