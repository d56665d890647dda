"""Capture, annotate and units on tiny hand-built models: exact FLOPs, bytes and cuts."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeplan.errors import CaptureError
from edgeplan.passes.annotate import annotate
from edgeplan.passes.capture import capture
from edgeplan.passes.records import COST_KEY, SIGNATURE_KEY, UNIT_KEY, OpCost, OpMix, TensorSpec
from edgeplan.passes.units import group_units, unit_key


def costs_by_kind(gm):
    table = {}
    for node in gm.graph.nodes:
        cost = node.meta[COST_KEY]
        table.setdefault(cost.kind, []).append(cost)
    return table


def kernels_of(units, kind: str) -> list[int]:
    """How many kernels of `kind` each unit's op mix counts."""
    return [sum(m.count for m in unit.op_mix if m.kind == kind) for unit in units]


class LinearOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)


def test_linear_flops_and_bytes():
    gm = annotate(capture(LinearOnly(), (torch.randn(2, 8),)))
    (matmul,) = costs_by_kind(gm)["matmul"]
    assert matmul.flops == 2 * 2 * 4 * 8
    # reads x (2x8), weight (4x8), bias (4), writes out (2x4); fp32
    assert matmul.bytes_moved == 4 * (16 + 32 + 4 + 8)
    assert matmul.output_bytes == 4 * 8
    params = costs_by_kind(gm)["param"]
    assert sorted(p.param_bytes for p in params) == [16, 128]


class RotaryTable(nn.Module):
    """HF LLaMA's rotary embedding: cos/sin of positions x frequencies under torch.no_grad()
    (torch.export wraps such a block in a higher-order op), with a nested autocast(enabled=False)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(4), persistent=False)

    def forward(self, x):
        with torch.no_grad():
            angles = x[..., None] * self.inv_freq
            with torch.autocast("cpu", enabled=False):
                table = torch.cat([angles, angles], dim=-1)
            return table.cos() * 2.0, table.sin()


def test_no_grad_and_disabled_autocast_blocks_are_inlined_and_costed():
    model, x = RotaryTable(), torch.randn(1, 6)
    gm = annotate(capture(model, (x,)))
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "wrap_with" in str(t)]
    assert {torch.ops.aten.cos.default, torch.ops.aten.sin.default, torch.ops.aten.cat.default} <= set(targets)
    elementwise = costs_by_kind(gm)["elementwise"]
    # mul (1x6x4), cat, cos, the x2, sin (1x6x8 each): one FLOP per output element
    assert sum(c.flops for c in elementwise) == 24 + 4 * 48
    assert "other" not in {c.kind for c in elementwise}
    for got, want in zip(gm(x), model(x)):
        torch.testing.assert_close(got, want)


class ConvOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


def test_conv_flops():
    gm = annotate(capture(ConvOnly(), (torch.randn(1, 3, 8, 8),)))
    # 3 input channels: an image stem, ONNX Runtime's NCHW-input kernel
    (conv,) = costs_by_kind(gm)["stem"]
    assert conv.flops == 2 * (4 * 6 * 6) * (3 * 3 * 3)
    wide = annotate(capture(nn.Conv2d(16, 4, 3), (torch.randn(1, 16, 8, 8),)))
    (conv,) = costs_by_kind(wide)["conv"]
    assert conv.flops == 2 * (4 * 6 * 6) * (16 * 3 * 3)


class ConvNormAct(nn.Module):
    """conv -> BN -> ReLU6 (folded by inference runtimes), then a BN and a ReLU that read
    a tensor two ops use (a conv with a second reader; an add): not folded."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu6(self.bn(self.conv(x)))
        z = self.conv2(y)
        return F.relu(self.bn2(z) + z)


