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
    # What the recorder reads: each token counted once for each of its top-k experts.
    chosen = (x.detach().reshape(-1, 16) @ layer.router.weight.detach().T).topk(top_k, dim=-1).indices
    assert layer.tokens_per_expert.tolist() == torch.bincount(chosen.flatten(), minlength=6).tolist()
    for name, g, g_ref in zip(["x", "router", "w1", "w2"], grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, msg=lambda m, name=name: f"grad of {name}: {m}")


def per_token_routing(logits, top_k):
    """Each token's top-k experts and the counts, the load-balancing loss and the z-loss, one token at a time."""
    tokens, num_experts = logits.shape
    counts, prob_sum, z_sum, chosen = [0] * num_experts, torch.zeros(num_experts, dtype=logits.dtype), 0.0, []
    for t in range(tokens):
        probs = logits[t].exp() / logits[t].exp().sum()
        experts = sorted(range(num_experts), key=lambda e: -probs[e].item())[:top_k]
        chosen.append(experts)
        for e in experts:
            counts[e] += 1
        prob_sum = prob_sum + probs
        z_sum += logits[t].exp().sum().log() ** 2
    f = torch.tensor(counts, dtype=logits.dtype) / (tokens * top_k)
    return chosen, counts, num_experts * (f * prob_sum / tokens).sum(), z_sum / tokens


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_routing_matches_a_per_token_loop(top_k):
    torch.manual_seed(1)
    logits = 2 * torch.randn(67, 5, dtype=torch.float64)  # no ties among the top-k
    routing = route(logits, top_k)
    chosen, counts, load_balancing, z = per_token_routing(logits, top_k)
    assert routing.expert_indices.tolist() == chosen  # which experts, best first
    torch.testing.assert_close(routing.expert_weights, logits.softmax(-1).gather(1, routing.expert_indices))
    assert routing.tokens_per_expert.dtype == torch.int64 and routing.tokens_per_expert.tolist() == counts
    assert sum(counts) == 67 * top_k
    torch.testing.assert_close(routing.load_balancing_loss, load_balancing)
    torch.testing.assert_close(routing.z_loss, z)  # the mean of squares, not the square of the mean


def test_load_balancing_gradient_flows_through_the_router_probabilities():
    # E * sum_e f_e P_e: f_e (the counted fractions) is a constant, the gradient comes from P_e alone.
    torch.manual_seed(4)
    logits = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    routing = route(logits, 2)
    (grad,) = torch.autograd.grad(routing.load_balancing_loss, [logits])
    f = routing.tokens_per_expert.double() / (40 * 2)
    (expected,) = torch.autograd.grad(6 * (f * logits.softmax(-1).mean(0)).sum(), [logits])
    torch.testing.assert_close(grad, expected)
    assert expected.abs().sum() > 0.1


def test_aux_loss_weighs_both_losses_and_reaches_the_router_without_the_z_loss():
    torch.manual_seed(2)
    layer = MoELayer(hidden=8, ffn=8, num_experts=4, top_k=1, load_balancing_weight=0.5).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    layer(x)
    (grad,) = torch.autograd.grad(layer.aux_loss, [layer.router.weight])
    weight = layer.router.weight.detach().requires_grad_(True)
    probs = (x @ weight.T).softmax(-1)
    f = torch.bincount(probs.argmax(-1), minlength=4).double() / 32
    (expected,) = torch.autograd.grad(0.5 * 4 * (f * probs.mean(0)).sum(), [weight])
    torch.testing.assert_close(grad, expected)
    assert grad.abs().sum() > 0
    layer.z_loss_weight = 1e-3
    layer(x)
    routing = route(x @ weight.detach().T, 1)
    torch.testing.assert_close(layer.aux_loss, 0.5 * routing.load_balancing_loss + 1e-3 * routing.z_loss)


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


