"""ONNX target: one stage GraphModule -> one checked `.onnx` file and its artifact record.

Exports with the TorchScript-based exporter (`dynamo=False`: 0.03-0.3 s a stage, where the
dynamo exporter takes seconds), then moves the weights into `stage_<i>.weights` (ONNX
external data, listed tensor by tensor in the manifest) so the runtime can hold each weight
once (runtime/weights.py).
Input and output names are the stage's tensor names, so the runtime can route tensors by
name. The exporter leaves modules in train mode afterwards, so the stage goes back to
eval mode at once. HF mask code needs two operators the exporter gets wrong: `aten::diff`
has no ONNX symbolic (`diff_symbolic`: Slice and Sub, or Xor for bool), and `aten::cumsum`
of a bool tensor becomes a CumSum on bool, which ONNX Runtime rejects (`cumsum_symbolic`
casts to int64 first, as torch does).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.onnx import symbolic_helper

from edgeplan.errors import ArtifactError
from edgeplan.passes.split import StageGraph
from edgeplan.runtime.manifest import Artifact, WeightEntry, WeightsFile, sha256_of

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
        weights = store_weights_apart(path, f"stage_{stage_index}.weights")
        return Artifact(path=filename, sha256=sha256_of(path), nbytes=path.stat().st_size, format="onnx",
                        weights=weights)


def _readers(graph) -> Counter:
    """Nodes reading each initializer, seeing through Identity copies (the exporter emits
    one for a weight used twice, and ONNX Runtime removes it)."""
    source = {i.name: i.name for i in graph.initializer}
    readers = Counter()
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
            continue
        readers.update(source[name] for name in node.input if name in source)
    return readers


WEIGHT_ALIGNMENT = 64  # bytes: every tensor in a weights file starts aligned for SIMD loads
EXTERNAL_MIN_BYTES = 1024  # smaller initializers (shapes, scalars) stay inside the .onnx


def store_weights_apart(path: Path, weights_name: str) -> WeightsFile | None:
    """Move the initializers of the ONNX file `path` (those of EXTERNAL_MIN_BYTES or more)
    into ONNX external data `weights_name` next to it, and record each tensor's place,
    sha256 and number of reading nodes, so the runtime can load every weight once without
    onnx (runtime/weights.py). The file is written aside and renamed into place, so a
    process still mapping an older one keeps its bytes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    readers = _readers(model.graph)
    weights_file = path.with_name(weights_name)
    partial = path.with_name(weights_name + ".part")
    entries, offset = [], 0
    with open(partial, "wb") as handle:
        for tensor in model.graph.initializer:
            if tensor.data_type == onnx.TensorProto.STRING:
                continue
            array = numpy_helper.to_array(tensor)
            if array.nbytes < EXTERNAL_MIN_BYTES:
                continue
            data = np.ascontiguousarray(array).tobytes()  # little-endian, as ONNX raw_data
            padding = -offset % WEIGHT_ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            handle.write(data)
            entries.append(WeightEntry(tensor.name, array.dtype.name, tuple(int(d) for d in array.shape),
                                       offset, len(data), hashlib.sha256(data).hexdigest(),
                                       readers[tensor.name]))
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data", "external_data"):
                tensor.ClearField(field)
            for key, value in (("location", weights_name), ("offset", offset), ("length", len(data))):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(data)
    if not entries:  # nothing worth storing apart: the .onnx stays self-contained
        partial.unlink()
        weights_file.unlink(missing_ok=True)
        return None
    os.replace(partial, weights_file)
    partial = path.with_name(path.name + ".part")
    onnx.save_model(model, str(partial))
    os.replace(partial, path)
    return WeightsFile(path=weights_name, sha256=sha256_of(weights_file), nbytes=offset,
                       tensors=tuple(entries))
