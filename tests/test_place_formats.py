"""``place --format eplb|sglang``: files load back and name every slot, copy count and GPU of the plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_trace import synth, trace
from moe_trace.cli import main
from placement import formats, planners

GPUS, EXPERTS, REDUNDANT = 4, 16, 4
SLOTS = (EXPERTS + REDUNDANT) // GPUS


@pytest.fixture(scope="module")
def plan():
    loads = np.random.default_rng(0).dirichlet(np.full(EXPERTS, 0.5), size=3)  # skewed: hot experts get copies
    made = planners.eplb(loads, GPUS, SLOTS, REDUNDANT)
    assert (made.replicas > 1).any()
    return made


def read(path):
    if str(path).endswith(".pt"):
        loaded = torch.load(path, weights_only=True)
        assert all(t.dtype == torch.int64 for t in loaded.values())
        return {k: t.numpy() for k, t in loaded.items()}
    return {k: np.array(v, dtype=np.int64) for k, v in json.loads(path.read_text()).items()}


def check_eplb(arrays, plan):
    phy2log, log2phy, logcnt = arrays["phy2log"], arrays["log2phy"], arrays["logcnt"]
    layers = len(plan.replicas)
    assert phy2log.shape == (layers, GPUS * SLOTS) and logcnt.shape == (layers, EXPERTS)
    assert log2phy.shape == (layers, EXPERTS, plan.replicas.max())
    np.testing.assert_array_equal(phy2log, plan.slot_expert)  # every slot, so every GPU: slot p on GPU p // SLOTS
    np.testing.assert_array_equal(logcnt, plan.replicas)
    hosts = plan.slot_counts()
    for layer in range(layers):
        for expert in range(EXPERTS):
            copies = log2phy[layer, expert]
            slots = copies[: logcnt[layer, expert]]
            assert (copies[logcnt[layer, expert]:] == -1).all() and (slots >= 0).all()
            assert (phy2log[layer, slots] == expert).all() and list(slots) == sorted(slots)
            on_gpu = np.bincount(slots // SLOTS, minlength=GPUS)
            np.testing.assert_array_equal(on_gpu, hosts[layer, :, expert])
        # every physical slot appears exactly once over the experts' copies
        listed = log2phy[layer][log2phy[layer] >= 0]
        np.testing.assert_array_equal(np.sort(listed), np.arange(GPUS * SLOTS))


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_eplb_file_loads_back_as_the_plan(plan, tmp_path, suffix):
    path = formats.write(formats.eplb_arrays(plan), tmp_path / f"plan{suffix}")
    arrays = read(path)
    assert set(arrays) == {"phy2log", "log2phy", "logcnt"}
    check_eplb(arrays, plan)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_sglang_file_is_what_init_by_mapping_takes(plan, tmp_path, suffix):
    moe_layers, hidden_layers = [1, 3, 5], 6
    path = formats.write(formats.sglang_dict(plan, moe_layers, hidden_layers), tmp_path / f"plan{suffix}")
    data = read(path)
    assert set(data) == {"physical_to_logical_map"}  # SGLang passes the dict as keyword arguments: nothing else
    mapping = data["physical_to_logical_map"]
    assert mapping.shape == (hidden_layers, GPUS * SLOTS)
    np.testing.assert_array_equal(mapping[moe_layers], plan.slot_expert)
    for dense in (0, 2, 4):
        np.testing.assert_array_equal(mapping[dense], np.arange(GPUS * SLOTS) % EXPERTS)
    # SGLang builds logical -> physical per row: every expert of every row needs a valid slot there.
    for row in mapping:
        assert ((row >= 0) & (row < EXPERTS)).all() and set(row) == set(range(EXPERTS))
    for li, block in enumerate(moe_layers):
        for expert in range(EXPERTS):
            gpus = np.flatnonzero(mapping[block] == expert) // SLOTS  # SGLang: GPU = slot // local slots
            np.testing.assert_array_equal(np.bincount(gpus, minlength=GPUS), plan.slot_counts()[li, :, expert])


def test_a_plan_with_empty_slots_has_no_eplb_form(plan):
    loads = np.ones((1, EXPERTS))
    gappy = planners.eplb(loads, GPUS, SLOTS + 1, REDUNDANT)  # a spare slot per GPU left empty
    with pytest.raises(planners.PlacementError, match="multiple"):
        formats.eplb_arrays(gappy)
    with pytest.raises(planners.PlacementError, match="hidden layers"):
        formats.sglang_dict(plan, [1, 3, 9], 6)


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    counts, meta = synth.generate(layers=3, experts=EXPERTS, steps=400, tokens_per_step=8192, concentration=0.5,
                                  seed=3)
    return str(trace.write(tmp_path_factory.mktemp("t") / "trace", counts, {**meta, "model": "gpt-125m-moe",
                                                                              "moe_layers": [1, 3, 5]}))


def test_place_cli_writes_loadable_plans(trace_path, tmp_path, capsys):
    common = ["place", trace_path, "--gpus", str(GPUS), "--redundant", str(REDUNDANT), "--at", "300"]
    assert main([*common, "--json", str(tmp_path / "plan.json")]) == 0
    table = json.loads((tmp_path / "plan.json").read_text())
    assert main([*common, "--format", "eplb", "--out", str(tmp_path / "eplb.pt")]) == 0
    assert main([*common, "--format", "sglang", "--out", str(tmp_path / "sglang.json")]) == 0
    printed = capsys.readouterr().out
    assert "--ep-size 4 --ep-num-redundant-experts 4" in printed
    eplb = read(tmp_path / "eplb.pt")
    mapping = read(tmp_path / "sglang.json")["physical_to_logical_map"]
    assert mapping.shape == (12, GPUS * SLOTS)  # gpt-125m-moe has 12 blocks, MoE at 1, 3, 5 in this trace
    np.testing.assert_array_equal(mapping[[1, 3, 5]], eplb["phy2log"])
    for li, layer in enumerate(table["layers"]):  # the same plan as the table
        gpus = [sorted(eplb["phy2log"][li, g * SLOTS: (g + 1) * SLOTS].tolist()) for g in range(GPUS)]
        assert gpus == [sorted(g) for g in layer["gpus"]]
        np.testing.assert_array_equal(eplb["logcnt"][li], layer["replicas"])


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "4", "--redundant", "3"], "multiple of the GPUs"),
    (["--gpus", "4", "--redundant", "52"], "more copies of some expert than there are GPUs"),
    (["--gpus", "1", "--redundant", "1"], "more copies of some expert than there are GPUs"),
    (["--gpus", "3", "--redundant", "0"], "--redundant 2"),
    (["--gpus", "4", "--format", "eplb"], "needs --out"),
])
def test_placements_that_do_not_fit_are_one_line_and_exit_2(trace_path, capsys, argv, message):
    assert main(["place", trace_path, "--at", "300", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    if "--format" not in argv:
        assert main(["simulate", trace_path, "--policy", "static", *argv]) == 2
        assert message in capsys.readouterr().err


def test_sglang_needs_the_block_count_of_an_unknown_model(tmp_path, capsys):
    counts, meta = synth.generate(layers=2, experts=8, steps=60, tokens_per_step=4096, seed=0)  # model "synthetic"
    path = str(trace.write(tmp_path / "t", counts, meta))
    common = ["place", path, "--gpus", "2", "--redundant", "2", "--at", "50", "--format", "sglang",
              "--out", str(tmp_path / "plan.json")]
    assert main(common) == 2
    assert "--num-hidden-layers" in capsys.readouterr().err
    assert main([*common, "--num-hidden-layers", "4"]) == 0
    mapping = read(tmp_path / "plan.json")["physical_to_logical_map"]
    assert mapping.shape == (4, 10) and (mapping[[0, 2]] == np.arange(10) % 8).all()
