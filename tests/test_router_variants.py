"""Router variants (issue 14) against naive per-token references: scores, selection bias, capacity drops,
shared experts, the balance losses, and the auxiliary-loss-free bias moving load toward uniform."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_trace.commands import train as train_command
from moe_trace.model import ModelConfig
from moe_trace.moe import (
    BALANCE_METHODS,
    SCORE_FUNCTIONS,
    MoELayer,
    expert_bias_update,
    route,
    sequence_balance_loss,
    switch_balance_loss,
)


def naive_moe(x, layer: MoELayer):
    """Every token, one at a time and in order, through each of its top-k experts; each expert takes at most
    ``capacity`` assignments in token order. Returns the output, the counts and the dropped assignments."""
    s = layer.settings
    num_experts = layer.num_experts
    logits = x @ layer.router.weight.T
    scores = logits.softmax(-1) if s.score == "softmax" else logits.sigmoid()
    bias = layer.expert_bias if layer.expert_bias is not None else torch.zeros(num_experts, dtype=x.dtype)
    capacity = (math.ceil(s.capacity_factor * len(x) * s.top_k / num_experts) if s.capacity_factor is not None
                else len(x) * s.top_k)
    counts, dropped = [0] * num_experts, [0] * num_experts
    out = torch.zeros_like(x)
    for t in range(len(x)):
        experts = (scores[t] + bias).topk(s.top_k).indices.tolist()
        gates = scores[t][experts]
        if s.normalize_weights or (s.score == "sigmoid" and s.top_k > 1):
            gates = gates / gates.sum()
        for gate, e in zip(gates, experts, strict=True):
            counts[e] += 1
            if counts[e] > capacity:
                dropped[e] += 1
                continue
            out[t] += gate * (F.gelu(x[t] @ layer.w1[e]) @ layer.w2[e])
        if layer.shared is not None:
            out[t] += layer.shared.proj.weight @ F.gelu(layer.shared.fc.weight @ x[t])
    return out, counts, dropped


VARIANTS = {
    "softmax": {},
    "sigmoid top-2": dict(score="sigmoid"),
    "aux_free bias": dict(balance="aux_free"),
    "capacity 0.5": dict(capacity_factor=0.5),
    "capacity 1.0, normalised": dict(capacity_factor=1.0, normalize_weights=True),
    "shared experts": dict(shared_experts=2),
    "all at once": dict(score="sigmoid", balance="aux_free", capacity_factor=0.75, shared_experts=1),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_layer_matches_the_per_token_loop(variant):
    torch.manual_seed(0)
    layer = MoELayer(hidden=12, ffn=16, num_experts=5, top_k=2, **variant).double()
    if layer.expert_bias is not None:  # a bias large enough to change selections
        layer.expert_bias.copy_(torch.randn(5, dtype=torch.float64) * 0.3)
    x = torch.randn(3, 13, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    params = [p for p in layer.parameters()]
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *params], upstream)

    ref_layer = MoELayer(hidden=12, ffn=16, num_experts=5, top_k=2, **variant).double()
    ref_layer.load_state_dict(layer.state_dict())
    x_ref = x.detach().clone().requires_grad_(True)
    ref, counts, dropped = naive_moe(x_ref.reshape(-1, 12), ref_layer)
    grads_ref = torch.autograd.grad(ref.reshape(x.shape), [x_ref, *ref_layer.parameters()], upstream)

    assert layer.tokens_per_expert.tolist() == counts and sum(counts) == 3 * 13 * 2
    assert layer.dropped_per_expert.tolist() == dropped
    if variant.get("capacity_factor") == 0.5:
        assert sum(dropped) > 0  # the case really drops
    torch.testing.assert_close(out, ref.reshape(x.shape))
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_bias_changes_the_selection_but_not_the_gates():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    plain = route(logits, 1)
    biased = route(logits, 1, balance="aux_free", expert_bias=torch.tensor([0.0, 0.0, 1.0]))
    assert plain.expert_indices.item() == 0 and biased.expert_indices.item() == 2
    assert biased.expert_weights.item() == pytest.approx(logits.softmax(-1)[0, 2].item())


def test_sigmoid_gates_are_normalised_over_the_top_k_except_top_1():
    logits = torch.randn(7, 6)
    two = route(logits, 2, score="sigmoid")
    torch.testing.assert_close(two.expert_weights.sum(-1), torch.ones(7))
    one = route(logits, 1, score="sigmoid")
    torch.testing.assert_close(one.expert_weights[:, 0], logits.sigmoid().max(-1).values)


def test_sequence_loss_is_the_switch_loss_of_each_sequence():
    torch.manual_seed(1)
    logits = torch.randn(4 * 9, 5)
    probs = logits.softmax(-1)
    routing = route(logits, 2, balance="seq_aux", seq_len=9)
    per_sequence = [switch_balance_loss(p, torch.bincount(i.flatten(), minlength=5), 2)
                    for p, i in zip(probs.split(9), routing.expert_indices.split(9), strict=True)]
    torch.testing.assert_close(routing.load_balancing_loss, torch.stack(per_sequence).mean())
    # One sequence: the batch-level loss.
    torch.testing.assert_close(sequence_balance_loss(probs, routing.expert_indices, 36),
                               route(logits, 2).load_balancing_loss)


def test_sequence_loss_sees_imbalance_the_batch_loss_misses():
    # Two sequences, each sending every token to its own expert: balanced over the batch, not per sequence.
    logits = torch.full((8, 2), -10.0)
    logits[:4, 0] = logits[4:, 1] = 10.0
    assert route(logits, 1).load_balancing_loss.item() == pytest.approx(1.0, abs=1e-3)
    assert route(logits, 1, balance="seq_aux", seq_len=4).load_balancing_loss.item() == pytest.approx(2.0, abs=1e-3)


def test_only_aux_and_seq_aux_add_a_balance_loss():
    x = torch.randn(2, 8, 8)
    for balance in BALANCE_METHODS:
        layer = MoELayer(hidden=8, ffn=8, num_experts=4, top_k=1, balance=balance)
        layer(x)
        assert (layer.aux_loss.item() > 0) == (balance in ("aux", "seq_aux")), balance


def test_bias_step_raises_underloaded_and_lowers_overloaded_experts():
    step = expert_bias_update(torch.tensor([9, 1, 5, 5]), rate=0.5)  # mean 5
    assert step.tolist() == [-0.5, 0.5, 0.0, 0.0]


def test_aux_free_bias_moves_a_skewed_router_toward_uniform_load():
    """Fixed router logits that favour experts 0 and 1; bias steps alone spread the load."""
    torch.manual_seed(2)
    logits = torch.randn(1024, 8)
    logits[:, 0] += 2.0
    logits[:, 1] += 1.0
    bias = torch.zeros(8)

    def heaviest_over_mean() -> float:
        counts = route(logits, 2, balance="aux_free", expert_bias=bias).tokens_per_expert
        return (counts.max() / counts.float().mean()).item()

    before = heaviest_over_mean()
    for _ in range(60):
        bias += expert_bias_update(route(logits, 2, balance="aux_free", expert_bias=bias).tokens_per_expert, 5e-3)
    assert before > 3.0 and heaviest_over_mean() < 1.1
    assert bias[0] < bias[1] < bias[2:].min()


def test_the_bias_is_a_buffer_of_aux_free_layers_only():
    layer = MoELayer(hidden=8, ffn=8, num_experts=4, top_k=2, balance="aux_free", bias_update_rate=0.25)
    layer.update_expert_bias(torch.tensor([5, 1, 1, 1]))
    assert layer.state_dict()["expert_bias"].tolist() == [-0.25, 0.25, 0.25, 0.25]
    plain = MoELayer(hidden=8, ffn=8, num_experts=4, top_k=2)
    plain.update_expert_bias(torch.tensor([5, 1, 1, 1]))  # a no-op
    assert "expert_bias" not in plain.state_dict()


def test_capacity_drops_in_token_order_and_counts_stay_what_the_router_chose():
    logits = torch.zeros(6, 3)
    logits[:, 1] = 5.0  # every token picks expert 1
    routing = route(logits, 1, capacity_factor=1.0)  # capacity ceil(6 / 3) = 2
    assert routing.tokens_per_expert.tolist() == [0, 6, 0]
    assert routing.dropped_per_expert.tolist() == [0, 4, 0]
    assert (routing.expert_weights[:2] > 0).all() and (routing.expert_weights[2:] == 0).all()


def test_cli_choices_match_the_router():
    parser = train_command.argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["train"]._actions}
    assert tuple(actions["balance"].choices) == BALANCE_METHODS
    assert tuple(actions["score"].choices) == SCORE_FUNCTIONS


def test_megablocks_refuses_the_variants_in_one_line():
    with pytest.raises(ValueError, match="use --moe-backend torch"):
        ModelConfig(moe_backend="megablocks", balance="aux_free")
    with pytest.raises(ValueError, match="use --moe-backend torch"):
        ModelConfig(moe_backend="megablocks", shared_experts=1)
    ModelConfig(moe_backend="megablocks")  # the default router is fine


@pytest.mark.parametrize("field,value", [("balance", "switch"), ("score", "tanh"), ("capacity_factor", 0.0),
                                         ("bias_update_rate", -1.0), ("shared_experts", -1)])
def test_bad_variant_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_variants_do_not_sync_with_the_host():
    layer = MoELayer(hidden=64, ffn=128, num_experts=8, top_k=2, score="sigmoid", balance="aux_free",
                     capacity_factor=1.0, shared_experts=1).cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    layer(x)  # warm-up: first calls may allocate with syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            (out.float().square().mean() + layer.aux_loss).backward()
            layer.update_expert_bias(layer.tokens_per_expert)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.tokens_per_expert.sum().item() == 4 * 64 * 2
