"""Capture: a PyTorch model and example inputs -> a flat torch.fx GraphModule.

Uses `torch.export.export` (symbolic_trace fails on HF models), then unlifts weights
(`ExportedProgram.module()`): weights become `get_attr` nodes so that later passes can
count them per unit and split_module can keep them inside stages. The pytree
calling convention is replaced by flat positional inputs in a fixed order, and the
graph returns a flat tuple of tensors; `gm.meta["edgeplan.signature"]` records the
names of both (see `ModelSignature`).

Context managers in a forward that change nothing for inference (`torch.no_grad()`,
`torch.autocast(enabled=False)`, as around HF LLaMA's rotary embedding) come out of
torch.export as a higher-order op calling a subgraph; capture inlines those subgraphs,
so every op is a node of the one graph that later passes cost and split.

Models whose parameters live on the `meta` device are captured without allocating
weights; such a capture can be planned but not emitted.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree

from edgeplan.errors import CaptureError
from edgeplan.passes.records import (
    ORIGIN_KEY,
    SIGNATURE_KEY,
    ModelSignature,
    TensorSpec,
)

GUARDS_MODULE = "_guards_fn"
SET_GRAD_WRAPPER = torch.ops.higher_order.wrap_with_set_grad_enabled
AUTOCAST_WRAPPER = torch.ops.higher_order.wrap_with_autocast


def numpy_dtype_name(dtype: torch.dtype) -> str:
    """The numpy spelling of a torch dtype ("float32", "int64", "bool", ...)."""
    name = str(dtype).removeprefix("torch.")
    return {"float": "float32", "long": "int64", "int": "int32", "half": "float16",
            "double": "float64", "bfloat16": "bfloat16"}.get(name, name)


def _split_example_inputs(example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"capture: example inputs must be a dict of named tensors, a tuple of tensors or a "
        f"tensor, got {type(example_inputs).__name__}; return e.g. {{'input_ids': ids}} "
        f"from your factory"
    )


def _output_names(out_spec: pytree.TreeSpec) -> list[str]:
    """User-facing names for the flat outputs: dict keys / attribute names, else output_i."""
    leaves = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    if out_spec.num_leaves == 1 and not isinstance(leaves, (tuple, list, dict)):
        return ["output"]
    paths, _ = pytree.tree_flatten_with_path(leaves)
    names = []
    for path, _leaf in paths:
        text = pytree.keystr(path)
        name = re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_") or "output"
        names.append(name if not name[0].isdigit() else f"output_{name}")
    return names


def _is_on_meta(model: torch.nn.Module, flat_inputs: list) -> bool:
    tensors = [*model.parameters(), *model.buffers(),
               *(x for x in flat_inputs if isinstance(x, torch.Tensor))]
    return any(t.device.type == "meta" for t in tensors)


def capture(model: torch.nn.Module, example_inputs, name: str | None = None) -> torch.fx.GraphModule:
    """Export `model` with `example_inputs` into a flat GraphModule with a ModelSignature."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture: expected a torch.nn.Module, got {type(model).__name__}; the factory must "
            f"return (model, example_inputs)"
        )
    args, kwargs = _split_example_inputs(example_inputs)
    flat_inputs = pytree.tree_leaves((args, kwargs))
    bad = [type(x).__name__ for x in flat_inputs if not isinstance(x, torch.Tensor)]
    if bad:
        raise CaptureError(
            f"capture: every example input must be a tensor, got {', '.join(bad)}; bind "
            f"non-tensor options in the factory instead"
        )
    # Exported graphs cannot be put in eval mode afterwards: do it before export.
    model.eval()
    try:
        exported = torch.export.export(model, args, kwargs)
    except Exception as exc:  # torch.export raises many types; name the fix once here
        raise CaptureError(
            f"capture: torch.export failed for {type(model).__name__}: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Make the forward traceable "
            f"(no data-dependent Python control flow; for HF models pass use_cache=False)"
        ) from exc

    gm = exported.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == GUARDS_MODULE:
            gm.graph.erase_node(node)
    if hasattr(gm, GUARDS_MODULE):
        gm.delete_submodule(GUARDS_MODULE)
    _inline_context_wrappers(gm)
    # Flat positional inputs and a flat tuple out: drop the pytree codegen and the
    # pre-hook that checks the original (args, kwargs) structure.
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    output_node = gm.graph.output_node()
    flat_outputs = pytree.tree_leaves(output_node.args[0])
    output_node.args = (tuple(flat_outputs),)
    gm.recompile()

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    input_specs = tuple(
        TensorSpec(ph.name, tuple(int(d) for d in ph.meta["val"].shape),
                   numpy_dtype_name(ph.meta["val"].dtype))
        for ph in placeholders
    )
    output_specs = []
    for out_name, node in zip(_output_names(exported.call_spec.out_spec), flat_outputs):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            raise CaptureError(
                f"capture: output {out_name!r} is not a tensor ({type(val).__name__}); return "
                f"tensors only (for HF models: use_cache=False, return logits)"
            )
        output_specs.append(TensorSpec(out_name, tuple(int(d) for d in val.shape),
                                       numpy_dtype_name(val.dtype)))
    for node in gm.graph.nodes:
        node.meta[ORIGIN_KEY] = node.name
    gm.meta[SIGNATURE_KEY] = ModelSignature(
        name=name or type(model).__name__,
        inputs=input_specs,
        outputs=tuple(output_specs),
        output_nodes=tuple(n.name for n in flat_outputs),
        on_meta=_is_on_meta(model, flat_inputs),
    )
    return gm


