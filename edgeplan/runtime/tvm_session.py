"""One stage compiled by the TVM target: a Relax VM over the stage's `.so`, behind the same
interface as the ONNX Runtime `StageSession` (`run(feeds) -> outputs`, dicts of numpy arrays
keyed by tensor name).

tvm is imported when a session opens, so a device without TVM still runs ONNX stages. This
file imports no torch; note that apache-tvm-ffi itself imports torch when it is installed
(for DLPack interop), so only a device without torch has a torch-free process.

Threads: TVM's CPU thread pool belongs to the calling thread, so the pool size
(`threads`; 0 keeps TVM's default) is set in each thread the first time it runs the stage.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from edgeplan.errors import ArtifactError, StageError
from edgeplan.runtime.manifest import StageEntry, verify_artifact

INSTALL_HINT = "install TVM with `pip install 'edgeplan[tvm]'` (or apache-tvm 0.27) on this device"


class TvmStageSession:
    def __init__(self, directory: str | Path, stage: StageEntry, threads: int = 0):
        self.stage = stage
        self.threads = threads
        path = verify_artifact(Path(directory), stage)
        try:
            import tvm
            from tvm import relax
        except ImportError:
            raise ArtifactError(
                f"stage {stage.index} ({stage.device}): its artifact is a TVM library and TVM is "
                f"not installed; {INSTALL_HINT}, or recompile with --targets onnx") from None
        target = json.loads(stage.artifact.target or '{"kind": "llvm"}')
        if target.get("kind") != "llvm" or "mtriple" in target:
            raise ArtifactError(
                f"stage {stage.index} ({stage.device}): {path.name} was compiled for TVM target "
                f"{stage.artifact.target}; this runtime runs host llvm libraries only: run it on "
                f"that device, or recompile for this machine (--tvm-target host)")
        self.providers = ("tvm:llvm",)
        try:
            library = tvm.runtime.load_module(str(path))
            self._vm = relax.VirtualMachine(library, tvm.cpu())
        except Exception as exc:  # TVM raises its own error types per failure
            raise ArtifactError(
                f"stage {stage.index} ({stage.device}): TVM cannot load {path}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__}; "
                f"recompile the model with this TVM version") from None
        self._main = self._vm["main"]
        self._tensor = tvm.runtime.tensor
        self._configured = threading.local()
        self.output_names = [o.name for o in stage.outputs]

    def _configure_thread(self) -> None:
        if self.threads and not getattr(self._configured, "done", False):
            import tvm

            tvm.get_global_func("runtime.config_threadpool")(0, self.threads)
            self._configured.done = True

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._configure_thread()
        try:
            args = [self._tensor(np.ascontiguousarray(feeds[t.name])) for t in self.stage.inputs]
            result = self._main(*args)
            results = [result] if hasattr(result, "numpy") else list(result)
            arrays = [r.numpy() for r in results]
        except Exception as exc:
            raise StageError(
                f"stage {self.stage.index} on {self.stage.device}/{self.stage.backend} (TVM) failed: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__}") from None
        if len(arrays) != len(self.output_names):
            raise StageError(
                f"stage {self.stage.index} (TVM): the library returned {len(arrays)} tensors, the "
                f"manifest lists {len(self.output_names)}; recompile")
        return dict(zip(self.output_names, arrays))
