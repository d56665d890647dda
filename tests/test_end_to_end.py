"""End to end: every example compiled into 1-4 stages, run through the runtime, equal to torch."""

import numpy as np
import pytest
import torch
from conftest import load_example

import edgeplan
from edgeplan.planner.plan import Plan

TOLERANCE = 1e-4
EXAMPLES = ["gpt", "resnet", "llama_hf", "gpt2_hf"]


def bigger_batch(example_inputs: dict, microbatches: int) -> dict:
    """The example inputs repeated `microbatches` times along dim 0, with fresh values."""
    generator = torch.Generator().manual_seed(7)
    batch = {}
    for name, tensor in example_inputs.items():
        shape = (tensor.shape[0] * microbatches, *tensor.shape[1:])
        if tensor.dtype.is_floating_point:
            batch[name] = torch.randn(shape, generator=generator, dtype=tensor.dtype)
        else:
            high = int(tensor.max()) + 1
            batch[name] = torch.randint(0, high, shape, generator=generator, dtype=tensor.dtype)
    return batch


@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_pipeline_matches_torch(name, stages, tmp_path):
    model, example_inputs = load_example(name).build()
    plan = edgeplan.compile(model, example_inputs, fleet="jetson-cluster", out_dir=tmp_path,
                            num_stages=stages, time_limit_s=5)
    assert len(plan.stages) == stages
    assert len({s.device for s in plan.stages}) == stages
    for stage in plan.stages:
        assert stage.memory_bytes <= stage.memory_budget_bytes

    pipe = edgeplan.runtime.load(tmp_path)
    inputs = bigger_batch(example_inputs, microbatches=3)
    outputs = pipe.run({k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        expected = model(**inputs)
    (output_name,) = pipe.output_names
    assert outputs[output_name].shape == tuple(expected.shape)
    assert np.abs(outputs[output_name] - expected.numpy()).max() <= TOLERANCE
    assert pipe.last_stats.microbatches == 3


@pytest.mark.parametrize("name", ["gpt", "llama_hf"])
def test_cuts_inside_blocks_forward_skip_tensors(name, tmp_path):
    """Hand-placed cuts after the first norm of a block, inside the residual: the skip tensor
    (and, for Llama, the rotary tables and mask made once at the top) cross and are forwarded."""
    model, example_inputs = load_example(name).build()
    solved = edgeplan.compile(model, example_inputs, fleet="jetson-cluster", granularity="layer",
                              num_stages=4, time_limit_s=5)
    norm_units = [i for i, u in enumerate(solved.units) if u.name.endswith(("ln_1", "input_layernorm"))]
    cuts = [i + 1 for i in norm_units[:3]]
    bounds = [0, *cuts, len(solved.units)]
    data = solved.to_dict()
    template = data["stages"][0]
    data["stages"] = [dict(template, index=i, device=f"orin-nano-{i}", backend="gpu",
                           unit_start=start, unit_end=end)
                      for i, (start, end) in enumerate(zip(bounds, bounds[1:]))]
    plan = edgeplan.compile(model, example_inputs, fleet="jetson-cluster", out_dir=tmp_path,
                            plan_from=Plan.from_dict(data))
    assert [s.unit_start for s in plan.stages] == bounds[:-1]
    assert all(len(s.boundary.tensors) >= 2 for s in plan.stages if s.boundary)
    pipe = edgeplan.runtime.load(tmp_path)
    outputs = pipe.run({k: v.numpy() for k, v in example_inputs.items()})
    with torch.no_grad():
        expected = model(**example_inputs).numpy()
    assert np.abs(outputs["output"] - expected).max() <= TOLERANCE