def test_weights_start_at_the_gpt2_scale():
    torch.manual_seed(5)
    layer = MoELayer(hidden=256, ffn=32, num_experts=16, top_k=2, out_init_std=0.005)
    for weight, std in [(layer.router.weight, 0.02), (layer.w1, 0.02), (layer.w2, 0.005)]:
        assert abs(weight.std().item() - std) < 0.05 * std and abs(weight.mean().item()) < 0.1 * std
    assert layer.load_balancing_weight == 0.01 and layer.z_loss_weight == 0.0  # DESIGN.md's defaults
    assert MoELayer(hidden=8, ffn=8, num_experts=4, top_k=1).w2.std().item() == pytest.approx(0.02, rel=0.1)


def test_bf16_logits_are_routed_in_float32_and_the_output_keeps_the_input_dtype():
    torch.manual_seed(6)
    logits = torch.randn(50, 8)
    low = route(logits.bfloat16(), 2)
    full = route(logits.bfloat16().float(), 2)
    assert low.expert_weights.dtype == low.load_balancing_loss.dtype == low.z_loss.dtype == torch.float32
    torch.testing.assert_close(low.expert_weights, full.expert_weights, rtol=0, atol=0)
    torch.testing.assert_close(low.z_loss, full.z_loss, rtol=0, atol=0)
    layer = MoELayer(hidden=16, ffn=16, num_experts=4, top_k=2).bfloat16()
    assert layer(torch.randn(3, 5, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_top_k_may_be_every_expert_and_no_more():
    assert MoELayer(hidden=8, ffn=8, num_experts=4, top_k=4).top_k == 4
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(hidden=8, ffn=8, num_experts=4, top_k=5)
    assert not MoELayer(hidden=8, ffn=8, num_experts=4, top_k=1).normalize_weights  # DESIGN.md: plain top-k gates


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("top_k", [1, 4])
def test_rows_travel_in_bf16_and_nothing_changes_on_the_gpu(top_k):
    # dispatch_combine moves the gathered rows in the experts' bf16 (half the bytes of expert parallelism's
    # all-to-alls); against the float32 rows it moved before, forward and gradients are the same.
    from moe_trace.moe import dispatch_combine, expert_forward

    generator = torch.Generator(device="cuda").manual_seed(0)
    tokens, hidden, ffn, experts = 512, 64, 128, 8

    def inputs():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(tokens, hidden, device="cuda", generator=g, requires_grad=True)
        w1 = torch.randn(experts, hidden, ffn, device="cuda", generator=g).mul_(0.1).requires_grad_()
        w2 = torch.randn(experts, ffn, hidden, device="cuda", generator=g).mul_(0.1).requires_grad_()
        return x, w1, w2

    indices = torch.randint(0, experts, (tokens, top_k), device="cuda", generator=generator)
    gates = torch.rand(tokens, top_k, device="cuda", generator=generator)
    counts = torch.bincount(indices.flatten(), minlength=experts)

    def float32_rows(x, w1, w2):  # the formula before: rows gathered, exchanged and copied back in float32
        order = indices.flatten().argsort(stable=True)
        y_sorted = expert_forward(x[order // top_k], counts, w1, w2)
        y = y_sorted.new_empty(y_sorted.shape).index_copy(0, order, y_sorted).view(tokens, top_k, -1)
        return (y * gates.unsqueeze(-1)).sum(dim=1)

    results = []
    for fn in (lambda x, w1, w2: dispatch_combine(x, indices, gates, counts,
                                                  lambda rows, c: expert_forward(rows, c, w1, w2)), float32_rows):
        x, w1, w2 = inputs()
        out = fn(x, w1, w2)
        out.square().mean().backward()
        results.append((out.detach(), x.grad, w1.grad, w2.grad))
    (out, *grads), (expected, *expected_grads) = results
    assert torch.equal(out, expected)
    for grad, reference in zip(grads, expected_grads, strict=True):
        # A token's k gradients are summed by atomic adds on the GPU, in no fixed order when k > 1.
        torch.testing.assert_close(grad, reference, rtol=0 if top_k == 1 else 1e-6, atol=0 if top_k == 1 else 1e-7)
