"""Layer space: sampled single-layer configurations to profile next to a model zoo.

A latency predictor trained on a few whole models sees few shapes per op kind. The layer
space fills the gaps: for each family (linear, matmul, conv, attention, norm,
elementwise, and two whole block types: a LLaMA-style decoder block (RMSNorm, rotary
attention, SwiGLU MLP, written here, not taken from transformers) and a depthwise-
separable conv block) it samples shapes log-uniformly from seeded ranges and builds one
`LayerBank` model per family whose `layers.i` are the sampled layers, each applied to
its own input. Two families sample controlled pairs instead (`conv_epilogue`: one conv,
with an activation its kernel applies for free and with one applied after it;
`aligned_separable_block`: one separable block whose output lies in channel planes 4 KiB
apart, as CNNs at 32, 64 or 128 px have them, and the same block 4 px off), so that the
pair's difference prices what single samples confound with their shapes. One family
is sampled densely where edge models live (`small_separable_block`: separable blocks of
30-400 us, twice `samples`), as nn-Meter samples densely where its predictors err: the
whole range of separable blocks puts few there, and there two threads' speedup changes
fastest with the block's size.
`group_units` makes every `layers.i` its own unit (each layer reads a weight, so none is
merged away as a light run), and `profile_units` times them like the units of any model.

    for name, model, inputs in layer_space(samples=12, seed=0):
        records += profile_units(model, inputs, name=name)

Shapes are capped by a FLOP budget (`max_mflops`) so that one layer stays in the
0.01-20 ms range on a small CPU.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edgeplan.planner.profile import LAYER_SPACE_PREFIX

FAMILIES = ("linear", "matmul", "conv", "conv_epilogue", "attention", "norm", "elementwise",
            "llama_block", "separable_block", "small_separable_block", "aligned_separable_block")
# Families sampled at a multiple of `samples` (module docstring).
DENSITY = {"small_separable_block": 2, "aligned_separable_block": 2}


class LayerBank(nn.Module):
    """Independent layers: forward(x0, x1, ...) -> (layers[0](x0), layers[1](x1), ...)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs):
        return tuple(layer(*x) if isinstance(x, tuple) else layer(x)
                     for layer, x in zip(self.layers, inputs))


class ScaledMatmul(nn.Module):
    """Batched activation x activation matmul: (a * scale) @ b."""

    def __init__(self, k: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(k) + 0.5)

    def forward(self, a, b):
        return torch.matmul(a * self.scale, b)


class ScaledAttention(nn.Module):
    """Scaled dot-product attention on (q * scale, k, v), causal or not."""

    def __init__(self, head_dim: int, causal: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(head_dim) + 0.5)
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q * self.scale, k, v, is_causal=self.causal)


class ScaledSoftmax(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return torch.softmax(x * self.scale, dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, written out (ONNX opset 17 has no RMSNorm)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Elementwise(nn.Module):
    """One elementwise op after a per-channel affine (the weight keeps it its own unit)."""

    OPS: dict[str, Callable] = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu,
        "relu": F.relu,
        "sigmoid": torch.sigmoid,
        "square": lambda x: x * x,
    }

    def __init__(self, width: int, op: str):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)
        self.bias = nn.Parameter(torch.rand(width))
        self.op = op

    def forward(self, x):
        return self.OPS[self.op](x * self.weight + self.bias)


class ChannelAffine(nn.Module):
    """x * weight + bias over channels of an NCHW tensor, then ReLU (conv-net epilogue)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.rand(channels, 1, 1))

    def forward(self, x):
        return F.relu(x * self.weight + self.bias)


class LlamaLikeBlock(nn.Module):
    """Pre-norm decoder block: RMSNorm, causal attention with rotary positions (grouped
    key/value heads), RMSNorm, SwiGLU MLP; residuals around both."""

    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, seq: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(width, width, bias=False)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        inverse = 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(seq).float(), inverse)
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, dim=-1), persistent=False)

    def _rotate(self, x):
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[: x.shape[-2]] + rotated * self.sin[: x.shape[-2]]

    def forward(self, x):
        batch, seq, width = x.shape
        h = self.norm1(x)
        q = self.q(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(batch, seq, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        q, k = self._rotate(q), self._rotate(k)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(batch, seq, width))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class SeparableConvBlock(nn.Module):
    """Depthwise k x k conv + BatchNorm + activation, pointwise 1x1 conv + BatchNorm +
    activation (MobileNet style)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, activation: nn.Module):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = activation

    def forward(self, x):
        return self.act(self.bn2(self.pointwise(self.act(self.bn1(self.depthwise(x))))))