def test_norm_and_activation_after_a_conv_are_fused():
    model = ConvNormAct().eval()
    gm = annotate(capture(model, (torch.randn(1, 3, 8, 8),)))
    kinds = costs_by_kind(gm)
    output_bytes = 4 * 4 * 8 * 8
    # bn after the first conv: free; its relu6 a pass over the conv's output
    assert kinds["fused"] == [OpCost("fused", 0, 0, output_bytes)]
    assert kinds["epilogue"] == [OpCost("epilogue", output_bytes // 4, 0, output_bytes)]
    assert len(kinds["norm"]) == 1  # bn2 reads conv2, which the add reads too
    assert len(kinds["elementwise"]) == 2  # the add, and the relu after it
    units = group_units(gm)
    # folded ops launch no kernel: 2 convs, bn2, add, relu
    assert sum(u.op_count for u in units) == 5
    assert sum(m.count for u in units for m in u.op_mix if m.kind in ("fused", "epilogue")) == 2


class ConvEpilogues(nn.Module):
    """One conv + batch norm per activation a conv kernel can apply."""

    ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.LeakyReLU)

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16), act())
                                    for act in self.ACTIVATIONS)

    def forward(self, x):
        return tuple(block(x) for block in self.blocks)


def test_conv_activations_are_free_only_where_the_kernel_applies_them():
    """ONNX Runtime folds every one of these activations into its conv (no node of its
    own), but only a ReLU runs inside the conv kernel; the others are a pass over the
    output (kind "epilogue"), which cost a ReLU6 after a 32 -> 64 pointwise conv at 32 px
    6.3 us of its 68 here, a sigmoid or tanh 2.5-3x a ReLU6."""
    x = torch.randn(1, 16, 8, 8)
    gm = annotate(capture(ConvEpilogues().eval(), (x,)))
    units = group_units(gm)
    kinds = [{m.kind: m.count for m in unit.op_mix if m.kind != "layout"} for unit in units]
    assert kinds == [{"conv": 1, "fused": 2}] + [{"conv": 1, "fused": 1, "epilogue": 1}] * 4
    # one FLOP per output element for a clamp, three for MLAS's sigmoid and tanh; no bytes
    # (the output block is still in cache)
    epilogues = [m for unit in units for m in unit.op_mix if m.kind == "epilogue"]
    assert [(m.flops, m.bytes_moved) for m in epilogues] == [(n * 16 * 8 * 8, 0) for n in (1, 3, 3, 1)]
    # the layout reorders are the conv's alone: the epilogue runs in its blocked layout
    assert all(unit.op_mix[-1] == OpMix("layout", 2, 0, 2 * 2 * 16 * 8 * 8 * 4) for unit in units)
    for ops in _onnx_runtime_ops(gm, units, (x,)):
        assert not {"Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu"} & set(ops), ops  # folded


