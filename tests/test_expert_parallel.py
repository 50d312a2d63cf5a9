"""Expert parallelism on CPU: two gloo processes against one process that sees both ranks' batches."""

from __future__ import annotations

import copy
import datetime

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_trace import expert_parallel
from moe_trace.model import GPT, make_config

WORLD = 2


def _loss(model: GPT, forward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, loss = forward(x[:, :-1], x[:, 1:])
    return logits, loss + model.aux_loss()


def _worker(rank: int, store_path: str, variant: dict, compiled: bool, exchange: str, device: str = "cpu",
            replicas: bool = False) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    # A file store has no port to race for; the timeout turns a stuck collective into a failure, not a hang.
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        _compare_with_one_process(rank, variant, compiled, exchange, device, replicas)
    finally:
        # Only once the models and their autograd graphs are freed: freeing them after the group is gone
        # can block.
        dist.destroy_process_group()


# Two spare slots: experts 0 and 2 have a copy on each rank (slots 0-2 on rank 0, 3-5 on rank 1).
REPLICA_PLAN = np.array([0, 1, 2, 2, 3, 0])


def _compare_with_one_process(rank: int, variant: dict, compiled: bool, exchange: str, device: str,
                              replicas: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, top_k=2, seq_len=16,
                         vocab_size=64, **variant)
    model = GPT(config)
    for layer in model.moe_layers:  # an aux-free bias that changes selections, the same on every rank
        if layer.expert_bias is not None:
            layer.expert_bias.copy_(0.02 * torch.randn(4, generator=torch.Generator().manual_seed(2)))
    model.to(device)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, config.vocab_size, (2 * WORLD, config.seq_len + 1),
                           generator=torch.Generator().manual_seed(1)).to(device)
    batches = tokens.chunk(WORLD)

    # Reference: one process, the ranks' batches as micro-batches of one step (what DDP averages over).
    ref_counts, ref_dropped, ref_logits = 0, 0, []
    for batch in batches:
        logits, loss = _loss(reference, reference, batch)
        (loss / WORLD).backward()
        ref_counts = ref_counts + reference.tokens_per_expert()
        ref_dropped = ref_dropped + reference.dropped_per_expert()
        ref_logits.append(logits.detach())
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)

    plan = np.stack([REPLICA_PLAN] * len(config.moe_blocks)) if replicas else None
    expert_names = expert_parallel.shard_experts(model, plan, exchange=exchange)
    ddp = expert_parallel.data_parallel(model, expert_names)
    # Compiled, the exchange runs eager between graphs (aot_eager: Dynamo's and AOTAutograd's graphs, no codegen).
    forward = expert_parallel.compile_data_parallel(ddp, backend="aot_eager") if compiled else ddp
    logits, loss = _loss(model, forward, batches[rank])
    loss.backward()
    expert_parallel.sync_replica_grads(model)  # every copy of an expert holds its whole gradient
    counts = model.tokens_per_expert()
    dist.all_reduce(counts)
    norm = expert_parallel.grad_norm(model)
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.5, norm)

    assert torch.equal(counts, ref_counts), "global counts differ from the single-process run"
    dropped = model.dropped_per_expert()
    dist.all_reduce(dropped)
    assert torch.equal(dropped, ref_dropped), "dropped assignments differ from the single-process run"
    assert (dropped.sum() > 0) == (config.capacity_factor is not None)
    model.update_expert_bias(counts)
    reference.update_expert_bias(ref_counts)
    for layer, ref_layer in zip(model.moe_layers, reference.moe_layers, strict=True):
        assert (layer.expert_bias is None) == (ref_layer.expert_bias is None)
        if layer.expert_bias is not None:
            assert torch.equal(layer.expert_bias, ref_layer.expert_bias)
    assert counts.sum() == 2 * WORLD * config.seq_len * config.top_k * len(config.moe_blocks)
    # On CUDA the experts run in bf16 grouped GEMMs over other row sets than the reference's, so sums round
    # differently; on CPU everything is float32.
    close = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(logits, ref_logits[rank], **close)
    torch.testing.assert_close(norm, ref_norm, **close)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        expected = ref_params[name].grad
        if name in expert_names:
            layer = model.get_submodule(name.rsplit(".", 1)[0])
            expected = expected[torch.as_tensor(layer.local_experts)]
        torch.testing.assert_close(param.grad, expected, **(dict(rtol=1e-4, atol=1e-6) if device == "cpu" else close),
                                   msg=f"gradient of {name}")


ROUTER_VARIANTS = dict(score="sigmoid", balance="aux_free", capacity_factor=1.0, shared_experts=1)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("variant", "compiled", "exchange"), [
    ({}, False, "counts"), ({}, True, "counts"), (ROUTER_VARIANTS, False, "counts"), (ROUTER_VARIANTS, True, "counts"),
    ({}, False, "padded"), ({}, True, "padded"), (ROUTER_VARIANTS, False, "padded"),
], ids=["default-eager", "default-compiled", "variants-eager", "variants-compiled", "padded-eager", "padded-compiled",
        "padded-variants"])
def test_expert_parallel_matches_one_process(tmp_path, variant, compiled, exchange):
    """Both exchanges, the host-sized one and the padded one with no host read, eager and compiled."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), variant, compiled, exchange), nprocs=WORLD)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize(("compiled", "exchange"), [(False, "counts"), (False, "padded"), (True, "padded")],
                         ids=["counts-eager", "padded-eager", "padded-compiled"])
def test_experts_with_copies_match_one_process(tmp_path, compiled, exchange):
    """Two experts with a copy on each rank: each exchange splits their rows over the copies by its own rule, and
    the copies' gradients summed make the one-process gradient."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), {}, compiled, exchange, "cpu", True), nprocs=WORLD)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (nvidia-h200-x2)")
