"""The artifact manifest: what the runtime needs to run a compiled pipeline, and nothing more.

`manifest.json` sits next to the stage artifacts. It names the model inputs and outputs
(with shapes and dtypes at the compiled microbatch size), and per stage: device, backend,
ONNX Runtime execution providers, the artifact file with its sha256 (for ONNX also its
weights file: the initializers as ONNX external data, each tensor's offset, shape, dtype,
sha256 and reading nodes, so the runtime holds each weight once without onnx), the stage's
inputs and outputs, and `forward`: the tensors that must reach the next stage (this stage's outputs
plus anything from earlier stages still needed later), the codec it is sent with, and the
link to the next stage (bandwidth, latency) so a local run can emulate it.

Torch-free; the compiler writes it with `write_manifest`, devices read it with `read_manifest`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeplan.errors import ArtifactError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "edgeplan-manifest"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class OutputEntry:
    """A model output: its user-facing name and the tensor (node) that holds it."""

    name: str
    tensor: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class WeightEntry:
    """One initializer stored in a stage's weights file: where its bytes lie, and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sha256: str  # of the tensor's bytes: equal weights in different stages are held once
    readers: int = 1  # nodes of the stage that read it (ONNX Runtime prepacks a copy for each)


@dataclass(frozen=True)
class WeightsFile:
    """An ONNX artifact's initializers as ONNX external data, one file next to the .onnx."""

    path: str  # relative to the manifest's directory
    sha256: str
    nbytes: int
    tensors: tuple[WeightEntry, ...] = ()


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the manifest's directory
    sha256: str
    nbytes: int
    format: str = "onnx"  # "onnx" (ONNX Runtime) or "tvm" (a TVM Relax VM library)
    target: str | None = None  # for "tvm": the TVM target it was compiled for, as JSON
    weights: WeightsFile | None = None  # for "onnx": the initializers, when stored apart


@dataclass(frozen=True)
class LinkEntry:
    bandwidth_bytes_s: float
    latency_s: float


@dataclass(frozen=True)
class StageEntry:
    index: int
    device: str
    backend: str
    execution_providers: tuple[str, ...]
    artifact: Artifact
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[TensorEntry, ...]
    forward: tuple[str, ...]
    verified_max_abs_error: float | None = None
    codec: str = "raw"  # how `forward` is sent to the next stage
    link: LinkEntry | None = None  # the link to the next stage, for emulated runs


@dataclass(frozen=True)
class Manifest:
    model: str
    batch_size: int
    inputs: tuple[TensorEntry, ...]
    outputs: tuple[OutputEntry, ...]
    stages: tuple[StageEntry, ...]
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(manifest: Manifest, directory: str | Path) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(asdict(manifest), indent=1))
    return path


def _tensor(data: dict) -> TensorEntry:
    return TensorEntry(data["name"], tuple(data["shape"]), data["dtype"])


def _artifact(data: dict) -> Artifact:
    weights = data.get("weights")
    if weights is not None:
        tensors = tuple(WeightEntry(**{**t, "shape": tuple(t["shape"])}) for t in weights.get("tensors", ()))
        weights = WeightsFile(**{**weights, "tensors": tensors})
    return Artifact(**{**data, "weights": weights})


def read_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read `manifest.json` in `directory`; with `verify`, check every artifact's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no manifest here; point at the output directory of `edgeplan compile` "
            f"(it holds manifest.json, plan.json and stage_*.onnx)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise ArtifactError(
                f"{path}: format {data.get('format')!r} version {data.get('version')!r}; this "
                f"runtime reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}: recompile")
        manifest = Manifest(
            model=data["model"],
            batch_size=int(data["batch_size"]),
            inputs=tuple(_tensor(t) for t in data["inputs"]),
            outputs=tuple(OutputEntry(o["name"], o["tensor"], tuple(o["shape"]), o["dtype"])
                          for o in data["outputs"]),
            stages=tuple(
                StageEntry(
                    index=s["index"], device=s["device"], backend=s["backend"],
                    execution_providers=tuple(s["execution_providers"]),
                    artifact=_artifact(s["artifact"]),
                    inputs=tuple(_tensor(t) for t in s["inputs"]),
                    outputs=tuple(_tensor(t) for t in s["outputs"]),
                    forward=tuple(s["forward"]),
                    verified_max_abs_error=s.get("verified_max_abs_error"),
                    codec=s.get("codec", "raw"),
                    link=LinkEntry(**s["link"]) if s.get("link") else None,
                )
                for s in data["stages"]
            ),
        )
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); recompile") from None
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: malformed manifest ({exc.__class__.__name__}: {exc}); recompile") from None
    if verify:
        for stage in manifest.stages:
            verify_artifact(directory, stage)
    return manifest


def artifact_path(directory: Path, stage: StageEntry, relative: str | None = None) -> Path:
    """The path of the stage's artifact (or of `relative`, another of its files) in `directory`."""
    relative = stage.artifact.path if relative is None else relative
    path = (directory / relative).resolve()
    if directory.resolve() not in path.parents:
        raise ArtifactError(
            f"stage {stage.index}: artifact path {relative!r} leaves {directory}; "
            f"artifact paths must be relative and inside the output directory")
    return path


def weights_path(directory: Path, stage: StageEntry) -> Path | None:
    """The path of the stage's weights file, or None when its artifact holds its weights."""
    weights = stage.artifact.weights
    return None if weights is None else artifact_path(directory, stage, weights.path)


def verify_artifact(directory: Path, stage: StageEntry) -> Path:
    """The artifact's path, after checking that it and its weights file (if any) exist and
    their sha256 match the manifest."""
    path = artifact_path(Path(directory), stage)
    _verify_file(stage, path, stage.artifact.sha256)
    weights = weights_path(Path(directory), stage)
    if weights is not None:
        _verify_file(stage, weights, stage.artifact.weights.sha256)
    return path


def _verify_file(stage: StageEntry, path: Path, sha256: str) -> None:
    if not path.is_file():
        raise ArtifactError(
            f"stage {stage.index} ({stage.device}): artifact {path} is missing; copy the whole "
            f"compile output directory or recompile")
    actual = sha256_of(path)
    if actual != sha256:
        raise ArtifactError(
            f"stage {stage.index} ({stage.device}): artifact {path} is corrupt: sha256 {actual[:12]}... "
            f"but the manifest says {sha256[:12]}...; copy it again or recompile")