class SequentialStem(nn.Module):
    """A stem whose conv, batch norm and activation are separate Sequential children (the
    torchvision spelling), then a block with its own unfolded norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())])
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.blocks[0](self.stem(x)))


def test_folded_norm_and_activation_join_their_convolution_unit():
    gm = annotate(capture(SequentialStem().eval(), (torch.randn(1, 3, 8, 8),)))
    units = group_units(gm)
    # stem.1 (BN) and stem.2 (ReLU6) fold into stem.0: no cut between them; the
    # LayerNorm is a real op with weights and stays a unit of its own.
    assert [u.name for u in units] == ["stem.0", "blocks.0", "norm"]
    stem = units[0]
    # and ONNX Runtime reorders its blocked output back to NCHW for the unit's output
    assert {m.kind: m.count for m in stem.op_mix} == {"stem": 1, "fused": 1, "epilogue": 1, "layout": 1}
    assert stem.param_bytes == (8 * 3 * 3 * 3 + 4 * 8) * 4  # conv weight + BN's four vectors
    assert stem.cut_bytes == 8 * 4 * 4 * 4  # the activation after ReLU6, not the conv's output


class LayoutNet(nn.Module):
    """Convolutions in every layout case of ONNX Runtime's NCHWc transformer, no channel
    count between 8 and 15 (where AVX2's block of 8 and AVX-512's of 16 differ)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        # depthwise + pointwise, hardswish (ORT: HardSigmoid and Mul, both blocked)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Hardswish(), nn.Conv2d(16, 32, 1)),
            # 32 -> 4 blocked; the 4 -> 16 conv reads fewer channels than a block: as NCHW
            nn.Sequential(nn.Conv2d(32, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 3, 1, 1)),
            # a grouped (not depthwise) conv runs in NCHW: no reorder at all
            nn.Sequential(nn.Conv2d(16, 16, 1, groups=4)),
        ])
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def _onnx_runtime_ops(gm, units, inputs) -> list[collections.Counter]:
    """The op types of ONNX Runtime's optimized graph of each unit exported alone (at the
    default optimization level, as the runtime and the profiler run it)."""
    import tempfile
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    from edgeplan.passes.capture import bind_inputs, signature_of
    from edgeplan.passes.split import run_stages, split_stages
    from edgeplan.targets.onnx import OnnxTarget

    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        env = bind_inputs(signature_of(gm), inputs)
        stages = run_stages(split_stages(gm, list(range(len(units)))), env)
        for index, (stage, args) in enumerate(stages):
            artifact = OnnxTarget().emit(stage, index, args, Path(tmp))
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(Path(tmp) / f"optimized{index}.onnx")
            ort.InferenceSession(str(Path(tmp) / artifact.path), options, providers=["CPUExecutionProvider"])
            graph = onnx.load(options.optimized_model_filepath).graph
            counts.append(collections.Counter(node.op_type for node in graph.node))
    return counts


def _onnx_runtime_reorders(gm, units, inputs) -> list[int] | None:
    """Reorder nodes in ONNX Runtime's optimized graph of each unit exported alone; None
    where this host's ONNX Runtime has no NCHWc kernels (no reorder around a plain conv)."""
    counts = [sum(n for op, n in ops.items() if op.startswith("Reorder"))
              for ops in _onnx_runtime_ops(gm, units, inputs)]
    return counts if any(counts) else None


def test_layout_reorders_are_the_ones_onnx_runtime_adds():
    inputs = (torch.randn(1, 3, 16, 16),)
    gm = annotate(capture(LayoutNet().eval(), inputs))
    units = group_units(gm)
    layout = {u.name: next((m for m in u.op_mix if m.kind == "layout"), None) for u in units}
    assert [u.name for u in units] == ["stem.0", "blocks.0", "blocks.1", "blocks.2", "head"]
    counts = {name: mix.count if mix else 0 for name, mix in layout.items()}
    # stem: reads its 3 channels as they are, reorders its output; blocks.0: its input
    # and output; blocks.1: its input, the 32 -> 4 conv's output for the NCHW-reading
    # conv, and its output; blocks.2 and the head run no blocked conv
    assert counts == {"stem.0": 1, "blocks.0": 2, "blocks.1": 3, "blocks.2": 0, "head": 0}
    activation = 4 * 16 * 8 * 8  # 16 channels at 8 x 8, float32
    assert layout["stem.0"].bytes_moved == 2 * activation  # read and written once
    assert layout["blocks.0"].bytes_moved == 2 * (activation + 2 * activation)
    assert layout["blocks.1"].flops == 0
    ort_counts = _onnx_runtime_reorders(gm, units, inputs)
    if ort_counts is None:
        pytest.skip("this host's ONNX Runtime runs convolutions without the NCHWc layout")
    assert ort_counts == list(counts.values())



