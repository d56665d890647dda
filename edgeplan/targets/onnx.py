"""ONNX target: one stage GraphModule -> one checked `.onnx` file and its artifact record.

Exports with the TorchScript-based exporter (`dynamo=False`: 0.03-0.3 s a stage and one
self-contained file, where the dynamo exporter takes seconds and writes external data).
Input and output names are the stage's tensor names, so the runtime can route tensors by
name. The exporter leaves modules in train mode afterwards, so the stage goes back to
eval mode at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeplan.errors import ArtifactError
from edgeplan.passes.split import StageGraph
from edgeplan.runtime.manifest import Artifact, sha256_of



@dataclass(frozen=True)
class OnnxTarget:
    name: str = "onnx"
    opset: int = 17

    def emit(self, stage_graph: StageGraph, stage_index: int, example_inputs: tuple,
             out_dir: Path) -> Artifact:
        """Write `stage_<i>.onnx` for a stage, check it with onnx.checker, return its record."""
        import onnx

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
