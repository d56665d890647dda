"""Annotate: stamp every node of a captured graph with its tensor spec and static cost.

Reads shapes from `node.meta["val"]` (fake tensors from torch.export) and weights from
`get_attr` targets; writes `node.meta["edgeplan.tensor"]` (TensorSpec, or None for
non-tensor values) and `node.meta["edgeplan.cost"]` (OpCost). The graph is not changed.

FLOP rules (multiply-add = 2 FLOPs): linear/matmul family 2*M*N*K; convolution
2*out_elems*(C_in/groups)*prod(kernel) (kind "depthwise" when every filter reads one
channel of a multi-channel input; "stem" for a dense 2-D one reading fewer than
STEM_CHANNELS channels, which ONNX Runtime runs with a kernel of its own that reads the
NCHW input as it is, several times slower per FLOP: image stems; else "conv");
scaled-dot-product attention 4*B*H*L*S*E plus the
softmax; norms and softmax 5 per output element; other elementwise ops and reductions one
per element; views, embedding gathers and shape ops none. Views alias their input, so
they carry no bytes of their own, except those ONNX runs as copies (kind "copy": a
transpose or permute of an activation is a Transpose, a split, chunk or unbind a Split,
an expand an Expand that writes every repeat (HF LLaMA's repeat_kv for grouped-query
attention), each reading its input and writing its output; the 4-5 of a GPT-2 block's
attention were 7 % of its time on two threads here). A transpose of the last two dims
that only matmuls read stays a view (ONNX Runtime folds it into the matmul:
FusedMatMul), as does one of a weight (constant-folded). An inference batch norm that
reads a convolution's only output, and a ReLU/clamp/sigmoid/tanh/leaky ReLU that reads
such a convolution (or its folded batch norm), are folded into the convolution by
inference runtimes (ONNX Runtime's Conv+BatchNormalization and Conv+activation fusions):
the batch norm and a ReLU are kind "fused", with no FLOPs or bytes of their own, since
the conv kernel applies them as it computes; the other activations are kind "epilogue",
one FLOP per output element (three for a sigmoid or tanh) and no bytes, since ONNX
Runtime applies them in a pass over each output block the kernel just wrote, still in
cache (a ReLU6 costs a 32 -> 64 pointwise conv at 32 px 10 %, a ReLU nothing). Likewise an
RMSNorm written out (x * rsqrt(mean(x^2, -1) + eps), times a weight: HF LLaMA, Mistral,
Qwen) is one kernel in ONNX Runtime (SimplifiedLayerNormalization): its last multiply is
kind "norm", costed like a LayerNorm of its output, and the pow, mean, add, rsqrt and
multiply before it are "fused". And a GELU written out, x times a pointwise function of x
through tanh or erf (HF GPT-2's 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))), 8
ops; the erf form, 5), is one kernel in ONNX Runtime (its FastGelu and Gelu fusions): its
last op is one elementwise op reading x, costed like `aten.gelu`, and the ops before it
are "fused" (HF GPT-2's blocks were predicted 11 % high with the 8 ops costed apart).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from edgeplan.errors import CaptureError
from edgeplan.passes.capture import fetch_attr, numpy_dtype_name, signature_of
from edgeplan.passes.records import COST_KEY, TENSOR_KEY, OpCost, TensorSpec

aten = torch.ops.aten

MATMUL_OPS = {aten.mm.default, aten.bmm.default, aten.matmul.default, aten.addmm.default,
              aten.baddbmm.default, aten.linear.default}
CONV_OPS = {aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
NORM_OPS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.batch_norm.default,
            aten._native_batch_norm_legit_no_training.default, aten.group_norm.default,
            aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten.rms_norm.default}
EMBEDDING_OPS = {aten.embedding.default, aten.index_select.default, aten.gather.default}
REDUCE_OPS = {aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default,
              aten.amax.default, aten.max.dim, aten.adaptive_avg_pool2d.default,
              aten.max_pool2d.default, aten.avg_pool2d.default, aten.cumsum.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
            aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
            aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim,
            aten.squeeze.default, aten.flatten.using_ints, aten.alias.default,
            aten.contiguous.default, aten.unflatten.int, aten.split.Tensor,
            aten.chunk.default, aten.unbind.int, aten.detach.default, aten.dropout.default,
            aten.clone.default, aten.to.dtype, aten.to.device,
            aten._assert_tensor_metadata.default, operator.getitem}
# View ops ONNX exports as kernels that copy (Transpose, Split, Expand): kind "copy" on activations.
COPY_OPS = {aten.permute.default, aten.transpose.int, aten.split.Tensor, aten.chunk.default,
            aten.unbind.int, aten.expand.default}
# Ops that only create shapes/constants: free, like views.
SHAPE_OPS = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
             aten.ones.default, aten.full.default, aten.scalar_tensor.default, aten.sym_size.int,
             aten.empty.memory_format}
# Folded into the convolution before them by inference runtimes (kind "fused").
FOLDED_NORM_OPS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
FOLDED_ACTIVATION_OPS = {aten.relu.default, aten.relu6.default, aten.hardtanh.default,
                         aten.clamp.default, aten.sigmoid.default, aten.tanh.default,
                         aten.leaky_relu.default}
# Of those, the ones ONNX Runtime's conv kernels apply as they compute (kind "fused"); the
# activations it applies in a pass over each computed output block are kind "epilogue" (a
# ReLU6 after a 32 -> 64 pointwise conv at 32 px took 6.3 us of its 68, a ReLU nothing).
IN_KERNEL_FOLDED_OPS = FOLDED_NORM_OPS | {aten.relu.default}
# FLOPs per output element of an epilogue (a clamp's: 1): MLAS computes a sigmoid or tanh
# by a rational approximation, which cost 2.5-3x a clamp's pass after the same convs here
# (a 1x1 conv with 1.6 M outputs: +900 us against +300 us).
EPILOGUE_FLOPS_PER_ELEMENT = {aten.sigmoid.default: 3, aten.tanh.default: 3}
NORM_FLOPS_PER_ELEMENT = 5
# A written-out GELU: x times a pointwise function of x through one of these (one kernel in
# ONNX Runtime), the rest arithmetic of x and scalars.
GELU_ANCHORS = {aten.tanh.default, aten.erf.default}
GELU_ARITHMETIC_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
                       aten.rsub.Scalar, aten.div.Tensor, aten.pow.Tensor_Scalar}
# ONNX Runtime's NCHWc block on AVX-512 hosts (8 with AVX2): a dense conv reading fewer
# channels reads its input in NCHW (kind "stem"; passes/units.py: layout reorders).
STEM_CHANNELS = 16
SOFTMAX_FLOPS_PER_ELEMENT = 5


def _tensor_spec(name: str, value) -> TensorSpec | None:
    if isinstance(value, torch.Tensor):
        return TensorSpec(name, tuple(int(d) for d in value.shape), numpy_dtype_name(value.dtype))
    return None


def _spec(node) -> TensorSpec | None:
    return node.meta.get(TENSOR_KEY) if isinstance(node, torch.fx.Node) else None


def _numel(spec: TensorSpec | None) -> int:
    return math.prod(spec.shape) if spec is not None else 0


def _flops(node: torch.fx.Node, out: TensorSpec | None) -> tuple[str, int]:
    target = node.target
    args = node.args
    out_elems = _numel(out)
    if target in MATMUL_OPS:
        # K is the contracted dim of the first matrix operand (addmm/baddbmm: arg 1).
        lhs = _spec(args[1] if target in (aten.addmm.default, aten.baddbmm.default) else args[0])
        k = lhs.shape[-1] if lhs is not None and lhs.shape else 1
        return "matmul", 2 * out_elems * k
    if target in CONV_OPS:
        weight, inputs = _spec(args[1]), _spec(args[0])
        per_output = math.prod(weight.shape[1:]) if weight is not None else 1
        # One input channel per filter of a multi-channel input: a depthwise conv, memory-bound
        # and far slower per FLOP than a dense one, so its own kind for latency predictors.
        depthwise = (weight is not None and inputs is not None and len(inputs.shape) > 1
                     and weight.shape[1] == 1 and inputs.shape[1] > 1)
        if depthwise:
            return "depthwise", 2 * out_elems * per_output
        # Image stems ran 36-44 GFLOP/s here where convs of their size reading 16+
        # channels ran 50-100 (module docstring)
        reads_nchw = (weight is not None and inputs is not None and len(inputs.shape) == 4
                      and weight.shape[1] == inputs.shape[1] < STEM_CHANNELS)
        return "stem" if reads_nchw else "conv", 2 * out_elems * per_output
    if target in ATTENTION_OPS:
        q, k = _spec(args[0]), _spec(args[1])
        if q is None or k is None:
            return "attention", 0
        batch_heads = math.prod(q.shape[:-2])
        length_q, embed = q.shape[-2], q.shape[-1]
        length_kv = k.shape[-2]
        scores = batch_heads * length_q * length_kv
        return "attention", 4 * scores * embed + SOFTMAX_FLOPS_PER_ELEMENT * scores
    if target in NORM_OPS:
        return "norm", NORM_FLOPS_PER_ELEMENT * out_elems
    if target in EMBEDDING_OPS:
        return "embedding", 0
    if target in REDUCE_OPS:
        inputs = _spec(args[0])
        return "reduce", max(_numel(inputs), out_elems)
    if target in COPY_OPS and _copies(node):
        return "copy", 0
    if target in VIEW_OPS or target in SHAPE_OPS:
        return "view", 0
    if out is not None:
        return "elementwise", out_elems
    return "other", 0


def _copies(node: torch.fx.Node) -> bool:
    """Whether ONNX Runtime runs a COPY_OPS node as a copy: not where it reads a weight
    (through views; constant-folded), nor where it swaps the last two dims for matmuls only
    (folded into them: FusedMatMul's transposed operand)."""
    base = node.args[0]
    while isinstance(base, torch.fx.Node):
        cost = base.meta.get(COST_KEY)
        if cost is None or cost.kind == "param":  # a weight (get_attr)
            return False
        if cost.kind != "view" or not base.all_input_nodes:
            break
        base = base.all_input_nodes[0]
    readers = _readers(node)
    return not (readers and all(r.target in MATMUL_OPS for r in readers) and _swaps_last_two(node))


def _swaps_last_two(node: torch.fx.Node) -> bool:
    spec = _spec(node.args[0])
    rank = len(spec.shape) if spec is not None else 0
    if rank < 2:
        return False
    if node.target is aten.transpose.int:
        return {int(d) % rank for d in node.args[1:3]} == {rank - 2, rank - 1}
    if node.target is aten.permute.default:
        dims = [int(d) % rank for d in node.args[1]]
        return dims == list(range(rank - 2)) + [rank - 1, rank - 2]
    return False


def annotate(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Stamp TensorSpec and OpCost records on every node of a captured graph (in place)."""
    signature_of(gm)  # precondition: a captured graph
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spec = _tensor_spec(node.name, node.meta.get("val"))
            node.meta[TENSOR_KEY] = spec
            node.meta[COST_KEY] = OpCost("input", 0, 0, spec.nbytes if spec else 0)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            spec = _tensor_spec(node.name, value)
            nbytes = spec.nbytes if spec else 0
            node.meta[TENSOR_KEY] = spec
            node.meta[COST_KEY] = OpCost("param", 0, 0, 0, param_bytes=nbytes)
        elif node.op == "call_function":
            spec = _tensor_spec(node.name, node.meta.get("val"))
            node.meta[TENSOR_KEY] = spec
            kind, flops = _flops(node, spec)
            if _folds_into_conv(node):
                output_bytes = spec.nbytes if spec else 0
                node.meta[COST_KEY] = (
                    OpCost("fused", 0, 0, output_bytes)
                    if node.target in IN_KERNEL_FOLDED_OPS
                    else OpCost("epilogue", EPILOGUE_FLOPS_PER_ELEMENT.get(node.target, 1) * _numel(spec),
                                0, output_bytes))
                continue
            if kind == "view":
                node.meta[COST_KEY] = OpCost(kind, 0, 0, 0)
                continue
            output_bytes = spec.nbytes if spec else _tuple_bytes(node.meta.get("val"))
            if kind == "embedding":  # a gather reads only the rows it returns
                input_bytes = output_bytes
            else:
                input_bytes = sum(
                    _spec(arg).nbytes for arg in node.all_input_nodes if _spec(arg) is not None
                )
            node.meta[COST_KEY] = OpCost(kind, int(flops), int(input_bytes + output_bytes),
                                         int(output_bytes))
        elif node.op == "output":
            node.meta[TENSOR_KEY] = None
            node.meta[COST_KEY] = OpCost("other", 0, 0, 0)
        else:
            raise CaptureError(
                f"annotate: unexpected node {node.name!r} ({node.op} {node.target}); capture "
                f"the model with edgeplan.passes.capture.capture"
            )
    for node in gm.graph.nodes:
        fused = _rms_norm_ops(node)
        if fused is not None:
            _cost_as_one_norm(fused)
        fused = _gelu_ops(node)
        if fused is not None:
            _cost_as_one_elementwise(fused)
    return gm


def _readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes reading `node`'s value (torch.export's metadata asserts do not)."""
    return [user for user in node.users if user.target is not aten._assert_tensor_metadata.default]


def _only_reader(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node reading `node`, looking through views of it (such as a cast to the
    dtype it has); None if several read it."""
    while len(readers := _readers(node)) == 1:
        (reader,) = readers
        if reader.meta[COST_KEY].kind != "view" or reader.target is operator.getitem:
            return reader
        node = reader
    return None


def _rms_norm_ops(rsqrt: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes of an RMSNorm around `rsqrt` (pow(x, 2) -> mean(-1, keepdim) -> + eps ->
    rsqrt -> x * it [-> * weight]), the last one last; None where `rsqrt` is not one."""
    if rsqrt.target is not aten.rsqrt.default:
        return None
    add = rsqrt.args[0]
    if not (isinstance(add, torch.fx.Node) and add.target is aten.add.Tensor
            and isinstance(add.args[1], float) and len(_readers(add)) == 1):
        return None
    mean = add.args[0]
    if not (isinstance(mean, torch.fx.Node) and mean.target is aten.mean.dim
            and list(mean.args[1]) == [-1] and len(_readers(mean)) == 1):
        return None
    square = mean.args[0]
    if not (isinstance(square, torch.fx.Node) and square.target is aten.pow.Tensor_Scalar
            and square.args[1] == 2 and len(_readers(square)) == 1):
        return None
    x = square.args[0]
    scale = _only_reader(rsqrt)
    if scale is None or scale.target is not aten.mul.Tensor or set(scale.args) != {x, rsqrt}:
        return None
    fused = [square, mean, add, rsqrt, scale]
    weighted = _only_reader(scale)
    if (weighted is not None and weighted.target is aten.mul.Tensor
            and any(isinstance(arg, torch.fx.Node) and arg.op == "get_attr" for arg in weighted.args)):
        fused.append(weighted)
    return fused


def _cost_as_one_norm(fused: list[torch.fx.Node]) -> None:
    """Re-cost an RMSNorm's ops as one norm kernel: it reads x and the weight and writes
    the last op's output."""
    read = _spec(fused[0].args[0]).nbytes + sum(
        _spec(arg).nbytes for arg in fused[-1].all_input_nodes if arg.op == "get_attr")
    _cost_as_one_kernel(fused, "norm", NORM_FLOPS_PER_ELEMENT, read)


def _cost_as_one_kernel(fused: list[torch.fx.Node], kind: str, flops_per_element: int,
                        read_bytes: int) -> None:
    """Re-cost the ops of `fused` (its output last) as the one kernel an inference runtime
    runs for them: the ops before the last are "fused" (free), the last reads `read_bytes`
    and writes its output, at `flops_per_element` of it."""
    *inner, last = fused
    for node in inner:
        node.meta[COST_KEY] = OpCost("fused", 0, 0, node.meta[COST_KEY].output_bytes)
    out = _spec(last)
    last.meta[COST_KEY] = OpCost(kind, flops_per_element * _numel(out), read_bytes + out.nbytes, out.nbytes)


def _pointwise_over(node, source: torch.fx.Node | None = None) -> tuple[list, torch.fx.Node] | None:
    """(ops, x) where `node` computes an arithmetic expression (GELU_ARITHMETIC_OPS, each
    op read only by the next) of one tensor x (`source`, where given) and scalars; ([], x) when
    `node` is x itself; None where it reads another tensor too."""
    if node is source:
        return [], node
    if node.target not in GELU_ARITHMETIC_OPS or len(_readers(node)) != 1:
        return ([], node) if source is None else None
    ops = []
    for arg in node.all_input_nodes:
        found = _pointwise_over(arg, source)
        if found is None:
            return None
        ops += found[0]
        source = found[1]
    return (ops + [node], source) if source is not None else None


def _gelu_ops(anchor: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes of a written-out GELU around `anchor` (a tanh or erf of an arithmetic
    expression of x, then arithmetic over it, x and scalars, one op a product with an
    expression of x: x * f(x)), in graph order; None where `anchor` is not one."""
    if anchor.target not in GELU_ANCHORS or len(_readers(anchor)) != 1:
        return None
    found = _pointwise_over(anchor.args[0])
    if found is None:
        return None
    ops, x = found
    ops, last, gated = ops + [anchor], anchor, False
    while len(readers := _readers(last)) == 1 and readers[0].target in GELU_ARITHMETIC_OPS:
        reader = readers[0]
        others = [_pointwise_over(arg, x) for arg in reader.all_input_nodes if arg is not last]
        if any(found is None for found in others):
            break
        gated |= reader.target is aten.mul.Tensor and bool(others)
        ops += [op for found in others for op in found[0]] + [reader]
        last = reader
    if not gated:
        return None
    inside = set(ops)
    return [node for node in anchor.graph.nodes if node in inside]


def _cost_as_one_elementwise(fused: list[torch.fx.Node]) -> None:
    """Re-cost a written-out GELU's ops as one elementwise kernel, costed as `aten.gelu` is:
    it reads x (the one tensor its ops read from outside), writes the last op's output."""
    inside = set(fused)
    (x,) = {arg for node in fused for arg in node.all_input_nodes if arg not in inside}
    _cost_as_one_kernel(fused, "elementwise", 1, _spec(x).nbytes)


def _folds_into_conv(node: torch.fx.Node) -> bool:
    """Whether an inference runtime folds `node` into the convolution it reads (through
    a getitem of a batch norm's result tuple), the convolution having no other reader."""
    if node.target not in FOLDED_NORM_OPS | FOLDED_ACTIVATION_OPS or not node.args:
        return False
    producer = node.args[0]
    if isinstance(producer, torch.fx.Node) and producer.target is operator.getitem:
        producer = producer.args[0]
    if not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
        return False
    cost = producer.meta.get(COST_KEY)
    if cost is None:
        return False
    if cost.kind in ("conv", "stem", "depthwise"):
        return True
    # An activation after a batch norm that is itself folded into a convolution.
    return (node.target in FOLDED_ACTIVATION_OPS and cost.kind == "fused"
            and producer.target in FOLDED_NORM_OPS)


def _tuple_bytes(value) -> int:
    if isinstance(value, (tuple, list)):
        return sum(int(v.numel()) * v.element_size() for v in value if isinstance(v, torch.Tensor))
    return 0