def test_reorders_out_into_channel_planes_4_kib_apart_are_counted_again():
    """At 64 px the stem leaves 32 x 32 planes (4096 bytes): every ReorderOutput writes 8
    channel planes that map to the same cache sets (twice the time per byte here), its
    ReorderInputs read them. At 56 px (28 x 28 planes, 3136 bytes) none are aliased."""
    def mixes(size):
        inputs = (torch.randn(1, 3, size, size),)
        units = group_units(annotate(capture(LayoutNet().eval(), inputs)))
        return {u.name: {m.kind: m for m in u.op_mix if m.kind.endswith("layout")} for u in units}

    aligned, off = mixes(64), mixes(56)
    aliased = {name: kinds["aliased_layout"].count if "aliased_layout" in kinds else 0
               for name, kinds in aligned.items()}
    # the reorders out of the stem, blocks.0, and blocks.1's two (the 32 -> 4 conv's output
    # for the NCHW-reading conv, and its own output); no unit at 56 px has one
    assert aliased == {"stem.0": 1, "blocks.0": 1, "blocks.1": 2, "blocks.2": 0, "head": 0}
    assert all("aliased_layout" not in kinds for kinds in off.values())
    # counted again, next to every reorder as kind "layout" (what a reorder costs)
    plane = 32 * 32 * 4
    assert aligned["blocks.0"]["aliased_layout"] == OpMix("aliased_layout", 1, 0, 2 * 32 * plane)
    assert aligned["blocks.0"]["layout"] == OpMix("layout", 2, 0, 2 * (16 + 32) * plane)
    for name, kinds in aligned.items():
        assert kinds.get("layout", OpMix("layout", 0, 0, 0)).count == (
            off[name]["layout"].count if "layout" in off[name] else 0)


def test_aliased_planes_of_a_tensor_spec():
    assert TensorSpec("x", (1, 16, 32, 32), "float32").aliased_planes
    assert TensorSpec("x", (2, 8, 32, 64), "float16").aliased_planes
    assert not TensorSpec("x", (1, 16, 28, 28), "float32").aliased_planes
    assert not TensorSpec("x", (1, 1024, 1024), "float32").aliased_planes  # not a 4-D activation