def _log_uniform(rng: random.Random, low: int, high: int, multiple: int = 1) -> int:
    value = math.exp(rng.uniform(math.log(low), math.log(high)))
    return max(low, int(round(value / multiple)) * multiple)


def _fits(mflops: float, max_mflops: float) -> bool:
    return mflops <= max_mflops


def _linear(rng, max_mflops):
    while True:
        tokens = _log_uniform(rng, 1, 512)
        d_in, d_out = _log_uniform(rng, 32, 2048, 8), _log_uniform(rng, 32, 2048, 8)
        if _fits(2 * tokens * d_in * d_out / 1e6, max_mflops):
            batch = rng.choice([b for b in (1, 2, 4) if tokens % b == 0])
            layer = nn.Linear(d_in, d_out, bias=rng.random() < 0.8)
            return f"linear {tokens}x{d_in}->{d_out}", layer, torch.randn(batch, tokens // batch, d_in)


def _matmul(rng, max_mflops):
    while True:
        batch_heads = _log_uniform(rng, 1, 32)
        m, k, n = (_log_uniform(rng, 8, 512) for _ in range(3))
        if _fits(2 * batch_heads * m * k * n / 1e6, max_mflops):
            a, b = torch.randn(batch_heads, m, k), torch.randn(batch_heads, k, n)
            return f"matmul {batch_heads}x{m}x{k}x{n}", ScaledMatmul(k), (a, b)


def _conv(rng, max_mflops):
    while True:
        # Channel counts of real CNNs are multiples of 8; ONNX Runtime's depthwise and
        # dense convs run 1.5-4x slower per FLOP on others (3x3 depthwise at 14 px: 64
        # channels 18 us, 61 channels 59 us), which the features cannot tell apart.
        c_in, c_out = _log_uniform(rng, 8, 512, 8), _log_uniform(rng, 8, 512, 8)
        size = _log_uniform(rng, 4, 64)
        kernel = rng.choice([1, 3, 3, 5, 7])
        stride = rng.choice([1, 1, 2])
        depthwise = rng.random() < 0.25
        if not depthwise and rng.random() < 0.2:
            # An image stem: 3 input channels at a CNN's input resolution, strided. ORT
            # runs it several times slower per FLOP than the convs after it (held-out
            # stems: 38-42 GFLOP/s, a 1x1 conv of 8.4 MFLOP: 80), and no other sample
            # reads 3 channels.
            c_in, c_out = 3, _log_uniform(rng, 8, 64, 8)
            size, kernel, stride = _log_uniform(rng, 32, 160), rng.choice([3, 3, 5, 7]), 2
        if depthwise:
            c_out = c_in
        groups = c_in if depthwise else 1
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        mflops = 2 * c_out * out_size ** 2 * (c_in // groups) * kernel ** 2 / 1e6
        if out_size >= 1 and _fits(mflops, max_mflops):
            layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups,
                                bias=rng.random() < 0.5)]
            if rng.random() < 0.4:  # conv + folded-BN-like affine + ReLU, as in CNN blocks
                layers.append(ChannelAffine(c_out))
            name = f"conv {c_in}->{c_out} k{kernel} s{stride} {size}px" + (" dw" if depthwise else "")
            return name, nn.Sequential(*layers), torch.randn(1, c_in, size, size)


# A conv's batch norm and activation in the conv_epilogue pairs: ONNX Runtime folds both
# into the conv; its kernel applies a ReLU as it computes, the others in a pass over the
# output (kind "epilogue").
EPILOGUE_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """An inference batch norm with running variances drawn in 0.5-1.5 (not all 1)."""
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 1.5)
    return norm


