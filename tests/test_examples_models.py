"""The example models in examples/: they build, run, and survive torch.export unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import load_example

# name -> (input name, output shape for the default build, module-path prefix of a block)
EXAMPLES = {
    "gpt": ("input_ids", (2, 32, 512), "blocks.0"),
    "resnet": ("pixels", (2, 10), "blocks.0"),
    "llama_hf": ("input_ids", (2, 32, 512), "model.model.layers.0"),
    "gpt2_hf": ("input_ids", (2, 32, 512), "model.transformer.h.0"),
    "llama_style": ("input_ids", (2, 32, 512), "layers.0"),
}


def _module_paths(ep: torch.export.ExportedProgram) -> set[str]:
    """The innermost module path of every node that has one."""
    return {
        list(stack.values())[-1][0]
        for node in ep.graph.nodes
        if (stack := node.meta.get("nn_module_stack"))
    }


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_exports_and_matches_eager(name):
    input_name, out_shape, block_path = EXAMPLES[name]
    model, inputs = load_example(name).build()
    assert isinstance(model, torch.nn.Module) and not model.training
    assert list(inputs) == [input_name]

    with torch.no_grad():
        expected = model(**inputs)
    assert isinstance(expected, torch.Tensor) and tuple(expected.shape) == out_shape

    ep = torch.export.export(model, (), inputs)
    with torch.no_grad():
        got = ep.module()(**inputs)
    assert (got - expected).abs().max().item() <= 1e-5

    # Units are found by module path: blocks must show up as indexed submodules.
    assert any(path.startswith(block_path) for path in _module_paths(ep))


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_weights_are_deterministic(name):
    example = load_example(name)
    first, inputs = example.build()
    second, inputs_again = example.build()
    for key in inputs:
        assert torch.equal(inputs[key], inputs_again[key])
    for (pname, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), pname


def test_resnet_batchnorm_is_not_identity():
    model, _ = load_example("resnet").build()
    bn = model.blocks[0].bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_gpt_overrides_and_meta_capture_without_allocating():
    # Bigger than the default and with seq beyond the default max_seq (grows to fit).
    model, inputs = load_example("gpt").build(
        device="meta", n_layer=4, d_model=768, n_head=12, vocab=50257, seq=256, batch=1
    )
    tensors = [*model.parameters(), *model.buffers(), *inputs.values()]
    assert all(t.device.type == "meta" for t in tensors)
    assert len(model.blocks) == 4 and model.blocks[0].attn.n_head == 12

    ep = torch.export.export(model, (), inputs)
    (out,) = ep.graph.output_node().args[0]
    assert out.meta["val"].device.type == "meta"
    assert tuple(out.meta["val"].shape) == (1, 256, 50257)


def test_llama_7b_meta_capture():
    model, inputs = load_example("llama_hf").build_7b()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # LLaMA-7B
    assert tuple(inputs["input_ids"].shape) == (1, 128)

    ep = torch.export.export(model, (), inputs)
    (out,) = ep.graph.output_node().args[0]
    assert tuple(out.meta["val"].shape) == (1, 128, 32000)
    assert any(path.startswith("model.model.layers.31") for path in _module_paths(ep))


def test_llama_style_cuts_like_hf_llama():
    """The LLaMA-style example splits into the units HF LLaMA does: embedding, rotary
    tables, one unit per layer (the residual stream and cos/sin cross every cut between
    layers), norm, head; its attention shares key/value heads between query heads."""
    from edgeplan.passes.annotate import annotate
    from edgeplan.passes.capture import capture
    from edgeplan.passes.units import group_units

    model, inputs = load_example("llama_style").build(seq=16, batch=1)
    assert model.layers[0].attn.k_proj.out_features == 2 * 32  # 2 kv heads of 32
    units = group_units(annotate(capture(model, inputs)))
    assert [u.name for u in units] == ["embed", "rotary", "layers.0", "layers.1", "layers.2",
                                       "layers.3", "norm", "lm_head"]
    residual, tables = 16 * 128 * 4, 2 * 16 * 32 * 4
    assert [u.cut_bytes for u in units[1:6]] == [residual + tables] * 4 + [residual]
    mix = {m.kind: m.count for m in units[2].op_mix}
    # its two RMSNorms are one norm kernel each (their pow, mean, add, rsqrt, scale: fused)
    assert mix["norm"] == 2 and mix["fused"] == 2 * 5 and "reduce" not in mix
    assert {"matmul", "attention", "elementwise"} <= set(mix)
