"""Plan: the frozen, versioned, JSON-serializable record of a partition decision.

A plan holds what was decided (stages: device, backend, unit range, boundaries), why
(the cost tables it was decided from, the solver's status, bound and gap), and what was
predicted (per-stage compute and memory, per-boundary transfer). A hand-written or edited
plan file is the same type: `Plan.from_json` reads it, and the compile driver re-checks
its stages against the model and fleet before using it (`--plan-from`).

Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from edgeplan.errors import PlanError
from edgeplan.passes.records import TensorSpec
from edgeplan.planner.cost import CostTables

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class UnitInfo:
    """What the plan needs to know about a unit (a summary of passes.units.Unit); features
    are the unit's profile-store features (planner.profile.unit_features), so measured
    stage times of a run can train the latency predictor (`edgeplan profile --from-run`)."""

    name: str
    flops: int
    param_bytes: int
    peak_activation_bytes: int
    cut_bytes: int
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Boundary:
    """Tensors sent from a stage to the next one: raw bytes, the codec chosen, its wire
    bytes, and the predicted link and codec times; with compression, the errors measured
    on the calibration inputs (relative L2 of the outputs, argmax agreement)."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int
    link_s: float
    codec: str = "raw"
    wire_bytes: int | None = None
    encode_s: float = 0.0
    decode_s: float = 0.0
    output_error: float | None = None
    agreement: float | None = None

    @property
    def ratio(self) -> float:
        return self.nbytes / self.wire_bytes if self.wire_bytes else 1.0


@dataclass(frozen=True)
class Stage:
    index: int
    device: str
    backend: str
    unit_start: int
    unit_end: int
    units: tuple[str, ...]
    param_bytes: int
    memory_bytes: int
    memory_budget_bytes: int
    compute_s: float
    boundary: Boundary | None = None
    # Which runtime runs the stage ("onnxruntime" or "tvm"), and the median seconds each
    # runtime measured for it on the compiling host (`--targets auto` keeps the faster).
    runtime: str = "onnxruntime"
    runtime_s: dict[str, float] = field(default_factory=dict)
    guessed_units: tuple[str, ...] = ()  # units whose time here is a roofline guess (learned costs)


@dataclass(frozen=True)
class SolverReport:
    solver: str
    status: str
    objective: str
    value_s: float
    bound_s: float
    gap: float
    solve_time_s: float
    time_limit_s: float


@dataclass(frozen=True)
class ModelMemory:
    """One model of a multi-model workload: its graph inputs and outputs, the bytes of the
    weights it reads, and how many of those other models read too (shared)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    param_bytes: int
    shared_bytes: int


@dataclass(frozen=True)
class WorkloadInfo:
    """The models planned together; param_bytes counts every distinct weight once,
    unmerged_param_bytes is what the models would hold each on their own."""

    models: tuple[ModelMemory, ...]
    param_bytes: int
    unmerged_param_bytes: int
    shared_weights: int


@dataclass(frozen=True)
class Plan:
    model: str
    mode: str
    granularity: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    fleet: dict
    units: tuple[UnitInfo, ...]
    stages: tuple[Stage, ...]
    solver: SolverReport
    costs: CostTables
    bottleneck_s: float = 0.0
    latency_s: float = 0.0
    max_error: float | None = None
    schema_version: int = SCHEMA_VERSION
    workload: WorkloadInfo | None = None

    @property
    def throughput_per_s(self) -> float:
        """Microbatches per second in steady state (one per bottleneck)."""
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else float("inf")

    @property
    def bottleneck_index(self) -> tuple[str, int]:
        """("stage", i) or ("link", i): where the bottleneck is."""
        candidates = [(s.compute_s, ("stage", s.index)) for s in self.stages]
        candidates += [(s.boundary.link_s, ("link", s.index)) for s in self.stages if s.boundary]
        return max(candidates, key=lambda item: item[0])[1]

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "costs"}
        data = json.loads(json.dumps(_plain(data)))
        data["costs"] = self.costs.to_dict()
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "Plan":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan {source}: schema version {version!r}, this edgeplan reads version "
                f"{SCHEMA_VERSION}; re-run `edgeplan compile` to regenerate the plan")
        try:
            return cls(
                model=data["model"],
                mode=data["mode"],
                granularity=data["granularity"],
                inputs=tuple(_tensor(t) for t in data["inputs"]),
                outputs=tuple(_tensor(t) for t in data["outputs"]),
                fleet=data["fleet"],
                units=tuple(UnitInfo(**u) for u in data["units"]),
                stages=tuple(_stage(s) for s in data["stages"]),
                solver=SolverReport(**data["solver"]),
                costs=CostTables.from_dict(data["costs"]),
                bottleneck_s=float(data.get("bottleneck_s", 0.0)),
                latency_s=float(data.get("latency_s", 0.0)),
                max_error=data.get("max_error"),
                schema_version=version,
                workload=_workload(data.get("workload")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"plan {source}: malformed ({exc.__class__.__name__}: {exc}); compare it with a "
                f"plan written by `edgeplan compile` (edgeplan inspect DIR --json)") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan {path}: no such file; compile first or pass the plan.json path") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(data, source=str(path))


def _plain(value):
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _tensor(data: dict) -> TensorSpec:
    return TensorSpec(data["name"], tuple(data["shape"]), data["dtype"])


def _workload(data: dict | None) -> WorkloadInfo | None:
    if data is None:
        return None
    models = tuple(ModelMemory(**{**m, "inputs": tuple(m["inputs"]), "outputs": tuple(m["outputs"])})
                   for m in data["models"])
    return WorkloadInfo(**{**data, "models": models})


def _stage(data: dict) -> Stage:
    boundary = data.get("boundary")
    return Stage(
        index=data["index"], device=data["device"], backend=data["backend"],
        unit_start=data["unit_start"], unit_end=data["unit_end"], units=tuple(data["units"]),
        param_bytes=data["param_bytes"], memory_bytes=data["memory_bytes"],
        memory_budget_bytes=data["memory_budget_bytes"], compute_s=data["compute_s"],
        runtime=data.get("runtime", "onnxruntime"),
        runtime_s={str(k): float(v) for k, v in data.get("runtime_s", {}).items()},
        boundary=None if boundary is None else Boundary(
            **{**boundary, "tensors": tuple(_tensor(t) for t in boundary["tensors"])}),
        guessed_units=tuple(data.get("guessed_units", ())),
    )
