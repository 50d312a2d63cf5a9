"""The torch and megablocks MoE backends compute the same layer (GPU only: megablocks has no CPU kernels)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moe_trace.moe import MoELayer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("megablocks") is None, reason="needs megablocks (moe-trace[gpu])"),
]

HIDDEN, FFN, EXPERTS, TOKENS = 256, 1024, 16, 8192


def _relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().sum() / b.float().abs().sum()).item()


def _run(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
        loss = (out.float() * upstream).sum() + layer.aux_loss
    loss.backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("top_k", [1, 2])
def test_megablocks_matches_the_torch_backend(top_k: int):
    from moe_trace.moe_megablocks import MegablocksMoELayer

    torch.manual_seed(top_k)
    reference = MoELayer(HIDDEN, FFN, EXPERTS, top_k).cuda()
    layer = MegablocksMoELayer(HIDDEN, FFN, EXPERTS, top_k).cuda()
    layer.load_state_dict(reference.state_dict())
    for name, value in layer.state_dict().items():  # the torch layout survives the round trip
        assert torch.equal(value, reference.state_dict()[name])
    x = torch.randn(TOKENS, HIDDEN, device="cuda")
    upstream = torch.randn(TOKENS, HIDDEN, device="cuda")

    out_ref, dx_ref = _run(reference, x, upstream)
    out, dx = _run(layer, x, upstream)

    # Identical bf16 router logits: assignments can differ only where two probabilities tie exactly.
    with torch.autocast("cuda", dtype=torch.bfloat16):
        probs = reference.router(x).float().softmax(-1)
    top = probs.topk(top_k + 1, dim=-1).values
    ties = int((top[:, top_k - 1] == top[:, top_k]).sum())
    counts_ref, counts = reference.tokens_per_expert, layer.tokens_per_expert
    assert counts.sum() == counts_ref.sum() == TOKENS * top_k
    assert (counts - counts_ref).abs().sum() <= 2 * ties
    torch.testing.assert_close(layer.aux_loss, reference.aux_loss, rtol=1e-3, atol=1e-6)

    assert _relative_l1(out, out_ref) < 2e-2
    assert _relative_l1(dx, dx_ref) < 2e-2
    w1, w2 = (p.grad.view(EXPERTS, FFN, HIDDEN) for p in layer.expert_parameters())
    assert _relative_l1(w1.transpose(1, 2), reference.w1.grad) < 2e-2
    assert _relative_l1(w2, reference.w2.grad) < 2e-2
    assert _relative_l1(layer.moe.router.layer.weight.grad, reference.router.weight.grad) < 5e-2


def test_megablocks_state_dict_resumes_a_torch_checkpoint():
    """Checkpoints move between backends: the torch layout in, the same torch layout out."""
    from moe_trace.moe_megablocks import MegablocksMoELayer

    reference = MoELayer(HIDDEN, FFN, EXPERTS, 1).cuda()
    layer = MegablocksMoELayer(HIDDEN, FFN, EXPERTS, 1).cuda()
    layer.load_state_dict(reference.state_dict())
    back = MoELayer(HIDDEN, FFN, EXPERTS, 1).cuda()
    back.load_state_dict(layer.state_dict())
    for name, value in back.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name])
