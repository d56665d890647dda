"""Multi-model workloads: several named models planned onto one fleet together.

A workload is a mapping `{name: (model, example_inputs)}`. `combine_workload` turns it
into ONE nn.Module whose forward takes every model's inputs (as keyword arguments) and
returns `{name: output}`; the compiler then captures, costs, partitions and emits it
like any single model. Why one module rather than one graph per model:

- a layer merged across models is one submodule object, so torch.export sees one
  parameter; `passes.dedup` makes it one graph value, the partition counts it once per
  device (CostTables.shared_weight_*), and each stage's ONNX file holds it once;
- models that take the same input share one graph input, and `passes.dedup` computes
  their shared prefix once (one trunk with several heads);
- where inputs differ, the models still live in the same stage graph on a device, so
  one ONNX Runtime session holds the shared weight once for all of them: no
  cross-session weight sharing (SessionOptions.add_initializer) is needed.

Inputs: two models' inputs are one graph input when their example tensors are the same
object, or have the same keyword name, dtype, shape and equal values. A graph input is
named by its keyword (or `input_<i>` for positional inputs) when no other graph input
uses that name, otherwise `<first model>_<name>`. Outputs are named by capture from the
returned dict: `<model>` for a tensor, `<model>_<key>` for nested outputs.

`workload_memory(gm, layout)` attributes every weight of the captured graph to the
models whose outputs depend on it: per model its parameter bytes and how many of them
it shares with other models.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
import torch.utils._pytree as pytree

from edgeplan.errors import CaptureError
from edgeplan.passes.capture import fetch_attr, signature_of
from edgeplan.planner.plan import ModelMemory, WorkloadInfo

MERGE_MODES = ("identical", "none")


@dataclass(frozen=True)
class ModelLayout:
    """How one model of a workload is called inside the combined module.

    `arguments` are (keyword or None for positional, graph input name) in call order;
    `output_count` is the number of tensors its output flattens to.
    """

    name: str
    arguments: tuple[tuple[str | None, str], ...]
    output_count: int

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(graph_name for _, graph_name in self.arguments))


@dataclass(frozen=True)
class WorkloadLayout:
    models: tuple[ModelLayout, ...]


class CombinedModel(torch.nn.Module):
    """Every model of a workload as a submodule named after it; forward runs them all."""

    def __init__(self, models: Mapping[str, torch.nn.Module], layout: WorkloadLayout):
        super().__init__()
        for name, model in models.items():
            self.add_module(name, model)
        self.layout = layout

    def forward(self, **inputs):
        outputs = {}
        for model in self.layout.models:
            args = [inputs[graph_name] for key, graph_name in model.arguments if key is None]
            kwargs = {key: inputs[graph_name] for key, graph_name in model.arguments if key is not None}
            outputs[model.name] = getattr(self, model.name)(*args, **kwargs)
        return outputs


def _check_name(name: object, taken: set[str]) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise CaptureError(
            f"workload: model name {name!r} must be a Python identifier (letters, digits, _), "
            f"e.g. 'digit' or 'parity'; rename it in the workload dict")
    if name in taken or hasattr(torch.nn.Module(), name) or name == "layout":
        raise CaptureError(f"workload: model name {name!r} is reserved or used twice; rename it")
    return name


def _arguments(name: str, example_inputs) -> list[tuple[str | None, str, torch.Tensor]]:
    """(keyword or None, user-facing name, tensor) per example input of one model."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        items = [(key, key, value) for key, value in example_inputs.items()]
    elif isinstance(example_inputs, (tuple, list)):
        items = [(None, f"input_{i}", value) for i, value in enumerate(example_inputs)]
    else:
        raise CaptureError(
            f"workload: model {name!r}: example inputs must be a dict of named tensors, a tuple "
            f"of tensors or a tensor, got {type(example_inputs).__name__}")
    for _key, label, value in items:
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"workload: model {name!r}: input {label!r} is a "
                               f"{type(value).__name__}, not a tensor; bind it in the factory")
    return items


def _same_input(a: tuple[str, torch.Tensor], b: tuple[str, torch.Tensor]) -> bool:
    (label_a, x), (label_b, y) = a, b
    if x is y:
        return True
    if label_a != label_b or x.dtype != y.dtype or x.shape != y.shape:
        return False
    return x.device.type != "meta" and y.device.type != "meta" and bool(torch.equal(x, y))