class HeadsAttention(nn.Module):
    """Multi-head attention written out: a fused QKV projection split in three, heads
    transposed in and out, the keys transposed for the score matmul, and a weight used
    transposed."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Parameter(torch.randn(width, width))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (scores @ v).transpose(1, 2).reshape(batch, length, width)
        return y @ self.out.t()


def test_views_onnx_runs_as_copies_are_costed_as_copies():
    inputs = (torch.randn(2, 8, 32),)
    gm = annotate(capture(HeadsAttention().eval(), inputs))
    copies = costs_by_kind(gm)["copy"]
    # the split and the four head transposes; not the keys' (folded into the score
    # matmul) nor the weight's (constant-folded)
    assert len(copies) == 5
    activation = 4 * 2 * 8 * 32
    # each reads and writes its tensor: the split the whole QKV output (three activations)
    assert sorted(c.bytes_moved for c in copies) == [2 * activation] * 4 + [6 * activation]
    assert all(c.flops == 0 for c in copies)
    units = group_units(gm)
    per_unit = kernels_of(units, "copy")
    assert sum(per_unit) == 5
    ort_ops = _onnx_runtime_ops(gm, units, inputs)
    assert [ops["Transpose"] + ops["Split"] for ops in ort_ops] == per_unit


class RepeatedKeys(nn.Module):
    """HF LLaMA's repeat_kv for grouped-query attention: keys and values expanded over the
    query heads of their group, then attention."""

    def __init__(self, width: int = 16, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width * kv_heads // heads)

    def repeat(self, x):
        batch, kv_heads, length, dim = x.shape
        expanded = x[:, :, None].expand(batch, kv_heads, self.heads // kv_heads, length, dim)
        return expanded.reshape(batch, self.heads, length, dim)

    def forward(self, x):
        batch, length, width = x.shape
        q = self.q(x).view(batch, length, self.heads, -1).transpose(1, 2)
        k, v = (t.view(batch, length, self.kv_heads, -1).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
        return F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), is_causal=True)


def test_expands_of_activations_are_the_copies_onnx_runtime_runs():
    inputs = (torch.randn(2, 6, 16),)
    gm = annotate(capture(RepeatedKeys().eval(), inputs))
    expands = [node.meta[COST_KEY] for node in gm.graph.nodes if node.target is torch.ops.aten.expand.default]
    assert [c.kind for c in expands] == ["copy", "copy"]
    # each reads its (2, 2, 6, 4) keys or values and writes them for all four heads
    assert [c.bytes_moved for c in expands] == [4 * (2 * 2 * 6 * 4 + 2 * 2 * 2 * 6 * 4)] * 2
    units = group_units(gm)
    per_unit = kernels_of(units, "copy")
    ort_ops = _onnx_runtime_ops(gm, units, inputs)
    assert sum(ops["Expand"] for ops in ort_ops) == 2
    assert [ops["Transpose"] + ops["Split"] + ops["Expand"] for ops in ort_ops] == per_unit


class Projections(nn.Module):
    """Linear layers with and without a bias, on 3-D and on 2-D inputs."""

    def __init__(self):
        super().__init__()
        self.biased = nn.Linear(16, 24)
        self.plain = nn.Linear(24, 24, bias=False)
        self.flat = nn.Linear(24, 8)

    def forward(self, x):
        return self.flat(self.plain(self.biased(x)).flatten(0, 1))


def test_linear_biases_are_the_gemms_onnx_runtime_runs():
    inputs = (torch.randn(2, 5, 16),)
    gm = annotate(capture(Projections().eval(), inputs))
    units = group_units(gm)
    biases = [next((m for m in u.op_mix if m.kind == "bias"), None) for u in units]
    per_unit = [m.count if m else 0 for m in biases]
    assert sum(per_unit) == 2  # the bias-free layer is a MatMul
    # the output written by the bias fill and read back by the accumulation
    assert sum(m.bytes_moved for m in biases if m) == 2 * 4 * (10 * 24 + 10 * 8)
    assert all(m.flops == 0 for m in biases if m)
    ort_ops = _onnx_runtime_ops(gm, units, inputs)
    assert [ops["Gemm"] for ops in ort_ops] == per_unit
    assert sum(ops["MatMul"] for ops in ort_ops) == 1


class WrittenOutRMSNorm(nn.Module):
    """HF LLaMA's RMSNorm (casts to float32 around it), then one that squares by x ** 3."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.other = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        x = x.to(torch.float32)
        normed = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float32)
        return self.other * (normed * torch.rsqrt(normed.pow(3).mean(-1, keepdim=True) + 1e-6))


def test_written_out_rms_norm_is_one_norm_kernel():
    gm = annotate(capture(WrittenOutRMSNorm(8), (torch.randn(2, 3, 8),)))
    kinds = costs_by_kind(gm)
    (norm,) = kinds["norm"]  # the second one is not an RMSNorm (x ** 3): left as it is
    elements = 2 * 3 * 8
    assert norm.flops == 5 * elements
    assert norm.bytes_moved == 4 * (elements + 8 + elements)  # reads x and the weight, writes out
    assert len(kinds["fused"]) == 5 and all(c.flops == 0 for c in kinds["fused"])
    assert len(kinds["elementwise"]) == 5  # pow, add, rsqrt and two muls of the x ** 3 one
    (unit,) = group_units(gm)
    assert unit.op_count == 1 + 6  # the RMSNorm kernel, the other's six ops (mean: reduce)


class WrittenOutGelu(nn.Module):
    """HF GPT-2's tanh GELU and an erf GELU, written out; then a tanh gating another
    tensor and a plain tanh activation, which are no GELU."""

    def forward(self, x, y):
        tanh_gelu = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
        erf_gelu = tanh_gelu * 0.5 * (1.0 + torch.erf(tanh_gelu / math.sqrt(2.0)))
        return torch.tanh(erf_gelu) * y + torch.tanh(y)