def _wrapped_call(node: torch.fx.Node) -> tuple[torch.fx.Node, tuple] | None:
    """(the get_attr of the subgraph, its operands) of a context wrapper that inference can
    drop: grad mode on or off, or autocast switched off; None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is SET_GRAD_WRAPPER:
        _enabled, body, *operands = node.args
        return body, tuple(operands)
    if node.target is AUTOCAST_WRAPPER:
        _device, _dtype, enabled, _cache, body, *operands = node.args
        return None if enabled else (body, tuple(operands))
    return None


def _inline_context_wrappers(gm: torch.fx.GraphModule) -> None:
    """Replace each droppable context wrapper by a copy of its subgraph (in place); its
    getitem readers read the copied outputs instead."""
    for node in list(gm.graph.nodes):
        wrapped = _wrapped_call(node)
        if wrapped is None:
            continue
        body_node, operands = wrapped
        body = fetch_attr(gm, body_node.target)
        _inline_context_wrappers(body)  # nested contexts
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, operands))
        with gm.graph.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "get_attr":
                    raise CaptureError(
                        f"capture: the subgraph {body_node.target!r} under {node.name!r} reads "
                        f"an attribute ({inner.target!r}); pass weights into the no_grad/autocast "
                        f"block as arguments instead of reading them inside it"
                    )
                if inner.op == "call_function":
                    env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
                elif inner.op == "output":
                    results = pytree.tree_leaves(inner.args[0])
        for reader in list(node.users):
            if reader.target is not operator.getitem:
                raise CaptureError(
                    f"capture: {reader.name!r} reads the result of {node.name!r} whole; expected "
                    f"getitem readers of a torch.export context wrapper"
                )
            reader.replace_all_uses_with(env[results[reader.args[1]]])
            gm.graph.erase_node(reader)
        gm.graph.erase_node(node)
        if not body_node.users:
            gm.graph.erase_node(body_node)
            gm.delete_submodule(body_node.target)
    gm.recompile()


def bind_inputs(signature: ModelSignature, example_inputs) -> dict[str, torch.Tensor]:
    """Example inputs keyed by the graph's input names: keyword inputs by name, the rest in order."""
    args, kwargs = _split_example_inputs(example_inputs)
    positional = iter(pytree.tree_leaves(args))
    return {spec.name: kwargs[spec.name] if spec.name in kwargs else next(positional)
            for spec in signature.inputs}


def fetch_attr(gm: torch.fx.GraphModule, target: str):
    """The tensor or module a `get_attr` target ("layers.0.weight") names in `gm`."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def signature_of(gm: torch.fx.GraphModule) -> ModelSignature:
    """The ModelSignature of a captured graph; a clear error if `capture` was skipped."""
    signature = gm.meta.get(SIGNATURE_KEY)
    if signature is None:
        raise CaptureError("graph has no edgeplan signature: run edgeplan.passes.capture.capture first")
    return signature
