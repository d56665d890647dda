"""Stage weights held once per process: one numpy buffer per distinct weight, shared by sessions.

An ONNX stage stores its initializers in `stage_<i>.weights` (targets/onnx.py), each listed in
the manifest with dtype, shape, offset, sha256 and the number of nodes reading it. ONNX
Runtime can load such a stage in two ways, measured on a 9.5 MB stage (bench/merge.py, README):

- Prepacking (ORT's default): ORT reads the weights file itself and repacks each matrix
  operand into the layout its GEMM kernels want, then drops the original: every weight is
  held once per session, so equal weights in two sessions twice, and a weight read by
  several Gemm nodes (a merged layer whose models take different inputs) can be packed
  once per node (probed: +8 MB per extra reader of an 8 MB weight in a hand-built graph,
  though not in every exported one). The Python API has no shared prepacked-weights
  container to fix this.
- Shared (prepacking off): the store reads each distinct weight (keyed by sha256, dtype
  and shape) into one numpy array and hands the same OrtValue to every session that names
  it (`SessionOptions.add_initializer`: ORT uses the buffer without copying), so a weight
  is held once per process however many nodes and sessions read it. GEMM then packs on
  the fly at every run: 1.3-2x slower at batch 8 (measured on digits stages), and results
  differ from the prepacked kernels in the last bits (about 2e-8).

`prepacking` picks: "on" (always prepack), "off" (always share), or "auto" (the default):
share for a stage that holds a weight read by more than one node, or by another stage
announced to the same store; prepack otherwise, so stages without shared weights run as fast
as before with bitwise-identical outputs.

Torch- and onnx-free: everything comes from the manifest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgeplan.errors import ArtifactError
from edgeplan.runtime.manifest import (
    StageEntry,
    WeightEntry,
    read_manifest,
    weights_path,
)

PREPACKING = ("auto", "on", "off")


def _key(tensor: WeightEntry) -> tuple:
    return tensor.sha256, tensor.dtype, tuple(tensor.shape)


class WeightStore:
    """Weights of the stages loaded through it, each distinct one held once (see module doc).

    Use one store for every session of a process that should share weights: a Pipeline
    makes one for its stages; pass one to several `load` calls to share across pipelines.
    "auto" decides from the stages announced so far (`expect`; a Pipeline announces its
    own): to share across pipelines, announce every directory before loading the first.
    A directory counts once, however often it is loaded (use "off" to share between
    copies of one pipeline)."""

    def __init__(self, prepacking: str = "auto"):
        if prepacking not in PREPACKING:
            raise ArtifactError(f"weights: prepacking {prepacking!r} is unknown; use one of {PREPACKING}")
        self.prepacking = prepacking
        self._holders: Counter = Counter()  # weight key -> announced stages holding it
        self._announced: set[tuple[str, int]] = set()  # (directory, stage index)
        self._arrays: dict[tuple, np.ndarray] = {}  # weight key -> its one buffer
        self._values: dict[tuple, object] = {}  # weight key -> OrtValue over that buffer

    def expect(self, directory: str | Path, stages: Iterable[StageEntry] | None = None) -> None:
        """Announce the stages of the compiled `directory` that will load through this store
        (default: all in its manifest)."""
        if stages is None:
            stages = read_manifest(directory, verify=False).stages
        for stage in stages:
            key = (str(Path(directory).resolve()), stage.index)
            if key in self._announced or stage.artifact.weights is None:
                continue
            self._announced.add(key)
            self._holders.update({_key(t) for t in stage.artifact.weights.tensors})

    def prepacks(self, stage: StageEntry) -> bool:
        """Whether the stage's session should let ONNX Runtime prepack its weights."""
        weights = stage.artifact.weights
        if self.prepacking != "auto" or weights is None:
            return self.prepacking != "off" or weights is None
        shared = any(t.readers > 1 or self._holders[_key(t)] > 1 for t in weights.tensors)
        return not shared

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct weights this store holds."""
        return sum(array.nbytes for array in self._arrays.values())

    def initializers(self, directory: Path, stage: StageEntry) -> dict[str, object]:
        """Name -> OrtValue for every weight of the stage (read from its weights file the first
        time a weight is seen); weights whose dtype numpy lacks are left to ONNX Runtime."""
        import onnxruntime as ort

        path = weights_path(Path(directory), stage)
        initializers = {}
        for tensor in stage.artifact.weights.tensors:
            key = _key(tensor)
            if key not in self._values:
                try:
                    dtype = np.dtype(tensor.dtype)
                except TypeError:
                    continue
                array = np.fromfile(path, dtype=dtype, count=tensor.nbytes // dtype.itemsize,
                                    offset=tensor.offset)
                if array.nbytes != tensor.nbytes:
                    raise ArtifactError(
                        f"stage {stage.index} ({stage.device}): weights file {path} ends "
                        f"{tensor.nbytes - array.nbytes} bytes short inside {tensor.name!r}; "
                        f"copy it again or recompile")
                self._arrays[key] = array.reshape(tensor.shape)
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(self._arrays[key])
            initializers[tensor.name] = self._values[key]
        return initializers