@pytest.mark.parametrize("exchange", ["counts", "padded"])
def test_expert_parallel_matches_one_process_on_gpus(tmp_path, exchange):
    """NCCL and the bf16 grouped GEMM, whose padded rows (past the counts' sum) the padded exchange must drop."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), ROUTER_VARIANTS, False, exchange, "cuda"), nprocs=WORLD)


def test_memory_estimate_refuses_with_a_way_out():
    from moe_trace import memory
    from moe_trace.errors import UsageError

    config = make_config("gpt-350m-moe")  # 128 experts, ~13 B parameters
    counts = memory.count_parameters(config)
    assert 12.5e9 < counts.dense + counts.experts < 13.5e9
    gpu = 80 * memory.GIB
    with pytest.raises(UsageError, match=r"needs ~196 GiB per GPU.*torchrun --nproc-per-node 4.*--experts 32"):
        memory.choose_optimizer(config, gpu)
    assert memory.choose_optimizer(config, gpu, expert_parallel=4) == "adamw"
    assert memory.choose_optimizer(make_config("gpt-350m-moe", num_experts=32), gpu) == "adamw"


def test_compiled_data_parallel_is_not_split_at_buckets(tmp_path):
    """Dynamo splits a DDP model's graphs at every gradient bucket; compile_data_parallel makes the graphs the
    model alone makes (on CPU the expert loop breaks them anyway), and trains the same."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = make_config("gpt-tiny-moe", n_blocks=2, hidden=256, heads=4, num_experts=4, top_k=2, seq_len=16,
                             vocab_size=64)  # ~12 MB of float32 parameters
        tokens = torch.randint(0, config.vocab_size, (2, config.seq_len + 1),
                               generator=torch.Generator().manual_seed(1))
        graphs, grads = {}, {}
        for name in ("alone", "split", "whole"):
            torch.manual_seed(0)
            model = GPT(config)
            ddp = expert_parallel.data_parallel(model, [], bucket_cap_mb=1)  # Dynamo's smallest bucket
            compile_ = expert_parallel.compile_data_parallel if name == "whole" else torch.compile
            graphs[name] = []

            def counting_backend(gm, example_inputs, seen=graphs[name]):
                seen.append(gm)
                return gm.forward

            torch._dynamo.reset()
            _, loss = _loss(model, compile_(model if name == "alone" else ddp, backend=counting_backend), tokens)
            loss.backward()
            grads[name] = [p.grad for p in model.parameters()]
        assert len(graphs["whole"]) == len(graphs["alone"]) < len(graphs["split"])
        for whole, split in zip(grads["whole"], grads["split"], strict=True):
            torch.testing.assert_close(whole, split)
    finally:
        torch._dynamo.reset()  # the next test's compiles start from nothing
        dist.destroy_process_group()


def test_auto_exchange_is_padded_only_where_it_was_measured_faster():
    choose = expert_parallel.choose_exchange
    assert [choose("auto", ranks, True) for ranks in (1, 2, 4, 8)] == ["counts", "padded", "padded", "counts"]
    assert choose("auto", 2, False) == "counts"  # eager: the host read costs little
    assert choose("counts", 2, True) == "counts" and choose("padded", 8, False) == "padded"


def test_the_padded_exchange_splits_an_experts_rows_evenly_over_its_copies():
    """Pure layout, no collective: every row lands once in its destination's share, each slot's rows are a
    contiguous run of its own expert's rows, and an expert's copies get equal runs (within one row)."""
    world, slots = 2, 3
    slot_expert = np.array([0, 1, 2, 0, 3, 1])  # experts 0 and 1 have a copy on each rank
    copies = expert_parallel.copies_of_experts(slot_expert, np.bincount(slot_expert), world)
    assert copies.tolist() == [[0, 3], [1, 5], [2, 2], [4, 4]]
    replicas = torch.tensor([2, 2, 1, 1])
    for seed in range(20):
        n = torch.randint(0, 9, (4,), generator=torch.Generator().manual_seed(seed))
        rows = int(n.sum())
        position, per_slot = expert_parallel.send_layout(n, torch.from_numpy(copies), replicas, slots, rows)
        share, offset = position // max(rows, 1), position % max(rows, 1)
        assert len(set(position.tolist())) == rows  # every row once
        for expert in range(4):
            got = per_slot[torch.from_numpy(copies[expert, :int(replicas[expert])])]
            assert got.sum() == n[expert] and got.max() - got.min() <= 1, (seed, expert, got)
        expert_of_row = torch.repeat_interleave(torch.arange(4), n)
        for d in range(world):  # share d: its slots' runs one after the other from the front
            starts = torch.cat([torch.zeros(1, dtype=torch.long), per_slot[d * slots:(d + 1) * slots].cumsum(0)])
            for j in range(slots):
                mine = (share == d) & (offset >= starts[j]) & (offset < starts[j + 1])
                assert mine.sum() == per_slot[d * slots + j]
                assert (expert_of_row[mine] == slot_expert[d * slots + j]).all()
                assert torch.equal(offset[mine], torch.arange(int(starts[j]), int(starts[j + 1])))
