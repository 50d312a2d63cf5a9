"""The MoE layer against a naive per-token loop, and the routing's counts and losses."""

import pytest
import torch
import torch.nn.functional as F

from moe_trace.moe import MoELayer, route


def naive_moe(x, router_weight, w1, w2, top_k, normalize):
    """Every token, one at a time, through each of its top-k experts."""
    probs = (x @ router_weight.T).softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        gates, experts = probs[t].topk(top_k)
        if normalize:
            gates = gates / gates.sum()
        for gate, e in zip(gates, experts.tolist(), strict=True):
            out[t] += gate * (F.gelu(x[t] @ w1[e]) @ w2[e])
    return out


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, False), (2, True), (3, True)])
def test_moe_matches_per_token_loop(top_k, normalize):
    torch.manual_seed(0)
    layer = MoELayer(hidden=16, ffn=24, num_experts=6, top_k=top_k, normalize_weights=normalize).double()
    x = torch.randn(2, 37, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    params = [layer.router.weight, layer.w1, layer.w2]
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *params], upstream)

    x_ref = x.detach().clone().requires_grad_(True)
    params_ref = [p.detach().clone().requires_grad_(True) for p in params]
    ref = naive_moe(x_ref.reshape(-1, 16), *params_ref, top_k, normalize).reshape(x.shape)
    grads_ref = torch.autograd.grad(ref, [x_ref, *params_ref], upstream)

    torch.testing.assert_close(out, ref)
    for name, g, g_ref in zip(["x", "router", "w1", "w2"], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_counts_conserve_tokens_and_match_the_chosen_experts():
    torch.manual_seed(1)
    layer = MoELayer(hidden=8, ffn=8, num_experts=5, top_k=2)
    layer(torch.randn(3, 11, 8))
    counts = layer.tokens_per_expert
    assert counts.dtype == torch.int64 and counts.shape == (5,)
    assert int(counts.sum()) == 3 * 11 * 2


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    num_experts, tokens = 4, 64
    # Uniform probabilities with ties broken evenly: f_e = P_e = 1/E, so E * sum f P = 1.
    balanced = torch.zeros(tokens, num_experts)
    balanced[torch.arange(tokens), torch.arange(tokens) % num_experts] = 1e-6
    assert route(balanced, 1).load_balancing_loss.item() == pytest.approx(1.0, abs=1e-4)
    # Every token certain of expert 0: f_0 = P_0 = 1, loss = E.
    collapsed = torch.full((tokens, num_experts), -1e4)
    collapsed[:, 0] = 0
    assert route(collapsed, 1).load_balancing_loss.item() == pytest.approx(num_experts)


def test_aux_loss_reaches_the_router():
    torch.manual_seed(2)
    layer = MoELayer(hidden=8, ffn=8, num_experts=4, top_k=1, z_loss_weight=1e-3)
    layer(torch.randn(32, 8))
    (grad,) = torch.autograd.grad(layer.aux_loss, [layer.router.weight])
    assert grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_mm_backend_matches_the_cpu_loop():
    torch.manual_seed(3)
    layer = MoELayer(hidden=128, ffn=256, num_experts=8, top_k=2).cuda()
    x = torch.randn(512, 128, device="cuda")
    cpu_layer = MoELayer(hidden=128, ffn=256, num_experts=8, top_k=2)
    cpu_layer.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    out, ref = layer(x), cpu_layer(x.cpu())
    assert torch.equal(layer.tokens_per_expert.cpu(), cpu_layer.tokens_per_expert)
    assert ((out.cpu() - ref).abs().sum() / ref.abs().sum()).item() < 2e-2  # bf16 grouped GEMMs