def combine_workload(workload: Mapping) -> tuple[CombinedModel, dict[str, torch.Tensor], WorkloadLayout]:
    """One module, its example keyword inputs and its layout for a `{name: (model, inputs)}` workload."""
    if not isinstance(workload, Mapping) or not workload:
        raise CaptureError("workload: expected a non-empty dict {name: (model, example_inputs)}")
    taken: set[str] = set()
    groups: list[dict] = []  # one per graph input: label, tensor, first model
    per_model: dict[str, list[tuple[str | None, int]]] = {}
    models: dict[str, torch.nn.Module] = {}
    for name, entry in workload.items():
        taken.add(_check_name(name, taken))
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], torch.nn.Module)):
            raise CaptureError(f"workload: model {name!r} must map to (nn.Module, example_inputs), "
                               f"got {type(entry).__name__}")
        models[name] = entry[0]
        per_model[name] = []
        for key, label, tensor in _arguments(name, entry[1]):
            index = next((i for i, g in enumerate(groups)
                          if _same_input((g["label"], g["tensor"]), (label, tensor))), None)
            if index is None:
                index = len(groups)
                groups.append({"label": label, "tensor": tensor, "model": name})
            per_model[name].append((key, index))
    batches = {name: _batch(per_model[name], groups) for name in workload}
    if len(set(batches.values())) > 1:
        raise CaptureError(
            f"workload: the models' example inputs have different batch sizes {batches}; the "
            f"compiled pipeline runs one microbatch size: give every model the same dim 0")
    label_count: dict[str, int] = {}
    for group in groups:
        label_count[group["label"]] = label_count.get(group["label"], 0) + 1
    graph_names = [g["label"] if label_count[g["label"]] == 1 else f"{g['model']}_{g['label']}"
                   for g in groups]
    layouts = []
    for name, model in models.items():
        arguments = tuple((key, graph_names[index]) for key, index in per_model[name])
        layouts.append(ModelLayout(name, arguments, _output_count(name, model, workload[name][1])))
    layout = WorkloadLayout(tuple(layouts))
    example = {graph_names[i]: g["tensor"] for i, g in enumerate(groups)}
    return CombinedModel(models, layout), example, layout


def _batch(arguments: list[tuple[str | None, int]], groups: list[dict]) -> int:
    first = groups[arguments[0][1]]["tensor"] if arguments else None
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _output_count(name: str, model: torch.nn.Module, example_inputs) -> int:
    """Tensors the model's output flattens to (one eager run; meta models run on meta)."""
    model.eval()
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    try:
        with torch.no_grad():
            output = model(**args) if isinstance(args, Mapping) else model(*args)
    except Exception as exc:  # the user's forward: name the model once
        raise CaptureError(f"workload: model {name!r} failed on its example inputs: "
                           f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return len(pytree.tree_leaves(output))


def _cone(output: torch.fx.Node) -> set[torch.fx.Node]:
    """Every node the output depends on."""
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def workload_memory(gm: torch.fx.GraphModule, layout: WorkloadLayout) -> WorkloadInfo:
    """Per-model parameter bytes of a captured workload, and what the models share."""
    signature = signature_of(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    readers: dict[int, set[str]] = {}  # tensor id -> models reading it
    sizes: dict[int, int] = {}
    start = 0
    for model in layout.models:
        outputs = signature.output_nodes[start:start + model.output_count]
        start += model.output_count
        reached = set().union(*(_cone(by_name[o]) for o in outputs)) if outputs else set()
        for node in reached:
            if node.op == "get_attr":
                tensor = fetch_attr(gm, node.target)
                readers.setdefault(id(tensor), set()).add(model.name)
                sizes[id(tensor)] = tensor.numel() * tensor.element_size()
    start = 0
    models = []
    for model in layout.models:
        mine = [t for t, names in readers.items() if model.name in names]
        outputs = signature.outputs[start:start + model.output_count]
        start += model.output_count
        models.append(ModelMemory(
            name=model.name, inputs=model.inputs, outputs=tuple(o.name for o in outputs),
            param_bytes=sum(sizes[t] for t in mine),
            shared_bytes=sum(sizes[t] for t in mine if len(readers[t]) > 1)))
    return WorkloadInfo(
        models=tuple(models),
        param_bytes=sum(sizes.values()),
        unmerged_param_bytes=sum(m.param_bytes for m in models),
        shared_weights=sum(1 for names in readers.values() if len(names) > 1),
    )


def compile_workload(workload: Mapping, fleet="home-lab", out_dir=None, merge: str = "identical",
                     **options):
    """Plan several models onto one fleet together; see the module docstring.

    merge: "identical" shares layers whose architecture and weights are bitwise equal
    across models (lossless, `passes.merge.share_identical`; the given models are not
    changed); "none" plans the models as given (layers already shared, e.g. by
    `passes.merge.merge_models`, stay shared). Other options as `edgeplan.compile`.
    """
    from edgeplan.passes.merge import share_identical
    from edgeplan.planner.compile import compile_model

    if merge not in MERGE_MODES:
        raise CaptureError(f"workload: unknown merge mode {merge!r}; use one of {', '.join(MERGE_MODES)} "
                           f"(merges that need retraining: edgeplan.passes.merge.merge_models)")
    if merge == "identical":
        workload, _groups = share_identical(workload)
    model, example_inputs, layout = combine_workload(workload)
    options.setdefault("name", "+".join(m.name for m in layout.models))
    return compile_model(model, example_inputs, fleet=fleet, out_dir=out_dir, workload=layout, **options)