def test_written_out_gelu_is_one_elementwise_kernel():
    inputs = (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    gm = annotate(capture(WrittenOutGelu(), inputs))
    by_node = {node.name: node.meta[COST_KEY] for node in gm.graph.nodes}
    elements = 2 * 3 * 8
    assert len(costs_by_kind(gm)["fused"]) == 7 + 4  # the tanh GELU's first 7 ops, the erf GELU's first 4
    # each GELU's last op costed as aten.gelu: reads x, writes its output, one FLOP per element
    for last in ("mul_3", "mul_5"):
        assert by_node[last] == OpCost("elementwise", elements, 2 * 4 * elements, 4 * elements)
    # the other tanh ops, the multiply by y and the last add are left as they are
    assert sorted(name for name, cost in by_node.items() if cost.kind == "elementwise") == [
        "add_3", "mul_3", "mul_5", "mul_6", "tanh_1", "tanh_2"]
    (unit,) = group_units(gm)
    assert unit.op_count == 2 + 4
    ops = _onnx_runtime_ops(gm, [unit], inputs)[0]
    if not (ops["FastGelu"] or ops["Gelu"]):
        pytest.skip("this host's ONNX Runtime does not fuse written-out GELUs")
    assert ops["FastGelu"] + ops["Gelu"] == 2 and ops["Erf"] == 0 and ops["Tanh"] == 2


class ConstantMask(nn.Module):
    """An embedding and a causal mask built from shapes alone (as HF models build theirs);
    a linear layer that adds the mask, doubled there, to its output."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids):
        steps = torch.arange(ids.shape[1])
        allowed = (steps[:, None] >= steps[None, :]) & (steps[None, :] >= 0)
        mask = torch.where(allowed, 0.0, -1e9)
        return self.proj(self.embed(ids)) + mask * 2.0


def test_ops_on_constants_alone_are_folded_in_their_unit_only():
    gm = annotate(capture(ConstantMask(), (torch.randint(0, 16, (1, 4)),)))
    embed, proj = group_units(gm)
    # ge, ge, and, where: computed from shapes in the embedding's unit, folded when it loads
    assert {m.kind: m.count for m in embed.op_mix} == {"embedding": 1}
    assert embed.op_count == 1 and embed.flops == 0
    # the doubling reads the mask from the unit before: an input of this unit, so it runs
    assert {m.kind: m.count for m in proj.op_mix} == {"matmul": 1, "bias": 1, "elementwise": 2}
    assert any(t.shape == (4, 4) for t in embed.cut_tensors)


class AttentionOnly(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_flops():
    q = torch.randn(1, 2, 5, 4)
    k = torch.randn(1, 2, 7, 4)
    gm = annotate(capture(AttentionOnly(), (q, k, k.clone())))
    (attention,) = costs_by_kind(gm)["attention"]
    scores = 1 * 2 * 5 * 7
    assert attention.flops == 4 * scores * 4 + 5 * scores


class MaskedAttention(nn.Module):
    """A projection, then attention under a boolean mask (HF's) or a causal one (is_causal)."""

    def __init__(self, width: int, masked: bool):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.masked = masked

    def forward(self, x, mask):
        q = self.proj(x)
        if self.masked:
            return F.scaled_dot_product_attention(q, x, x, attn_mask=mask)
        return F.scaled_dot_product_attention(q, x, x, is_causal=True)


class TwoAttentions(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([MaskedAttention(width, True), MaskedAttention(width, False)])

    def forward(self, x, mask):
        return self.blocks[1](self.blocks[0](x, mask), mask)


def test_boolean_attention_masks_add_the_kernels_onnx_runtime_runs():
    x = torch.randn(2, 3, 6, 8)  # batch, heads, length, head dim
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    gm = annotate(capture(TwoAttentions().eval(), (x, mask)))
    units = group_units(gm)
    added = kernels_of(units, "elementwise")
    assert added == [3, 0]  # a Where over the mask, IsNaN and Where over the scores
    scores, mask_elements = 2 * 3 * 6 * 6, 2 * 1 * 6 * 6
    (mask_ops,) = [m for m in units[0].op_mix if m.kind == "elementwise"]
    assert mask_ops.bytes_moved == 5 * mask_elements + 14 * scores and mask_ops.flops == 0
    ort_ops = _onnx_runtime_ops(gm, units, (x, mask))
    assert [ops["Where"] + ops["IsNaN"] for ops in ort_ops] == added


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.ln(x))


class Tiny(nn.Module):
    """Embedding, three residual blocks, a head tied to the embedding, and a second output."""

    def __init__(self, d=16, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d) for _ in range(3)])
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for block in self.blocks:
            x = block(x)
        return {"logits": self.head(x), "pooled": x.mean(dim=1)}


