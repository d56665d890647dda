"""One stage on one backend: an ONNX Runtime session behind a small dispatch-friendly interface.

`StageSession.run(feeds) -> outputs` takes and returns dicts of numpy arrays keyed by
tensor name; `open_session` picks the session class by the manifest's artifact format.
Execution providers come from the manifest in preference order; those the installed
onnxruntime lacks are skipped (CPU is always last), and `providers` says which ones were
actually used.

`open_session` runs every session once on zeros before handing it out (`warm_up`). A
session's first run allocates its buffers and starts its thread pool: on this host the
first run of a GPT stage took 1.4-2.0 ms and the runs after it 1.0-1.3 ms. Unwarmed, the
first one-microbatch run of a fresh process recorded its two stages 1.6x and 1.25x slower
than that process's third run (median of six processes; warmed: 1.2x and 1.1x), and
`profile --from-run` taught the predictor that slowdown as the stages' own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeplan.errors import ArtifactError, StageError
from edgeplan.runtime.manifest import StageEntry, verify_artifact
from edgeplan.runtime.weights import WeightStore

CPU_PROVIDER = "CPUExecutionProvider"


def open_session(directory: str | Path, stage: StageEntry, threads: int = 0,
                 weights: WeightStore | None = None, warm_up: bool = True):
    """The session for a stage's artifact kind: ONNX Runtime for "onnx", the TVM Relax VM
    for "tvm" (runtime/tvm_session.py; tvm is imported only then), run once on zeros when
    `warm_up` (module docstring). ONNX sessions given the same `weights` store hold each
    distinct weight once (runtime/weights.py)."""
    kind = stage.artifact.format
    if kind == "onnx":
        session = StageSession(directory, stage, threads, weights)
    elif kind == "tvm":
        from edgeplan.runtime.tvm_session import TvmStageSession

        session = TvmStageSession(directory, stage, threads)
    else:
        raise ArtifactError(f"stage {stage.index} ({stage.device}): artifact format {kind!r} is unknown "
                            f"to this runtime (it runs 'onnx' and 'tvm'); upgrade edgeplan or recompile")
    if warm_up:
        try:
            session.run(zero_feeds(stage))
        except StageError:
            pass  # a stage that cannot take zeros still runs its real inputs, or says why then
    return session


def zero_feeds(stage: StageEntry) -> dict[str, np.ndarray]:
    """Zeros of every input's shape and dtype: a valid input of any stage (token ids 0,
    masks off), for runs whose results are not used."""
    return {t.name: np.zeros(t.shape, dtype=t.dtype) for t in stage.inputs}


class StageSession:
    def __init__(self, directory: str | Path, stage: StageEntry, threads: int = 0,
                 weights: WeightStore | None = None):
        import onnxruntime as ort

        self.stage = stage
        if weights is None:
            weights = WeightStore()
            weights.expect(directory, [stage])
        path = verify_artifact(Path(directory), stage)
        available = set(ort.get_available_providers())
        wanted = [p for p in stage.execution_providers if p in available]
        self.providers = tuple(dict.fromkeys([*wanted, CPU_PROVIDER]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.prepacked = weights.prepacks(stage)
        if not self.prepacked:
            options.add_session_config_entry("session.disable_prepacking", "1")
            for name, value in weights.initializers(Path(directory), stage).items():
                options.add_initializer(name, value)
        self._weights = weights  # the session reads the store's buffers: they live as long
        try:
            self._session = ort.InferenceSession(str(path), options, providers=list(self.providers))
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise ArtifactError(
                f"stage {stage.index} ({stage.device}): ONNX Runtime cannot load {path}: "
                f"{str(exc).splitlines()[0]}; recompile the model") from None
        self.output_names = [o.name for o in stage.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stage_feeds = {t.name: feeds[t.name] for t in self.stage.inputs}
        try:
            results = self._session.run(self.output_names, stage_feeds)
        except Exception as exc:
            raise StageError(
                f"stage {self.stage.index} on {self.stage.device}/{self.stage.backend} failed: "
                f"{str(exc).splitlines()[0]}") from None
        return dict(zip(self.output_names, results))
