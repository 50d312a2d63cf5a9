"""moe-trace import: hand-written Megatron-LM and SGLang logs (formats read from their sources) round-trip.

The fixtures are written from each format's definition (see moe_trace/integrations/megatron.py, sglang.py)
from known global counts; the imported trace must equal their sums. Megatron's rank order is tested by
giving every expert-parallel rank, data-parallel replica and pipeline stage different counts.
"""

import json

import numpy as np
import pytest
import torch

from moe_trace import trace
from moe_trace.cli import main

STEPS, EXPERTS, TOP_K, MICRO = 40, 4, 2, 2


def truth(rng, steps, replicas, blocks, tokens=24):
    """counts[step, replica, micro-batch, block, expert] of tokens x top-k assignments each."""
    p = rng.dirichlet(np.ones(EXPERTS), size=(steps, replicas, MICRO, blocks))
    draws = np.array([[[[rng.multinomial(tokens * TOP_K, q) for q in blk] for blk in mb] for mb in rep] for rep in p])
    return draws.astype(np.int64)


def write_tokens_per_expert(save, counts, ep, pp, etp=1):
    """Megatron --save-tokens-per-expert-interval output for ``counts`` (global blocks = stage * per + local)."""
    steps, replicas, _, blocks, _ = counts.shape
    per_stage, local = blocks // pp, EXPERTS // ep
    folder = save / "tokens_per_expert"
    folder.mkdir(parents=True)
    for stage in range(pp):
        for edp in range(replicas):
            for e in range(ep):
                for t in range(etp):
                    rank = t + etp * (e + ep * (edp + replicas * stage))  # order tp-cp-ep-dp-pp
                    with open(folder / f"rank{rank}.jsonl", "w") as f:
                        for step in range(steps):
                            for layer in range(per_stage):
                                tpe = counts[step, edp, :, stage * per_stage + layer, e * local:(e + 1) * local]
                                f.write(json.dumps({"iter": step + 1, "block": "decoder", "layer": layer,
                                                    "tpe": tpe.tolist()}) + "\n")
                            if stage == pp - 1:
                                f.write(json.dumps({"iter": step + 1, "block": "mtp", "mtp_idx": 0, "layer": 0,
                                                    "tpe": [[1] * local]}) + "\n")
    return folder


@pytest.fixture
def megatron_save(tmp_path):
    counts = truth(np.random.default_rng(0), STEPS, replicas=2, blocks=4)  # ep 2 x dp 2 x pp 2: 8 ranks
    write_tokens_per_expert(tmp_path / "save", counts, ep=2, pp=2)
    return tmp_path / "save", counts.sum(axis=(1, 2))


def test_megatron_tokens_per_expert_round_trip(megatron_save, tmp_path, capsys):
    save, expected = megatron_save
    out = tmp_path / "trace"
    assert main(["import", "megatron", str(save), "--out", str(out), "--ep-size", "2", "--pp-size", "2",
                 "--top-k", str(TOP_K), "--experts", str(EXPERTS)]) == 0
    assert "skipped 160 multi-token-prediction (mtp) records" in capsys.readouterr().err
    loaded = trace.load(out)
    assert loaded.layers == [0, 1, 2, 3]
    assert loaded.steps.tolist() == list(range(STEPS))
    assert np.array_equal(loaded.counts, expected)
    assert loaded.meta["tokens_per_step"] == 2 * MICRO * 24  # replicas x micro-batches x tokens
    assert loaded.meta["rank_order"] == "tp-cp-ep-dp-pp" and loaded.meta["world_size"] == 8


def test_megatron_expert_tensor_parallel_ranks_are_counted_once(tmp_path):
    counts = truth(np.random.default_rng(1), 5, replicas=1, blocks=2)
    write_tokens_per_expert(tmp_path / "save", counts, ep=2, pp=1, etp=2)
    assert main(["import", "megatron", str(tmp_path / "save"), "--out", str(tmp_path / "t"), "--ep-size", "2",
                 "--etp-size", "2", "--top-k", str(TOP_K)]) == 0
    assert np.array_equal(trace.load(tmp_path / "t").counts, counts.sum(axis=(1, 2)))


def test_megatron_truncated_last_line_skips_that_step(megatron_save, tmp_path, capsys):
    save, expected = megatron_save
    path = save / "tokens_per_expert" / "rank1.jsonl"
    text = path.read_text()
    path.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"iter": 40, "block": "dec')  # killed mid-write
    assert main(["import", "megatron", str(save), "--out", str(tmp_path / "t"), "--ep-size", "2", "--pp-size", "2",
                 "--top-k", str(TOP_K)]) == 0
    err = capsys.readouterr().err
    assert "truncated last line of rank1.jsonl" in err and "1 step (39)" in err
    loaded = trace.load(tmp_path / "t")
    assert loaded.steps.tolist() == list(range(STEPS - 1))
    assert np.array_equal(loaded.counts, expected[:-1])


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing files rank3 of pipeline stage 0"),
    ("experts", "inconsistent expert counts"),
    ("garbage", "rank2.jsonl:3: not a JSON record"),
    ("no_top_k", "--top-k is needed"),
    ("experts_flag", "--experts 6, but the files hold 2 local experts x --ep-size 2 = 4"),
])
def test_megatron_bad_input_is_one_line_and_exit_2(megatron_save, tmp_path, capsys, damage, message):
    save, _ = megatron_save
    folder = save / "tokens_per_expert"
    args = ["import", "megatron", str(save), "--out", str(tmp_path / "t"), "--ep-size", "2", "--pp-size", "2",
            "--top-k", str(TOP_K)]
    if damage == "missing":
        (folder / "rank3.jsonl").unlink()
    elif damage == "experts":
        with open(folder / "rank0.jsonl", "a") as f:
            f.write(json.dumps({"iter": 99, "block": "decoder", "layer": 0, "tpe": [[1, 2, 3]]}) + "\n")
    elif damage == "garbage":
        lines = (folder / "rank2.jsonl").read_text().splitlines(keepends=True)
        lines[2] = "not json\n"
        (folder / "rank2.jsonl").write_text("".join(lines))
    elif damage == "no_top_k":
        args = args[:-2]
    else:
        args += ["--experts", "6"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "t").exists()