def _conv_epilogue_pair(rng, max_mflops):
    """A CNN conv with a batch norm (pointwise, depthwise 3x3 or an image stem), twice:
    with a ReLU, which ONNX Runtime's conv kernel applies as it computes, and with a ReLU6,
    sigmoid or tanh, which it applies in a pass over the output (kind "epilogue"). The
    pair differs by the epilogue alone: among single convs its cost (a ReLU6 took 10-33 %
    of a separable block here) is confounded with what their shapes cost."""
    while True:
        shape = rng.choice(["pointwise", "pointwise", "depthwise", "stem"])
        if shape == "stem":
            c_in, c_out, kernel, stride = 3, _log_uniform(rng, 8, 64, 8), 3, 2
            size = _log_uniform(rng, 32, 160)
        else:
            c_in, size = _log_uniform(rng, 8, 256, 8), _log_uniform(rng, 8, 64)
            c_out = c_in if shape == "depthwise" else _log_uniform(rng, 8, 256, 8)
            kernel, stride = (3, rng.choice([1, 2])) if shape == "depthwise" else (1, 1)
        groups = c_in if shape == "depthwise" else 1
        out_size = (size - 1) // stride + 1
        if _fits(2 * c_out * out_size ** 2 * (c_in // groups) * kernel ** 2 / 1e6, max_mflops):
            break
    paid = rng.choice(["relu6", "relu6", "sigmoid", "tanh"])
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    x = torch.randn(1, c_in, size, size)
    name = f"conv {c_in}->{c_out} k{kernel} s{stride} {size}px" + (" dw" if shape == "depthwise" else "")
    return [(f"{name} +bn +{activation}",
             nn.Sequential(copy.deepcopy(conv), _batch_norm(c_out), EPILOGUE_ACTIVATIONS[activation]()), x)
            for activation in ("relu", paid)]


def _attention(rng, max_mflops):
    while True:
        batch, heads = rng.choice([1, 2, 4]), rng.choice([1, 2, 4, 8, 12])
        length = _log_uniform(rng, 8, 512)
        head_dim = rng.choice([16, 32, 64, 128])
        if _fits(4 * batch * heads * length * length * head_dim / 1e6, max_mflops):
            q, k, v = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
            causal = rng.random() < 0.6
            return (f"attention {batch}x{heads}x{length}x{head_dim}" + (" causal" if causal else ""),
                    ScaledAttention(head_dim, causal), (q, k, v))


def _norm(rng, max_mflops):
    kind = rng.choice(["layer_norm", "rms_norm", "batch_norm", "softmax"])
    if kind == "batch_norm":
        channels, size = _log_uniform(rng, 8, 256), _log_uniform(rng, 4, 64)
        return f"batch_norm {channels}x{size}px", _batch_norm(channels), torch.randn(1, channels, size, size)
    tokens, width = _log_uniform(rng, 1, 1024), _log_uniform(rng, 16, 4096, 8)
    layer = {"layer_norm": nn.LayerNorm, "rms_norm": RMSNorm, "softmax": ScaledSoftmax}[kind](width)
    return f"{kind} {tokens}x{width}", layer, torch.randn(1, tokens, width)


def _elementwise(rng, max_mflops):
    op = rng.choice(list(Elementwise.OPS))
    tokens, width = _log_uniform(rng, 1, 1024), _log_uniform(rng, 16, 4096, 8)
    return f"{op} {tokens}x{width}", Elementwise(width, op), torch.randn(1, tokens, width)


def _llama_block(rng, max_mflops):
    while True:
        heads = rng.choice([2, 4, 8])
        width = heads * rng.choice([16, 32, 64])
        kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
        hidden = _log_uniform(rng, 2 * width, 4 * width, 8)
        batch, seq = rng.choice([1, 1, 2]), _log_uniform(rng, 8, 256)
        tokens = batch * seq
        mflops = 2 * tokens * width * (2 * width + 2 * kv_heads * width // heads + 3 * hidden) / 1e6
        if _fits(mflops, max_mflops):
            block = LlamaLikeBlock(width, heads, kv_heads, hidden, seq)
            return (f"llama_block {batch}x{seq}x{width} h{heads}/{kv_heads} mlp{hidden}", block,
                    torch.randn(batch, seq, width))


def _separable_block(rng, max_mflops):
    while True:
        c_in, c_out = _log_uniform(rng, 8, 512, 8), _log_uniform(rng, 8, 512, 8)
        size, kernel, stride = _log_uniform(rng, 4, 112), rng.choice([3, 3, 5]), rng.choice([1, 2])
        if _fits(_separable_mflops(c_in, c_out, size, kernel, stride), max_mflops):
            return _sampled_separable_block(rng, c_in, c_out, size, kernel, stride)


# What an edge CNN's separable blocks cost at 32-128 px (the held-out CNN's: 3.4-9.0 MFLOP),
# where the separable_block family, log-uniform up to max_mflops, draws few.
SMALL_BLOCK_MFLOPS = (0.5, 30.0)


def _small_separable_block(rng, max_mflops):
    """A separable block as edge CNNs have them: 16-256 input channels, widening by up to
    3x (or narrowing by 1.4x) as MobileNets do, at 7-64 px, within SMALL_BLOCK_MFLOPS."""
    while True:
        c_in, c_out = _edge_block_channels(rng)
        size, kernel, stride = _log_uniform(rng, 7, 64), rng.choice([3, 3, 5]), rng.choice([1, 2])
        if _small_block_fits(c_in, c_out, size, kernel, stride, max_mflops):
            return _sampled_separable_block(rng, c_in, c_out, size, kernel, stride)


def _edge_block_channels(rng) -> tuple[int, int]:
    """(input, output) channels of an edge CNN's separable block: 16-256 in, widening by
    up to 3x (or narrowing by 1.4x) as MobileNets do, multiples of 8."""
    c_in = _log_uniform(rng, 16, 256, 8)
    return c_in, max(8, int(round(c_in * 2 ** rng.uniform(-0.5, 1.5) / 8)) * 8)


def _small_block_fits(c_in: int, c_out: int, size: int, kernel: int, stride: int, max_mflops: float) -> bool:
    low, high = SMALL_BLOCK_MFLOPS
    return low <= _separable_mflops(c_in, c_out, size, kernel, stride) <= min(high, max_mflops)


# Output sizes whose float32 channel planes lie a multiple of 4 KiB apart
# (records.ALIASING_BYTES), as in CNNs at 64, 128 or 256 px.
ALIGNED_OUTPUT_SIZES = (32, 64)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish)


def _aligned_separable_block(rng, max_mflops):
    """A pair of small separable blocks alike but for their output size: one at
    ALIGNED_OUTPUT_SIZES, whose output ONNX Runtime reorders out of its blocked layout into
    channel planes 4 KiB apart (kind "aliased_layout", twice the time per byte here), and
    one 4 px off. The other families draw sizes log-uniform and seldom hit these."""
    while True:
        c_in, c_out = _edge_block_channels(rng)
        aligned, kernel, stride = rng.choice(ALIGNED_OUTPUT_SIZES), rng.choice([3, 3, 5]), rng.choice([1, 2])
        off = aligned + rng.choice([-4, 4])
        if all(_small_block_fits(c_in, c_out, out * stride, kernel, stride, max_mflops) for out in (aligned, off)):
            activation = rng.choice(ACTIVATIONS)
            return [_sampled_separable_block(rng, c_in, c_out, out * stride, kernel, stride, activation)
                    for out in (aligned, off)]


def _separable_mflops(c_in: int, c_out: int, size: int, kernel: int, stride: int) -> float:
    out_size = (size - 1) // stride + 1
    return 2 * c_in * out_size ** 2 * (kernel ** 2 + c_out) / 1e6


def _sampled_separable_block(rng, c_in: int, c_out: int, size: int, kernel: int, stride: int,
                             activation: type[nn.Module] | None = None):
    """(description, block, input) of a separable block with BatchNorm statistics that are
    not the identity and `activation`, or one drawn."""
    activation = (activation or rng.choice(ACTIVATIONS))()
    block = SeparableConvBlock(c_in, c_out, kernel, stride, activation)
    with torch.no_grad():
        for norm in (block.bn1, block.bn2):
            norm.running_var.uniform_(0.5, 1.5)
    return (f"separable_block {c_in}->{c_out} k{kernel} s{stride} {size}px "
            f"{type(activation).__name__}", block, torch.randn(1, c_in, size, size))


SAMPLERS = {"linear": _linear, "matmul": _matmul, "conv": _conv, "conv_epilogue": _conv_epilogue_pair,
            "attention": _attention, "norm": _norm, "elementwise": _elementwise,
            "llama_block": _llama_block, "separable_block": _separable_block,
            "small_separable_block": _small_separable_block,
            "aligned_separable_block": _aligned_separable_block}


def layer_space(samples: int = 12, seed: int = 0, families: tuple[str, ...] = FAMILIES,
                max_mflops: float = 400.0) -> Iterator[tuple[str, LayerBank, tuple, tuple[str, ...]]]:
    """(model name, LayerBank, example inputs, layer descriptions) per family, seeded.

    Unit `layers.i` of the bank is the layer described by descriptions[i]. A family of
    DENSITY draws that many times `samples`.
    """
    unknown = [f for f in families if f not in SAMPLERS]
    if unknown:
        raise ValueError(f"layer_space: unknown famil(ies) {unknown}; known: {', '.join(FAMILIES)}")
    for family in families:
        rng = random.Random(f"{seed}:{family}")
        torch.manual_seed(rng.randrange(2**31))
        layers, inputs, descriptions = [], [], []
        while len(layers) < samples * DENSITY.get(family, 1):
            drawn = SAMPLERS[family](rng, max_mflops)  # one sample, or a list measured as a set
            for description, layer, x in drawn if isinstance(drawn, list) else [drawn]:
                layers.append(layer)
                inputs.append(x)
                descriptions.append(description)
        yield f"{LAYER_SPACE_PREFIX}{family}", LayerBank(layers).eval(), tuple(inputs), tuple(descriptions)


__all__ = ["FAMILIES", "LayerBank", "layer_space"]
