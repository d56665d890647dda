"""Units: group the nodes of an annotated graph into partition units by module path.

A unit is a contiguous run of compute nodes (graph order) that share a module-path key:
with granularity "block" the key is the path up to the first ModuleList/Sequential index
(`layers.3`, one transformer or residual block), other nodes keep their leaf module
(`embed_tokens`, `norm`, `lm_head`); with "layer" one level deeper (`layers.3.self_attn`,
`layers.3.mlp`). Runs without weights or heavy ops (masks, position ids, activations)
join the unit before them (the first one joins the unit after it), and so do runs of ops
the runtime folds into the convolution before them (kinds "fused" and "epilogue": a
batch norm and its activation in a module of their own, `stem.1` after `stem.0`), whose
weights fold into the convolution's: a cut there would run them unfolded (a ReLU6 batch norm after a
strided stem convolution took 16 us on its own here, nothing folded).

Writes `node.meta["edgeplan.unit"]` (unit index) on every compute and weight node and
returns the Unit records. Each unit knows the tensors that cross the cut after it: every
tensor defined at or before its last node and used after it, so a cut inside a residual
region passes (and pays for) the skip tensor too. A unit's op mix also holds the work
ONNX Runtime adds that the graph does not show: the reorders into and out of its blocked
convolution layout when the unit runs alone (kind "layout", `_layout_reorders`), the
bias of each linear layer (kind "bias", `_gemm_biases`), and the kernels a boolean
attention mask adds (kind "elementwise", `_attention_masks`).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx

from edgeplan.errors import CaptureError
from edgeplan.passes.annotate import CONV_OPS
from edgeplan.passes.capture import fetch_attr
from edgeplan.passes.records import (
    COST_KEY,
    TENSOR_KEY,
    UNIT_KEY,
    OpCost,
    OpMix,
    TensorSpec,
)

aten = torch.ops.aten
GRANULARITIES = ("block", "layer")
HEAVY_KINDS = frozenset({"matmul", "conv", "stem", "depthwise", "attention"})
# Ops folded into the convolution before them (annotate): they launch no kernel of their
# own, their weights fold into the convolution's, and they run in its blocked layout.
FOLDED_KINDS = frozenset({"fused", "epilogue"})
# ONNX Runtime's CPU convolutions run in a blocked channel layout (NCHWc) of MLAS's block
# size (annotate.STEM_CHANNELS: 16 channels with AVX-512, 8 with AVX2); the blocked ones
# read channels in multiples of this, or fewer than a block (kind "stem").
CHANNEL_ALIGNMENT = 4
# Ops ONNX Runtime keeps in NCHWc when every tensor input is (`_layout_reorders`); it runs
# hardswish as HardSigmoid and Mul, both blocked.
NCHWC_OPS = {aten.add.Tensor, aten.mul.Tensor, aten.relu.default, aten.sigmoid.default,
             aten.tanh.default, aten.hardswish.default, aten.hardsigmoid.default,
             aten.max_pool2d.default, aten.avg_pool2d.default, aten.cat.default, operator.getitem}
_INDEX = re.compile(r"^\d+$")


@dataclass(frozen=True)
class Unit:
    """One partition unit: a contiguous run of FX nodes and its static costs.

    param_bytes counts each distinct weight tensor the unit reads; a weight read by several
    units (tied embeddings, layers merged across models) is counted in each of them here.
    param_names name every distinct tensor once across the graph (the first get_attr
    target that reaches it) and param_sizes are their bytes, so the cost model can count
    a weight shared by units on one device once (`planner.cost.shared_weights`).
    peak_activation_bytes is the most activation memory live at any node of the unit,
    including tensors held for later units. cut_tensors / cut_bytes describe the cut
    after this unit (empty for the last unit). op_mix sums the unit's nodes per op kind
    (views excluded), in order of first appearance.
    """

    index: int
    name: str
    nodes: tuple[str, ...]
    flops: int
    bytes_moved: int
    op_count: int
    param_bytes: int
    param_names: tuple[str, ...]
    activation_bytes: int
    peak_activation_bytes: int
    cut_tensors: tuple[TensorSpec, ...]
    cut_bytes: int
    op_mix: tuple[OpMix, ...] = ()
    param_sizes: tuple[int, ...] = ()


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _type = list(stack.values())[-1]
    # torch.export spells nested paths like "L['self'].layers[0]" in some versions.
    return path


def unit_key(path: str, granularity: str) -> str:
    """The unit key of a module path at a granularity (see module docstring)."""
    parts = [p for p in path.split(".") if p]
    for i, part in enumerate(parts):
        if _INDEX.match(part):
            depth = i + 1 if granularity == "block" else i + 2
            return ".".join(parts[:depth])
    return ".".join(parts)


def _runs(compute_nodes: list[torch.fx.Node], granularity: str) -> list[list[torch.fx.Node]]:
    runs: list[list[torch.fx.Node]] = []
    last_key = None
    for node in compute_nodes:
        key = unit_key(_module_path(node), granularity)
        if runs and key == last_key:
            runs[-1].append(node)
        else:
            runs.append([node])
        last_key = key
    return runs


def _is_light(run: list[torch.fx.Node]) -> bool:
    for node in run:
        kind = node.meta[COST_KEY].kind
        if kind in HEAVY_KINDS:
            return False
        if kind not in FOLDED_KINDS and any(arg.op == "get_attr" for arg in node.all_input_nodes):
            return False
    return True


def _merge_light_runs(runs: list[list[torch.fx.Node]]) -> list[list[torch.fx.Node]]:
    merged: list[list[torch.fx.Node]] = []
    pending: list[torch.fx.Node] = []  # light runs before the first heavy one
    for run in runs:
        if _is_light(run):
            if merged:
                merged[-1].extend(run)
            else:
                pending.extend(run)
            continue
        merged.append(pending + run)
        pending = []
    if pending:  # a graph with no weights at all: one unit
        merged.append(pending)
    return merged


def _unique_name(key: str, seen: dict[str, int]) -> str:
    base = key or "root"
    count = seen.get(base, 0)
    seen[base] = count + 1
    return base if count == 0 else f"{base}#{count + 1}"


def group_units(gm: torch.fx.GraphModule, granularity: str = "block") -> tuple[Unit, ...]:
    """Group an annotated graph into Units and stamp `edgeplan.unit` on its nodes."""
    if granularity not in GRANULARITIES:
        raise CaptureError(
            f"units: unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}"
        )
    nodes = list(gm.graph.nodes)
    if any(COST_KEY not in n.meta for n in nodes):
        raise CaptureError("units: graph is not annotated; run edgeplan.passes.annotate.annotate first")
    compute = [n for n in nodes if n.op == "call_function"]
    if not compute:
        raise CaptureError("units: the captured graph has no operations to plan")
    runs = _merge_light_runs(_runs(compute, granularity))

    position = {n: i for i, n in enumerate(nodes)}
    unit_of: dict[torch.fx.Node, int] = {}
    for index, run in enumerate(runs):
        for node in run:
            unit_of[node] = index
    for node in nodes:
        if node.op == "get_attr" and node.users:
            unit_of[node] = min(unit_of[user] for user in node.users)
    for node, index in unit_of.items():
        node.meta[UNIT_KEY] = index
    folded = _folded_on_load(compute, unit_of)

    live_bytes = _live_bytes_by_position(nodes, position)
    canonical = _canonical_weight_names(gm, nodes)
    seen: dict[str, int] = {}
    units = []
    for index, run in enumerate(runs):
        last_position = position[run[-1]]
        first_position = position[run[0]]
        costs: list[OpCost] = [n.meta[COST_KEY] for n in run if n not in folded]
        params = _unit_params(run, canonical)
        crossing = (_crossing(nodes, position, last_position)
                    if index < len(runs) - 1 else ())
        units.append(Unit(
            index=index,
            name=_unique_name(unit_key(_module_path(_heaviest(run)), granularity), seen),
            nodes=tuple(n.name for n in run),
            flops=sum(c.flops for c in costs),
            bytes_moved=sum(c.bytes_moved for c in costs),
            op_count=sum(1 for c in costs if c.kind != "view" and c.kind not in FOLDED_KINDS),  # kernels run
            param_bytes=sum(nbytes for _name, nbytes in params),
            param_names=tuple(name for name, _ in params),
            param_sizes=tuple(nbytes for _, nbytes in params),
            activation_bytes=sum(n.meta[COST_KEY].output_bytes for n in run),
            peak_activation_bytes=int(max(live_bytes[first_position:last_position + 1])),
            cut_tensors=crossing,
            cut_bytes=sum(t.nbytes for t in crossing),
            op_mix=_op_mix(costs) + _layout_reorders(run) + _gemm_biases(run) + _attention_masks(run),
        ))
    return tuple(units)


def _blocked_conv(node: torch.fx.Node) -> tuple[bool, bool]:
    """(runs in NCHWc, reorders its input) of a convolution in ONNX Runtime's NCHWc
    transformer (probed on ONNX Runtime 1.32): a 2-D depthwise conv of aligned channels,
    a dense one reading aligned channels, or one of kind "stem" (fewer channels than a
    block, read as NCHW); grouped convs and dense ones of 18 or 22 channels stay NCHW."""
    cost = node.meta.get(COST_KEY)
    if node.target not in CONV_OPS or cost is None:
        return False, False
    if cost.kind == "stem":
        return True, False
    inputs, weight = (arg.meta.get(TENSOR_KEY) if isinstance(arg, torch.fx.Node) else None
                      for arg in node.args[:2])
    if inputs is None or weight is None or len(inputs.shape) != 4 or len(weight.shape) != 4:
        return False, False
    c_out, c_in = weight.shape[0], inputs.shape[1]
    grouped = weight.shape[1] != c_in and not (cost.kind == "depthwise" and c_out == c_in)
    aligned = not grouped and c_in % CHANNEL_ALIGNMENT == 0
    return aligned, aligned


def _layout_reorders(run: list[torch.fx.Node]) -> tuple[OpMix, ...]:
    """The layout conversions ONNX Runtime adds to a unit run alone: a ReorderInput
    (NCHW -> NCHWc) of each 4-D tensor a blocked convolution reads from outside its
    blocked region, a ReorderOutput of each blocked tensor read outside the region (a
    later unit, the graph's output, an op without an NCHWc kernel such as a mean). They
    are kernels the FX graph does not show (a separable block alone: 2 convolutions and
    2 reorders of its input and output), as kind "layout" with the bytes they read and
    write; a stage of several units keeps its inner cuts blocked (the join model). A
    ReorderOutput into channel planes a multiple of 4 KiB apart (`TensorSpec.aliased_planes`:
    float32 planes of 32 x 32, 64 x 64, 96 x 96) is counted once more as kind
    "aliased_layout", for what it costs beyond a reorder: it writes 8 channels at once into
    planes that map to the same cache sets, and took twice the time per byte of the others
    here (bench/layout_aliasing.py, 64 channels, one thread: 94-104 us per MB at 32, 64, 96
    and 128 px, 37-64 at the other sizes from 24 to 100 px; ReorderInput 43-73 at all)."""
    region: set[torch.fx.Node] = set()
    reordered_inputs: set[torch.fx.Node] = set()
    for node in run:
        blocked, reads_reordered = _blocked_conv(node)
        if blocked:
            region.add(node)
            if reads_reordered and node.args[0] not in region:
                reordered_inputs.add(node.args[0])
            continue
        tensor_inputs = [arg for arg in node.all_input_nodes if arg.op != "get_attr"]
        kind = node.meta[COST_KEY].kind
        if tensor_inputs and all(arg in region for arg in tensor_inputs) and (
                kind in FOLDED_KINDS or node.target in NCHWC_OPS):
            region.add(node)
    inside = set(run)
    reordered_outputs = [node for node in region if node.target is not operator.getitem
                         and _read_outside(node, region, inside)]
    tensors = [n.meta.get(TENSOR_KEY) for n in (*reordered_inputs, *reordered_outputs)]
    if not tensors:
        return ()
    reorders = OpMix("layout", len(tensors), 0, 2 * sum(t.nbytes for t in tensors if t is not None))
    aliased = [t for t in tensors[len(reordered_inputs):] if t is not None and t.aliased_planes]
    if not aliased:
        return (reorders,)
    return (reorders, OpMix("aliased_layout", len(aliased), 0, 2 * sum(t.nbytes for t in aliased)))


def _gemm_biases(run: list[torch.fx.Node]) -> tuple[OpMix, ...]:
    """The biases of the unit's linear layers (a linear or addmm with a bias), as kind
    "bias" with the bytes of their outputs written and read once more. ONNX Runtime runs
    such a layer as a Gemm that fills its output with the bias and then accumulates into
    it (between two Reshapes for an input of rank > 2), where a layer without one is a
    MatMul: 10-14 % slower on one thread here, 11-22 % on two (64 x 128 -> 512: 102 vs
    92 us and 62 vs 56 us), which the FLOPs and bytes of the matmul do not show."""
    biased = [node for node in run if node.target is aten.addmm.default or (
        node.target is aten.linear.default and len(node.args) > 2 and node.args[2] is not None)]
    if not biased:
        return ()
    return (OpMix("bias", len(biased), 0, 2 * sum(n.meta[COST_KEY].output_bytes for n in biased)),)


def _attention_masks(run: list[torch.fx.Node]) -> tuple[OpMix, ...]:
    """The kernels a boolean attention mask adds, as kind "elementwise": ONNX exports
    scaled_dot_product_attention with a boolean mask as a Where that turns the mask into
    0 / -inf, the Add into the scores (which a causal or float mask has too), and after
    the softmax an IsNaN and a Where that zero fully masked rows. HF GPT-2-small's blocks
    ran up to 10 % slower on two threads than the zoo's GPT-2 blocks of their shapes under
    is_causal (within 1 % on one), and had the same features without these kernels.
    Bytes: the mask read and its float written, the scores read twice, a boolean written
    and read, and the probabilities written. (The Where over the mask is counted even in a
    stage that also computes the mask from shapes, where ONNX Runtime folds it: one small
    kernel.)"""
    mask_bytes, score_bytes, count = 0, 0, 0
    for node in run:
        if node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        spec = mask.meta.get(TENSOR_KEY) if isinstance(mask, torch.fx.Node) else None
        query, key = (a.meta.get(TENSOR_KEY) for a in node.args[:2])
        if spec is None or spec.dtype != "bool" or query is None or key is None:
            continue
        count += 1
        mask_bytes += 5 * math.prod(spec.shape)
        score_bytes += 14 * math.prod(query.shape[:-1]) * key.shape[-2]
    if not count:
        return ()
    return (OpMix("elementwise", 3 * count, 0, mask_bytes + score_bytes),)


def _read_outside(node: torch.fx.Node, region: set[torch.fx.Node], inside: set[torch.fx.Node]) -> bool:
    """Whether a blocked node's value (through getitems of a batch norm's tuple) is read
    by a node outside the blocked region or outside the unit."""
    for user in node.users:
        if user.target is operator.getitem and user in region:
            if _read_outside(user, region, inside):
                return True
        elif user not in region or user not in inside or (
                user.args[0] is node and user.meta[COST_KEY].kind == "stem"):
            return True  # the last: a convolution that reads its input as NCHW
    return False


def _folded_on_load(compute: list[torch.fx.Node], unit_of: dict[torch.fx.Node, int]) -> set[torch.fx.Node]:
    """The compute nodes a unit computes from constants alone: every input is a weight or
    such a node of the same unit. ONNX exporters and ONNX Runtime fold them when the unit
    is built or loaded (HF models' causal masks and position ids, built from shapes), so
    they cost nothing per run. A node that reads a tensor from an earlier unit is not
    folded: exported alone, the unit gets that tensor as an input (a stage holding both
    units folds it; the unit records say what a unit costs alone)."""
    folded: set[torch.fx.Node] = set()
    for node in compute:
        if all(arg.op == "get_attr" or (arg in folded and unit_of[arg] == unit_of[node])
               for arg in node.all_input_nodes):
            folded.add(node)
    return folded


def _op_mix(costs: list[OpCost]) -> tuple[OpMix, ...]:
    totals: dict[str, list[int]] = {}
    for cost in costs:
        if cost.kind == "view":
            continue
        total = totals.setdefault(cost.kind, [0, 0, 0])
        total[0] += 1
        total[1] += cost.flops
        total[2] += cost.bytes_moved
    return tuple(OpMix(kind, *total) for kind, total in totals.items())


def _heaviest(run: list[torch.fx.Node]) -> torch.fx.Node:
    """The node whose module names the unit: the first one that reads weights."""
    for node in run:
        if any(arg.op == "get_attr" for arg in node.all_input_nodes):
            return node
    return run[0]


def _canonical_weight_names(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> dict[str, str]:
    """get_attr target -> the first target (graph order) that holds the same tensor object.

    torch.export keeps one get_attr target per module path, so a module shared by two
    models (or a tied weight) is reached under several names; the tensor is one.
    """
    first_of_tensor: dict[int, str] = {}
    canonical = {}
    for node in nodes:
        if node.op != "get_attr" or node.target in canonical:
            continue
        identity = id(fetch_attr(gm, node.target))
        canonical[node.target] = first_of_tensor.setdefault(identity, node.target)
    return canonical


def _unit_params(run: list[torch.fx.Node], canonical: dict[str, str]) -> list[tuple[str, int]]:
    seen: set[str] = set()
    params = []
    for node in run:
        for arg in node.all_input_nodes:
            if arg.op != "get_attr" or canonical[arg.target] in seen:
                continue
            seen.add(canonical[arg.target])
            params.append((canonical[arg.target], arg.meta[COST_KEY].param_bytes))
    return params


def union_param_bytes(units) -> int:
    """Bytes of the distinct weights a group of units reads (a shared weight counts once)."""
    sizes = {name: nbytes for unit in units for name, nbytes in zip(unit.param_names, unit.param_sizes)}
    return sum(sizes.values())


def _crossing(nodes: list[torch.fx.Node], position: dict, cut_after: int) -> tuple[TensorSpec, ...]:
    crossing = []
    for node in nodes[: cut_after + 1]:
        if node.op not in ("placeholder", "call_function"):
            continue
        if any(position[user] > cut_after for user in node.users):
            spec = node.meta.get(TENSOR_KEY)
            if spec is None:
                raise CaptureError(
                    f"units: the cut after node {node.name!r} would pass a non-tensor value; "
                    f"use a coarser granularity"
                )
            crossing.append(spec)
    return tuple(crossing)


def _live_bytes_by_position(nodes: list[torch.fx.Node], position: dict) -> list[int]:
    """Activation bytes live at each node position (views alias their base, weights excluded)."""
    end = len(nodes)
    last_use = {n: max((position[u] for u in n.users), default=position[n]) for n in nodes}
    for node in reversed(nodes):  # a view keeps its base alive as long as itself
        if node.op == "call_function" and node.meta[COST_KEY].kind == "view":
            for base in node.all_input_nodes:
                last_use[base] = max(last_use[base], last_use[node])
    delta = [0] * (end + 1)
    for node in nodes:
        if node.op == "placeholder":
            nbytes = node.meta[COST_KEY].output_bytes
        elif node.op == "call_function":
            nbytes = node.meta[COST_KEY].output_bytes
        else:
            continue
        if nbytes:
            delta[position[node]] += nbytes
            delta[last_use[node] + 1] -= nbytes
    live, running = [], 0
    for i in range(end):
        running += delta[i]
        live.append(running)
    return live
