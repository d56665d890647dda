"""Split: cut a unit-annotated graph into one GraphModule per stage.

Policy comes in (stage index per unit, from the plan); `torch.fx.passes.split_module` does
the surgery. Afterwards each stage module is made self-contained: weights that
split_module passes in as inputs are moved back into the stage as `get_attr` attributes,
so a stage's inputs are only activations and model inputs. Each StageGraph lists its
input names (producer node names, or model input names) and output names (node names
used by a later stage or by the model's outputs), in the order the module takes and
returns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from edgeplan.errors import PlanError
from edgeplan.passes.capture import fetch_attr
from edgeplan.passes.records import ORIGIN_KEY, UNIT_KEY


@dataclass(frozen=True)
class StageGraph:
    module: torch.fx.GraphModule
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def split_stages(gm: torch.fx.GraphModule, stage_of_unit: Sequence[int]) -> list[StageGraph]:
    """One StageGraph per stage; `stage_of_unit[u]` is the stage index of unit u."""
    weight_targets = {n.name: n.target for n in gm.graph.nodes if n.op == "get_attr"}

    def stage_of(node: torch.fx.Node) -> int:
        unit = node.meta.get(UNIT_KEY)
        if unit is None:
            raise PlanError(f"split: node {node.name!r} has no unit; run passes.units.group_units first")
        return stage_of_unit[unit]

    split = split_module(gm, gm, stage_of, keep_original_order=True)
    stage_count = max(stage_of_unit) + 1
    stages = []
    for index in range(stage_count):
        name = f"submod_{index}"
        if not hasattr(split, name):
            raise PlanError(f"split: stage {index} received no operations; every stage needs a unit")
        module = getattr(split, name)
        _inline_weights(gm, module, weight_targets)
        inputs = tuple(n.name for n in module.graph.nodes if n.op == "placeholder")
        returned = module.graph.output_node().args[0]
        returned = returned if isinstance(returned, (tuple, list)) else (returned,)
        # Inside a stage, copied nodes may be renamed; the origin record keeps the original.
        outputs = tuple(node.meta[ORIGIN_KEY] for node in returned)
        stages.append(StageGraph(module, inputs, outputs))
    return stages


def run_stages(stage_graphs: Sequence[StageGraph], env: dict) -> Iterator[tuple[StageGraph, tuple]]:
    """Run the stages in order in torch; yield each with the inputs it got.

    `env` maps tensor names to tensors (the model inputs to start with) and gains every
    stage's outputs, so later stages find what earlier ones produced.
    """
    for stage_graph in stage_graphs:
        args = tuple(env[name] for name in stage_graph.inputs)
        with torch.no_grad():
            produced = stage_graph.module(*args)
        produced = produced if isinstance(produced, (tuple, list)) else (produced,)
        env.update(zip(stage_graph.outputs, produced))
        yield stage_graph, args


def _inline_weights(gm: torch.fx.GraphModule, module: torch.fx.GraphModule,
                    weight_targets: dict[str, str]) -> None:
    graph = module.graph
    first = next(n for n in graph.nodes if n.op != "placeholder")  # weights go after the inputs
    for placeholder in [n for n in graph.nodes if n.op == "placeholder" and n.name in weight_targets]:
        tensor = fetch_attr(gm, weight_targets[placeholder.name])
        attribute = placeholder.name
        if isinstance(tensor, torch.nn.Parameter):
            module.register_parameter(attribute, torch.nn.Parameter(tensor.detach(), requires_grad=False))
        else:
            module.register_buffer(attribute, tensor)
        with graph.inserting_before(first):
            fetched = graph.get_attr(attribute)
        fetched.meta = dict(placeholder.meta)
        placeholder.replace_all_uses_with(fetched)
        graph.erase_node(placeholder)
    graph.lint()
    module.recompile()
