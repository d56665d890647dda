"""Dedup: one node per weight tensor and per repeated computation in a captured graph.

Rewrites the graph in place, before annotate. Needs a captured graph (`passes.capture`).

1. Weights: torch.export keeps one `get_attr` target per module path, so a module shared
   by several models (a merged layer) is read through several targets that hold the same
   tensor object. Every such `get_attr` is replaced by the first one, so the weight is
   one graph value: one stage input, one ONNX initializer.
2. Computations (common subexpression elimination): a call with the same operator and
   the same arguments as an earlier one is replaced by it. Where models take the same
   input and share their first layers, the shared prefix is thus computed once and the
   graph has one trunk with several heads. Operators with side effects, mutable
   arguments or random results are never merged, nor is a call that reads or produces a
   value some in-place operator changes (directly or through a view: exported graphs
   keep e.g. `relu_` of `ReLU(inplace=True)`), since equal arguments need not mean equal
   values then. The replacement is the same operator applied to the same values, so
   outputs stay bitwise identical. Two model outputs that
   become one node both keep their names (`ModelSignature.output_nodes` is updated).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from edgeplan.passes.capture import fetch_attr, signature_of
from edgeplan.passes.records import SIGNATURE_KEY

NONDETERMINISTIC = (torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise)


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _changed_in_place(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Values an in-place operator writes, with every view that shares their memory."""
    changed: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if _mutates(node):
            changed.update(node.all_input_nodes)
            changed.add(node)
    views = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "is_view", False)]
    grew = True
    while grew:  # a view and its base alias each other: spread both ways until nothing changes
        grew = False
        for view in views:
            group = {view, *view.all_input_nodes}
            if group & changed and not group <= changed:
                changed |= group
                grew = True
    return changed


def _mergeable(node: torch.fx.Node, changed: set[torch.fx.Node]) -> bool:
    if node in changed or any(arg in changed for arg in node.all_input_nodes):
        return False
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:  # operator.getitem and other Python callables: pure
        return getattr(target, "__module__", "") == "_operator"
    if schema.is_mutable:
        return False
    return not any(tag in getattr(target, "tags", ()) for tag in NONDETERMINISTIC)


def _key(value):
    """A hashable form of node arguments (nodes by identity, containers recursively)."""
    if isinstance(value, torch.fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ("torch", str(value))
    if isinstance(value, float):
        return ("float", repr(value))  # 0.0 and -0.0 differ, nan equals itself
    return (type(value).__name__, value)


def dedup(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int, int]:
    """Merge duplicate weight reads and computations; returns (gm, weights, calls) merged."""
    signature = signature_of(gm)  # precondition: a captured graph
    graph = gm.graph
    first_read: dict[int, torch.fx.Node] = {}
    weights = calls = 0
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        first = first_read.setdefault(id(fetch_attr(gm, node.target)), node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            weights += 1
    seen: dict[tuple, torch.fx.Node] = {}
    changed = _changed_in_place(graph)
    for node in list(graph.nodes):
        if node.op != "call_function" or not _mergeable(node, changed):
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            calls += 1
    graph.lint()
    gm.recompile()
    outputs = tuple(n.name for n in graph.output_node().args[0])
    gm.meta[SIGNATURE_KEY] = dataclasses.replace(signature, output_nodes=outputs)
    return gm, weights, calls