def tiny_graph(granularity="block"):
    gm = annotate(capture(Tiny(), {"input_ids": torch.randint(0, 50, (2, 5))}))
    return gm, group_units(gm, granularity)


def test_signature_names_inputs_and_outputs():
    gm, _ = tiny_graph()
    signature = gm.meta[SIGNATURE_KEY]
    assert [t.name for t in signature.inputs] == ["input_ids"]
    assert [t.name for t in signature.outputs] == ["logits", "pooled"]
    assert signature.outputs[0].shape == (2, 5, 50)
    assert not signature.on_meta


def test_block_units_and_cuts():
    gm, units = tiny_graph()
    assert [u.name for u in units] == ["emb", "blocks.0", "blocks.1", "blocks.2", "head"]
    activation = 2 * 5 * 16 * 4
    # Between blocks only the residual stream crosses.
    for unit in units[:-2]:
        assert unit.cut_bytes == activation and len(unit.cut_tensors) == 1
    # The head unit reads the tied embedding weight too: counted in both units.
    assert units[0].param_bytes == 50 * 16 * 4
    assert units[-1].param_bytes == 50 * 16 * 4 + 50 * 4
    block_params = 2 * 16 * 4 + (16 * 16 + 16) * 4
    assert units[1].param_bytes == block_params
    assert units[1].flops == 5 * 2 * 5 * 16 + 2 * (2 * 5) * 16 * 16 + 2 * 5 * 16
    assert units[-1].cut_tensors == ()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert UNIT_KEY in node.meta


def test_cut_inside_residual_passes_skip_tensor():
    _, units = tiny_graph("layer")
    names = [u.name for u in units]
    assert names[:3] == ["emb", "blocks.0.ln", "blocks.0.fc"]
    ln = units[1]
    # The cut after the LayerNorm passes the normalized tensor and the residual input.
    assert len(ln.cut_tensors) == 2
    assert ln.cut_bytes == 2 * (2 * 5 * 16 * 4)


def test_peak_activation_counts_live_tensors():
    _, units = tiny_graph()
    activation = 2 * 5 * 16 * 4
    # Inside a block: the residual input, the LayerNorm output and the Linear output are live.
    assert units[1].peak_activation_bytes >= 2 * activation


def test_unit_key_rules():
    assert unit_key("model.layers.3.self_attn.q_proj", "block") == "model.layers.3"
    assert unit_key("model.layers.3.self_attn.q_proj", "layer") == "model.layers.3.self_attn"
    assert unit_key("model.embed_tokens", "block") == "model.embed_tokens"
    assert unit_key("", "block") == ""


def test_meta_model_is_captured_without_weights():
    with torch.device("meta"):
        model = Tiny(d=4096, vocab=32000)
        ids = torch.zeros(1, 8, dtype=torch.long)
    gm = annotate(capture(model, {"input_ids": ids}))
    units = group_units(gm)
    assert gm.meta[SIGNATURE_KEY].on_meta
    assert units[0].param_bytes == 32000 * 4096 * 4


def test_capture_errors_name_the_fix():
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(CaptureError, match="must be a tensor"):
        capture(LinearOnly(), (torch.randn(2, 8), 3))
    with pytest.raises(CaptureError, match="granularity"):
        group_units(tiny_graph()[0], "bogus")


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_gives_one_clear_error():
    with pytest.raises(CaptureError, match="torch.export failed for DataDependent"):
        capture(DataDependent(), (torch.randn(3),))
