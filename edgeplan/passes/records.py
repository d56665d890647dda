"""Frozen analysis records that passes store in `node.meta["edgeplan.*"]` and on GraphModules.

Torch-free: records hold plain Python values (shapes as tuples, dtypes as numpy names).
"""

from __future__ import annotations

from dataclasses import dataclass

# node.meta / gm.meta keys, one per record type.
TENSOR_KEY = "edgeplan.tensor"
COST_KEY = "edgeplan.cost"
UNIT_KEY = "edgeplan.unit"
ORIGIN_KEY = "edgeplan.origin"
SIGNATURE_KEY = "edgeplan.signature"
# Channel planes this many bytes apart (or a multiple) map to the same cache sets.
ALIASING_BYTES = 4096


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype (numpy spelling, e.g. "float32") of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        from numpy import dtype, prod

        return int(prod(self.shape, dtype="int64")) * dtype(self.dtype).itemsize

    @property
    def aliased_planes(self) -> bool:
        """A 4-D activation whose channel planes lie a multiple of ALIASING_BYTES apart:
        the cache sets of a 4 KiB page (passes/units.py, kind "aliased_layout")."""
        from numpy import dtype

        if len(self.shape) != 4:
            return False
        return self.shape[2] * self.shape[3] * dtype(self.dtype).itemsize % ALIASING_BYTES == 0


@dataclass(frozen=True)
class ModelSignature:
    """Flat inputs and outputs of a captured model.

    `outputs[i].name` is the user-facing output name (e.g. "logits"); `output_nodes[i]` is
    the FX node that produces it.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_nodes: tuple[str, ...]
    on_meta: bool


@dataclass(frozen=True)
class OpCost:
    """Static cost of one FX node.

    kind: "matmul" | "conv" | "stem" | "depthwise" | "attention" | "norm" | "elementwise" |
    "reduce" | "embedding" | "copy" (a view op ONNX runs as a Transpose or Split) | "view" |
    "fused" (folded into the convolution before it and applied by its kernel: no FLOPs or
    bytes) | "epilogue" (folded into the convolution before it, applied in a pass over its
    output) | "input" | "param" | "other".
    `bytes_moved` counts inputs, outputs and weights read once (the memory-bound term of a
    roofline); `param_bytes` is set on weight nodes.
    """

    kind: str
    flops: int
    bytes_moved: int
    output_bytes: int
    param_bytes: int = 0


@dataclass(frozen=True)
class OpMix:
    """What one op kind contributes to a unit: node count, FLOPs and bytes moved (summed
    OpCost of the unit's nodes of that kind, or work ONNX Runtime adds that no node shows:
    kinds "layout" and "bias", passes/units.py). Latency predictors learn per kind from these."""

    kind: str
    count: int
    flops: int
    bytes_moved: int
