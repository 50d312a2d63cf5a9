"""The GPT-MoE model: presets, shapes, counts, causality, parameter and FLOP helpers."""

import pytest
import torch

from moe_trace.model import GPT, PRESETS, ModelConfig, flops_per_token, make_config, num_parameters


def small_config(**overrides):
    return ModelConfig(**{"vocab_size": 97, "seq_len": 16, "n_blocks": 4, "hidden": 32, "heads": 4,
                          "num_experts": 4, "top_k": 2, "moe_every": 2, **overrides})


def test_presets_follow_the_design_table():
    p125, p350 = PRESETS["gpt-125m-moe"], PRESETS["gpt-350m-moe"]
    assert (p125.n_blocks, p125.hidden, p125.heads, p125.num_experts, p125.top_k, p125.seq_len) == \
        (12, 768, 12, 16, 1, 2048)
    assert (p350.n_blocks, p350.hidden, p350.heads, p350.num_experts, p350.top_k, p350.seq_len) == \
        (24, 1024, 16, 128, 1, 2048)
    assert p125.moe_blocks == [1, 3, 5, 7, 9, 11] and len(p350.moe_blocks) == 12
    assert all(p.ffn_mult == 4 and p.load_balancing_weight == 0.01 for p in PRESETS.values())
    assert make_config("gpt-125m-moe", num_experts=8, top_k=None).num_experts == 8


def test_forward_shapes_counts_and_loss():
    torch.manual_seed(0)
    model = GPT(small_config())
    idx = torch.randint(0, 97, (3, 16))
    logits, loss = model(idx, torch.randint(0, 97, (3, 16)))
    assert logits.shape == (3, 16, 97)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), rel=0.05)  # near-uniform at init
    counts = model.tokens_per_expert()
    assert counts.shape == (2, 4)
    assert (counts.sum(dim=1) == 3 * 16 * 2).all()
    assert model.aux_loss().item() == pytest.approx(2 * 0.01, rel=0.2)  # ~1.0 per layer times the weight


def test_causal_a_later_token_does_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    torch.testing.assert_close(model(idx)[0][:, :10], model(changed)[0][:, :10])


def test_active_parameters_count_k_of_e_experts():
    model = GPT(small_config(num_experts=8, top_k=2))
    expert_params = sum(layer.w1.numel() + layer.w2.numel() for layer in model.moe_layers)
    total = num_parameters(model)
    padding = (128 - 97) * 32  # embedding rows past the vocabulary
    assert num_parameters(model, active=True) == total - expert_params * 6 // 8 - 16 * 32 - padding
    assert flops_per_token(model) > 6 * num_parameters(model, active=True)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        small_config(top_k=5)
    with pytest.raises(ValueError):
        small_config(attention="flash")


def test_padding_the_vocabulary_changes_neither_logits_nor_loss():
    torch.manual_seed(0)
    unpadded = GPT(small_config(vocab_multiple=1))
    padded = GPT(small_config())
    state = unpadded.state_dict()
    with torch.no_grad():  # the same weights, plus padding rows that are never used
        for name, value in padded.state_dict().items():  # views of the parameters: copied in place
            value[: state[name].shape[0]] = state[name]
    idx = torch.randint(0, 97, (2, 16))
    (logits, loss), (padded_logits, padded_loss) = unpadded(idx, idx), padded(idx, idx)
    assert padded.wte.weight.shape[0] == 128 and padded_logits.shape == logits.shape == (2, 16, 97)
    torch.testing.assert_close(padded_logits, logits)
    torch.testing.assert_close(padded_loss, loss)


def test_logits_are_detached_when_the_loss_is_returned():
    model = GPT(small_config())
    idx = torch.randint(0, 97, (2, 16))
    logits, loss = model(idx, idx)
    assert not logits.requires_grad and loss.requires_grad
    assert model(idx)[0].requires_grad  # inference without targets keeps the graph
