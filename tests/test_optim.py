"""Optimizer choice: each option's memory estimate, what ``auto`` picks, and one-line refusals."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from moe_trace import cli, memory, optim, trace
from moe_trace.commands import train as train_command
from moe_trace.errors import UsageError
from moe_trace.model import GPT, make_config

H200 = 139 * memory.GIB
H100 = 80 * memory.GIB
BIG = make_config("gpt-350m-moe")  # 128 experts, ~13 B parameters


def test_each_option_counts_its_bytes_per_parameter():
    n = memory.count_parameters(BIG).per_rank()
    assert memory.training_state_bytes(BIG) == 16 * n
    assert memory.training_state_bytes(BIG, optimizer="adamw_bf16") == 8 * n
    # bf16 weights and gradients, two 8-bit moments and one float32 scale per 256 values of each
    assert memory.training_state_bytes(BIG, optimizer="adamw8bit") == int((6 + 8 / 256) * n)
    assert memory.training_state_bytes(BIG, 4, "adamw8bit") < memory.training_state_bytes(BIG, 1, "adamw8bit")


def test_auto_takes_the_most_exact_optimizer_that_fits():
    small = make_config("gpt-125m-moe")
    assert memory.choose_optimizer(small, H100) == "adamw"
    assert memory.choose_optimizer(BIG, H200) == "adamw_bf16"  # 98 GiB of 104 usable; float32 AdamW needs 196
    assert memory.choose_optimizer(BIG, H200, expert_parallel=2) == "adamw"  # half the experts: ~101 GiB
    assert memory.choose_optimizer(BIG, 100 * memory.GIB) == "adamw8bit"  # 74 GiB of 75


def test_an_explicit_choice_is_honoured_or_refused_with_the_options_that_fit():
    assert memory.choose_optimizer(make_config("gpt-125m-moe"), H100, requested="adamw8bit") == "adamw8bit"
    with pytest.raises(UsageError, match=r"needs ~196 GiB.*adamw state.*--optimizer adamw_bf16 \(~98 GiB\) or "
                                         r"--optimizer adamw8bit \(~74 GiB\)"):
        memory.choose_optimizer(BIG, H200, requested="adamw")


def test_nothing_fits_names_expert_parallelism_and_fewer_experts():
    with pytest.raises(UsageError, match=r"needs ~196 GiB per GPU.*torchrun --nproc-per-node 4.*--experts 32"):
        memory.choose_optimizer(BIG, H100)


def test_without_torchao_auto_still_takes_adamw_bf16_and_only_adamw8bit_asks_for_torchao():
    assert memory.choose_optimizer(BIG, H200, lean_available=False) == "adamw_bf16"  # this project's own kernel
    with pytest.raises(UsageError, match=r"needs ~196 GiB.*--optimizer adamw_bf16 \(~98 GiB\) or "
                                         r"--optimizer adamw8bit \(~74 GiB, pip install torchao\)"):
        memory.choose_optimizer(BIG, H200, requested="adamw", lean_available=False)
    with pytest.raises(UsageError, match=r"needs ~196 GiB.*; use --optimizer adamw8bit \(~74 GiB, pip install "
                                         r"torchao\) or torchrun"):
        memory.choose_optimizer(BIG, 100 * memory.GIB, lean_available=False)  # only adamw8bit fits: missing


def test_torchao_optimizers_are_refused_in_one_line_on_cpu_and_adamw_bf16_is_not():
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        optim.check_available("adamw8bit", torch.device("cpu"))
    optim.check_available("adamw_bf16", torch.device("cpu"))
    assert not optim.OPTIMIZERS["adamw_bf16"].needs_torchao and optim.OPTIMIZERS["adamw8bit"].needs_torchao


def test_build_gives_adamw_bf16_this_projects_optimizer_with_the_groups_weight_decay():
    from moe_trace.adamw_bf16 import AdamWBF16

    model = GPT(make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, seq_len=16))
    optim.cast_parameters(model, "adamw_bf16")
    optimizer = optim.build("adamw_bf16", model, 3e-4, 0.1, torch.device("cpu"))
    assert isinstance(optimizer, AdamWBF16)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 3e-4 and g["betas"] == optim.BETAS for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_cast_parameters_keeps_buffers_in_float32():
    model = GPT(make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, seq_len=16))
    model.register_buffer("bias", torch.zeros(4))
    optim.cast_parameters(model, "adamw_bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.bias.dtype == torch.float32


def test_cli_choices_match_the_optimizers():
    assert train_command.CHOICES == optim.CHOICES


def test_cli_refuses_a_lean_optimizer_on_cpu(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", "gpt-tiny-moe", "--device", "cpu", "--optimizer", "adamw8bit",
                     "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs a CUDA GPU" in err


def test_adamw_bf16_trains_on_cpu_and_resumes_exactly(corpus_cache, tmp_path):
    """adamw_bf16 runs on CPU (the torch reference): the losses fall, and steps 3..5 re-run from the step-3
    checkpoint give the uninterrupted run's losses and weights bit for bit (the rounding's generator is saved)."""
    from moe_trace.train import TrainConfig, train

    model_config = make_config("gpt-tiny-moe", n_blocks=2, hidden=32, heads=2, num_experts=4, moe_every=1,
                               seq_len=32)
    config = TrainConfig(out=str(tmp_path / "full"), steps=6, global_batch=4, lr=1e-2, warmup=1, eval_every=1000,
                         checkpoint_every=3, optimizer="adamw_bf16")
    assert train(model_config, config, "cpu")["optimizer"] == "adamw_bf16"
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "step-0000000006.pt").unlink()
    train(model_config, dataclasses.replace(config, out=str(tmp_path / "resumed")), "cpu", resume=True)
    losses = [trace.load_metrics(tmp_path / run)["loss"] for run in ("full", "resumed")]
    assert np.array_equal(*losses) and len(losses[0]) == 6 and losses[0][-1] < losses[0][0]
    weights = [torch.load(tmp_path / run / "checkpoints" / "step-0000000006.pt", weights_only=False)["model"]
               for run in ("full", "resumed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert {w.dtype for w in weights[0].values() if w.is_floating_point()} >= {torch.bfloat16}


def test_summary_json_names_the_optimizer_and_the_time_outside_steps(corpus_cache, tmp_path):
    summary = tmp_path / "summary.json"
    args = ["train", "--model", "gpt-tiny-moe", "--blocks", "2", "--hidden", "32", "--heads", "2", "--experts", "4",
            "--moe-every", "1", "--seq-len", "32", "--global-batch", "4", "--device", "cpu", "--steps", "4",
            "--eval-every", "2", "--checkpoint-every", "2", "--out", str(tmp_path / "run"), "--json", str(summary)]
    assert cli.main(args) == 0
    payload = json.loads(summary.read_text())
    assert payload["optimizer"] == "adamw" and payload["steps"] == 4
    assert payload["eval_s"] > 0 and payload["checkpoint_s"] > 0 and payload["peak_gpu_memory_gib"] is None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["optimizer"] == "adamw"


def _clipped_step(make_optimizer, fold: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(5))]
    optimizer = make_optimizer(params)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * (5.0 if step != 1 else 1e-3)  # step 1 is under the limit: no clipping
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if fold:
            optim.clip_gradients(optimizer, params, 1.0, norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),  # folds: divides by grad_scale in its update
    lambda params: torch.optim.SGD(params, lr=0.1),  # does not: the gradients are scaled first
], ids=["fused-adamw", "sgd"])
def test_clipping_folded_into_the_update_equals_clipping_first(make_optimizer):
    folded, clipped = _clipped_step(make_optimizer, fold=True), _clipped_step(make_optimizer, fold=False)
    for a, b in zip(folded, clipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
