"""ONNX target: one stage GraphModule -> one checked `.onnx` file and its artifact record.

Exports with the TorchScript-based exporter (`dynamo=False`: 0.03-0.3 s a stage and one
self-contained file, where the dynamo exporter takes seconds and writes external data).
Input and output names are the stage's tensor names, so the runtime can route tensors by
name. The exporter leaves modules in train mode afterwards, so the stage goes back to
eval mode at once. HF mask code needs two operators the exporter gets wrong: `aten::diff`
has no ONNX symbolic (`diff_symbolic`: Slice and Sub, or Xor for bool), and `aten::cumsum`
of a bool tensor becomes a CumSum on bool, which ONNX Runtime rejects (`cumsum_symbolic`
casts to int64 first, as torch does).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.onnx import symbolic_helper

from edgeplan.errors import ArtifactError
from edgeplan.passes.split import StageGraph
from edgeplan.runtime.manifest import Artifact, sha256_of

INT64_MAX = 2**63 - 1


@symbolic_helper.parse_args("v", "i", "i", "v", "v")
def diff_symbolic(g, x, n, dim, prepend, append):
    """ONNX for torch.diff: x[1:] - x[:-1] along dim, n times (Xor for bool)."""
    from torch.onnx._internal.torchscript_exporter import _type_utils

    if not symbolic_helper._is_none(prepend):
        x = g.op("Concat", prepend, x, axis_i=dim)
    if not symbolic_helper._is_none(append):
        x = g.op("Concat", x, append, axis_i=dim)

    def constant(value):
        return g.op("Constant", value_t=torch.tensor([value], dtype=torch.int64))

    is_bool = _type_utils.JitScalarType.from_value(x) == _type_utils.JitScalarType.BOOL
    for _ in range(n):
        later = g.op("Slice", x, constant(1), constant(INT64_MAX), constant(dim))
        earlier = g.op("Slice", x, constant(0), constant(-1), constant(dim))
        x = g.op("Xor" if is_bool else "Sub", later, earlier)
    return x


@symbolic_helper.parse_args("v", "i", "none")
def cumsum_symbolic(g, x, dim, dtype=None):
    """ONNX for torch.cumsum; bool input is summed as int64, like torch does."""
    from torch.onnx._internal.torchscript_exporter import _type_utils

    if dtype is not None and dtype.node().kind() != "prim::Constant":
        target = _type_utils.JitScalarType(symbolic_helper._get_const(dtype, "i", "dtype"))
        x = g.op("Cast", x, to_i=target.onnx_type())
    elif _type_utils.JitScalarType.from_value(x) == _type_utils.JitScalarType.BOOL:
        x = g.op("Cast", x, to_i=_type_utils.JitScalarType.INT64.onnx_type())
    return g.op("CumSum", x, g.op("Constant", value_t=torch.tensor(dim, dtype=torch.int64)))


SYMBOLICS = {"aten::diff": diff_symbolic, "aten::cumsum": cumsum_symbolic}


@dataclass(frozen=True)
class OnnxTarget:
    name: str = "onnx"
    opset: int = 17

    def emit(self, stage_graph: StageGraph, stage_index: int, example_inputs: tuple,
             out_dir: Path) -> Artifact:
        """Write `stage_<i>.onnx` for a stage, check it with onnx.checker, return its record."""
        import onnx

        # Idempotent: registering the same symbolic again replaces it.
        for operator, symbolic in SYMBOLICS.items():
            torch.onnx.register_custom_op_symbolic(operator, symbolic, self.opset)
        filename = f"stage_{stage_index}.onnx"
        path = Path(out_dir) / filename
        module = stage_graph.module
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation notices
                torch.onnx.export(
                    module, tuple(example_inputs), str(path),
                    input_names=list(stage_graph.inputs), output_names=list(stage_graph.outputs),
                    opset_version=self.opset, dynamo=False, do_constant_folding=True,
                )
        except Exception as exc:  # exporter errors come in many types; name the stage once
            raise ArtifactError(
                f"onnx target: exporting stage {stage_index} failed: {exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; try a different cut "
                f"(--granularity) or report the operator") from exc
        finally:
            module.eval()
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            raise ArtifactError(f"onnx target: stage {stage_index} failed onnx.checker: "
                                f"{str(exc).splitlines()[0]}") from exc
        return Artifact(path=filename, sha256=sha256_of(path), nbytes=path.stat().st_size, format="onnx")