def write_router_trace(folder, counts_per_rank_ids, pp):
    """router_trace_rank{r}.jsonl: one record per micro-batch with each token's top-k global ids."""
    folder.mkdir()
    for rank, records in counts_per_rank_ids.items():
        with open(folder / f"router_trace_rank{rank}.jsonl", "w") as f:
            for step, layer, ids in records:
                f.write(json.dumps({"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer,
                                    "rank": rank, "num_tokens": len(ids), "topk": TOP_K,
                                    "top_indices": ids.tolist()}) + "\n")


def test_megatron_routing_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    world, pp, per_stage = 4, 2, 2  # 2 data-parallel ranks per stage, 2 MoE blocks per stage
    expected = np.zeros((STEPS, pp * per_stage, EXPERTS), dtype=np.int64)
    records = {r: [] for r in range(world)}
    for rank in range(world):
        stage = rank // (world // pp)
        for step in range(STEPS):
            for layer in range(per_stage):
                for _ in range(MICRO):
                    ids = np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(10)])
                    records[rank].append((step, layer, ids))
                    expected[step, stage * per_stage + layer] += np.bincount(ids.ravel(), minlength=EXPERTS)
    write_router_trace(tmp_path / "rt", records, pp)
    assert main(["import", "megatron-routing", str(tmp_path / "rt"), "--out", str(tmp_path / "t.parquet"),
                 "--pp-size", "2", "--experts", str(EXPERTS)]) == 0
    loaded = trace.load(tmp_path / "t.parquet")
    assert loaded.layers == [0, 1, 2, 3] and loaded.meta["top_k"] == TOP_K
    assert np.array_equal(loaded.counts, expected)
    assert (loaded.counts.sum(axis=2) == 2 * MICRO * 10 * TOP_K).all()


def write_sglang(folder, parts):
    folder.mkdir()
    for i, logical_count in enumerate(parts):
        torch.save({"rank": 0, "logical_count": torch.from_numpy(logical_count).int(),
                    "average_utilization_rate_over_window": None},
                   folder / f"expert_distribution_recorder_{1700000000 + 10 * i}.{i}.pt")


def test_sglang_round_trip_drops_dense_layers_and_unfilled_rows(tmp_path, capsys):
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, size=(2, 12, 3, EXPERTS))  # dumps, passes, layers, experts
    counts[:, :, 0] = 0  # layer 0 is dense: SGLang's rows stay zero
    counts[1, 9:] = 0  # the second dump's buffer was not filled
    write_sglang(tmp_path / "dumps", list(counts))
    assert main(["import", "sglang", str(tmp_path / "dumps"), "--out", str(tmp_path / "t"), "--top-k", "2"]) == 0
    assert "skipped 3 all-zero forward passes" in capsys.readouterr().err
    loaded = trace.load(tmp_path / "t")
    assert loaded.layers == [1, 2]
    assert np.array_equal(loaded.counts, np.concatenate([counts[0], counts[1, :9]])[:, 1:])


def test_sglang_inconsistent_dumps_exit_2(tmp_path, capsys):
    write_sglang(tmp_path / "dumps", [np.ones((3, 2, 4), np.int64), np.ones((3, 2, 5), np.int64)])
    assert main(["import", "sglang", str(tmp_path / "dumps"), "--out", str(tmp_path / "t"), "--top-k", "2"]) == 2
    assert "inconsistent expert counts" in capsys.readouterr().err


def test_analysis_commands_run_on_an_imported_trace(tmp_path, capsys):
    rng = np.random.default_rng(4)
    steps = 600
    drift = np.linspace(0, 1, steps)[:, None] * np.array([2.0, -1.0, 0.5, -1.5])
    logits = drift[:, None, :] + rng.normal(0, 0.1, size=(steps, 2, EXPERTS))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    counts = np.array([[rng.multinomial(4096 * TOP_K, q) for q in step] for step in p])
    write_sglang(tmp_path / "dumps", [counts[:, :, :]])
    out = tmp_path / "t"
    assert main(["import", "sglang", str(tmp_path / "dumps"), "--out", str(out), "--top-k", str(TOP_K)]) == 0
    protocol = ["--horizons", "100", "200", "--min-history", "200", "--stride", "100", "--predictors", "sw_avg"]
    assert main(["phases", str(out)]) == 0
    assert main(["predict", str(out), *protocol]) == 0
    assert main(["simulate", str(out), "--gpus", "2", "--policy", "static,history"]) == 0
    assert main(["report", str(out), "--out", str(tmp_path / "report"), *protocol, "--gpus", "2",
                 "--policy", "static,history"]) == 0
