"""record.attach on transformers MoE families: counts equal the router's selection, rows conserve tokens x top-k.

Tiny random configs (3 blocks, hidden 64, 8 experts, top-2) train two optimizer steps of two micro-batches;
a second set of hooks on the routers records what they returned, as the reference.
"""

import numpy as np
import pytest
import torch

from moe_trace import record, trace
from moe_trace.model import GPT, ModelConfig

transformers = pytest.importorskip("transformers", minversion="5")
hf = pytest.importorskip("moe_trace.integrations.hf")

FAMILIES = {  # family -> MoE blocks of a 3-block model
    "mixtral": [0, 1, 2], "qwen2_moe": [0, 1, 2], "qwen3_moe": [0, 1, 2], "olmoe": [0, 1, 2],
    "deepseek_v3": [1, 2], "gpt_oss": [0, 1, 2], "llama4_text": [0, 1, 2],
}
BATCH, SEQ, VOCAB = 2, 12, 128


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(name=f"hf:{family}", vocab_size=VOCAB, seq_len=SEQ, n_blocks=3, hidden=64, heads=4,
                         num_experts=8, top_k=2)
    return hf.CausalLM(config).model  # the plain transformers model, as a user would hold it


def router_reference(model: torch.nn.Module, num_experts: int) -> tuple[list[torch.Tensor], list]:
    """Hooks that add up, per MoE block, the experts each router returned (forwards in training mode only)."""
    totals: dict[int, torch.Tensor] = {}

    def hook(block):
        def after(module, args, output):
            if not module.training or torch._C._current_graph_task_id() != -1:
                return
            if type(module).__name__ == "Llama4Router":  # scores: sigmoid of the top-k logits, 0 elsewhere
                counts = (output[0] > 0).sum(0)
            else:  # (logits, weights, indices)
                counts = torch.bincount(output[2].flatten(), minlength=num_experts)
            totals[block] = totals.get(block, 0) + counts
        return after

    handles = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Router") and "layers." in name:
            handles.append(module.register_forward_hook(hook(int(name.split("layers.")[1].split(".")[0]))))
    return totals, handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attach_counts_what_the_router_selected(tmp_path, family):
    model = tiny(family).train()
    recorder = record.attach(model, tmp_path, meta={"seed": 0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    expected = []
    for step in range(2):
        totals, handles = router_reference(model, 8)
        for _micro in range(2):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ))
            mask = torch.ones_like(ids)
            mask[0, :3] = 0  # left padding: the experts still see (and the trace counts) these positions
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        recorder.step(step)
        for handle in handles:
            handle.remove()
        expected.append(torch.stack([totals[b] for b in sorted(totals)]).numpy())
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (BATCH, SEQ)))  # eval forwards are not counted
    recorder.close()

    loaded = trace.load(tmp_path)
    assert loaded.layers == FAMILIES[family]
    assert loaded.meta["num_experts"] == 8 and loaded.meta["top_k"] == 2
    assert loaded.meta["tokens_per_step"] == 2 * BATCH * SEQ and loaded.meta["seq_len"] == SEQ
    assert loaded.meta["n_blocks"] == 3 and loaded.meta["hidden"] == 64
    assert np.array_equal(loaded.counts, np.stack(expected))
    assert (loaded.counts.sum(axis=2) == 2 * BATCH * SEQ * 2).all()  # tokens (padding included) x top-k


def test_activation_checkpointing_recomputation_is_not_counted(tmp_path):
    model = tiny("olmoe").train()
    model.activation_checkpointing_enable()
    recorder = record.attach(model, tmp_path)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    recorder.step(0)
    recorder.close()
    assert (trace.load(tmp_path).counts.sum(axis=2) == BATCH * SEQ * 2).all()


def test_expert_count_comes_from_the_config_not_the_module(tmp_path):
    model = tiny("mixtral")
    for module in model.modules():
        if type(module).__name__.endswith("MixtralExperts"):  # CausalLM's bf16 parametrization subclasses it
            module.num_experts = 4  # what transformers' expert parallelism leaves on a rank of two
    sites = record.find_moe_layers(model)
    assert record.model_meta(model, sites)["num_experts"] == 8


def test_harness_gpt_is_recorded_through_the_same_hooks(tmp_path):
    config = ModelConfig(name="tiny", vocab_size=64, seq_len=8, n_blocks=4, hidden=32, heads=2, num_experts=4,
                         top_k=2, moe_every=2)
    model = GPT(config).train()
    recorder = record.attach(model, tmp_path, meta={"seed": 0})
    expected = 0
    for _ in range(3):  # micro-batches of one step
        x = torch.randint(0, 64, (2, 8))
        _, loss = model(x, x)
        loss.backward()
        expected = expected + model.tokens_per_expert()
    recorder.step(0)
    recorder.close()
    loaded = trace.load(tmp_path)
    assert loaded.layers == [1, 3] and loaded.meta["model"] == "tiny"
    assert np.array_equal(loaded.counts[0], expected.numpy())
    assert loaded.meta["tokens_per_step"] == 3 * 2 * 8


def test_hooks_traced_one_layer_at_a_time_compile_once(tmp_path, monkeypatch):
    """Expert parallelism's exchange breaks the compiled graph in every MoE layer, so each layer's hook is traced
    on its own: it must not recompile per layer (past Dynamo's limit of 8 the rest would run eager), and the
    counts stay those of the eager model."""
    from moe_trace.moe import MoELayer

    monkeypatch.setattr(MoELayer, "run_experts", torch.compiler.disable(MoELayer.run_experts))
    config = ModelConfig(name="tiny", vocab_size=64, seq_len=8, n_blocks=10, hidden=16, heads=2, num_experts=4,
                         top_k=1, moe_every=1)
    model = GPT(config).train()
    recorder = record.attach(model, tmp_path, meta={"seed": 0})
    forward = torch.compile(model, backend="eager")
    x = torch.randint(0, 64, (2, 8))
    with torch._dynamo.config.patch(error_on_recompile=True):
        forward(x, x)
        recorder.step(0)
        forward(x, x)
    recorder.step(1)
    counts = model.tokens_per_expert()
    recorder.close()
    torch._dynamo.reset()
    assert np.array_equal(trace.load(tmp_path).counts, torch.stack([counts, counts]).numpy())


def test_model_without_moe_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no MoE layer"):
        record.attach(torch.nn.Linear(2, 2), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_gpt_is_recorded_on_the_gpu(tmp_path, mode):
    """The hooks run inside torch.compile's graphs, CUDA-graph replay (reduce-overhead) included. Gradients are
    dropped every step, as training does: under CUDA graphs, accumulating them across replays is what
    `moe-trace train` refuses (pytorch/pytorch#169545)."""
    config = ModelConfig(name="tiny", vocab_size=256, seq_len=64, n_blocks=2, hidden=64, heads=2, num_experts=4,
                         top_k=2, moe_every=1)
    model = GPT(config).cuda().train()
    recorder = record.attach(model, tmp_path, meta={"tokens_per_step": 4 * 64, "seq_len": 64, "global_batch": 4})
    forward = torch.compile(model, mode=mode)
    expected = []
    for step in range(8):
        x = torch.randint(0, 256, (4, 64), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(x, x)
        (loss + model.aux_loss()).backward()
        model.zero_grad(set_to_none=True)
        expected.append(model.tokens_per_expert().clone())
        recorder.step(step)
    recorder.close()
    assert np.array_equal(trace.load(tmp_path).counts, torch.stack(expected).cpu().numpy())
