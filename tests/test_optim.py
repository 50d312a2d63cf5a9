"""Optimizer choice: each option's memory estimate, what ``auto`` picks, and one-line refusals."""

import json

import pytest
import torch

from moe_trace import cli, memory, optim
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
    with pytest.raises(UsageError, match=r"needs ~196 GiB.*--optimizer adamw_bf16 \(~98 GiB, pip install torchao\)"):
        memory.choose_optimizer(BIG, H200, lean_available=False)


def test_lean_optimizers_are_refused_in_one_line_on_cpu():
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        optim.check_available("adamw8bit", torch.device("cpu"))


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
