"""The compile driver: a flat pipeline of passes from a PyTorch model to a plan and artifacts.

    capture -> dedup (workloads) -> annotate -> units -> costs -> compression (measure
    codecs per cut) -> partition (cut and codec together, or a given plan) -> place heads ->
    plan -> workload memory (workloads) -> emit

Each step takes the `Compilation` state and returns a new one. Passes that are off or not
built yet (compression without --max-error, head placement) are no-op entries, so adding one changes a
single line of `PASSES`, never the control flow around it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeplan.errors import ArtifactError, PlanError
from edgeplan.passes.annotate import annotate
from edgeplan.passes.capture import bind_inputs, capture, numpy_dtype_name, signature_of
from edgeplan.passes.compress import (
    CutMeasurements,
    codec_time_scale,
    measure_cuts,
    offer_codecs,
)
from edgeplan.passes.dedup import dedup
from edgeplan.passes.partition import (
    PartitionResult,
    StageAssignment,
    evaluate,
    partition,
    validate_assignment,
)
from edgeplan.passes.records import ModelSignature
from edgeplan.passes.split import run_stages, split_stages
from edgeplan.passes.units import Unit, group_units, union_param_bytes
from edgeplan.planner.cost import CostModel, CostTables, RooflineCostModel
from edgeplan.planner.fleet import Fleet, load_fleet
from edgeplan.planner.plan import (
    PLAN_FILE,
    Boundary,
    Plan,
    SolverReport,
    Stage,
    UnitInfo,
)
from edgeplan.planner.profile import unit_features
from edgeplan.planner.workload import WorkloadLayout, workload_memory
from edgeplan.runtime.codec_speed import reference_gbs
from edgeplan.runtime.manifest import (
    MANIFEST_FILE,
    LinkEntry,
    Manifest,
    OutputEntry,
    StageEntry,
    TensorEntry,
    write_manifest,
)
from edgeplan.runtime.session import open_session
from edgeplan.targets.onnx import OnnxTarget
from edgeplan.targets.tvm import FLEET_TARGETS, TvmTarget, is_host, resolve_target


@dataclass(frozen=True)
class CompileOptions:
    """Everything a user can choose; defaults give a bottleneck-optimal inference plan."""

    objective: str = "bottleneck"
    mode: str = "inference"
    granularity: str = "block"
    num_stages: int | None = None
    time_limit_s: float = 10.0
    plan_from: Plan | None = None
    in_flight_microbatches: int | None = None
    cost_model: CostModel = field(default_factory=RooflineCostModel)
    name: str | None = None
    verify: bool = True
    max_error: float | None = None
    min_agreement: float | None = None
    calibration_inputs: tuple | None = None
    workload: WorkloadLayout | None = None  # set by planner.workload.compile_workload
    targets: str = "onnx"  # "onnx" | "tvm" | "auto" (measure both per stage, keep the faster)
    tvm: TvmTarget = field(default_factory=TvmTarget)  # TVM target, schedule, trials, cache


@dataclass(frozen=True)
class Compilation:
    """State passed along the pipeline; each pass fills in its part."""

    model: torch.nn.Module
    example_inputs: object
    fleet: Fleet
    options: CompileOptions
    out_dir: Path | None
    graph: torch.fx.GraphModule | None = None
    units: tuple[Unit, ...] = ()
    tables: CostTables | None = None
    cuts: tuple[CutMeasurements, ...] = ()
    result: PartitionResult | None = None
    plan: Plan | None = None
    timings: dict = field(default_factory=dict)

    @property
    def signature(self) -> ModelSignature:
        return signature_of(self.graph)


def capture_pass(c: Compilation) -> Compilation:
    return dataclasses.replace(c, graph=capture(c.model, c.example_inputs, c.options.name))


def dedup_pass(c: Compilation) -> Compilation:
    """Workloads: one graph value per shared weight, shared prefixes computed once (off otherwise)."""
    if c.options.workload is None:
        return c
    graph, _weights, _calls = dedup(c.graph)
    return dataclasses.replace(c, graph=graph)


def annotate_pass(c: Compilation) -> Compilation:
    return dataclasses.replace(c, graph=annotate(c.graph))


def units_pass(c: Compilation) -> Compilation:
    return dataclasses.replace(c, units=group_units(c.graph, c.options.granularity))


def cost_pass(c: Compilation) -> Compilation:
    in_flight = c.options.in_flight_microbatches or len(c.fleet.devices)
    tables = c.options.cost_model.costs(c.units, c.fleet, c.options.mode, in_flight)
    return dataclasses.replace(c, tables=tables)


def compress_pass(c: Compilation) -> Compilation:
    """Measure boundary codecs and offer those within --max-error to the partition (off without it)."""
    if c.options.max_error is None:
        return c
    calibration = c.options.calibration_inputs or (c.example_inputs,)
    cuts = measure_cuts(c.graph, c.units, calibration)
    tables = offer_codecs(c.tables, cuts, c.options.max_error, c.options.min_agreement)
    tables = dataclasses.replace(tables, codec_time_scale=codec_time_scale(
        c.fleet, tables.device_names, reference_gbs))
    return dataclasses.replace(c, tables=tables, cuts=cuts)


def partition_pass(c: Compilation) -> Compilation:
    if c.options.plan_from is not None:
        return dataclasses.replace(c, result=_replay(c, c.options.plan_from))
    result = partition(c.tables, c.options.objective, time_limit_s=c.options.time_limit_s,
                       num_stages=c.options.num_stages)
    return dataclasses.replace(c, result=result)


def _replay(c: Compilation, given: Plan) -> PartitionResult:
    """Check a given plan against this model and fleet, and re-cost its stages."""
    names = tuple(u.name for u in c.units)
    planned = tuple(u.name for u in given.units)
    if planned != names:
        differ = next((i for i, (a, b) in enumerate(zip(planned, names)) if a != b), min(len(planned), len(names)))
        raise PlanError(
            f"given plan: it was made for {len(planned)} units, this model has {len(names)} "
            f"(granularity {given.granularity!r}); first difference at unit {differ} "
            f"({planned[differ] if differ < len(planned) else '-'} vs "
            f"{names[differ] if differ < len(names) else '-'}): recompile without --plan-from")
    stages = []
    for stage in given.stages:
        try:
            slot = c.tables.slots.index((stage.device, stage.backend))
        except ValueError:
            raise PlanError(
                f"given plan: stage {stage.index} runs on {stage.device}/{stage.backend}, which the "
                f"fleet {c.fleet.name!r} does not have; known: "
                f"{', '.join('/'.join(s) for s in c.tables.slots)}") from None
        codec = stage.boundary.codec if stage.boundary else "raw"
        if codec not in c.tables.codec_names:
            raise PlanError(
                f"given plan: stage {stage.index} sends with codec {codec!r}, which was not measured; "
                f"compile with --max-error (the plan's own budget is {given.max_error})")
        stages.append(StageAssignment(slot, stage.unit_start, stage.unit_end, c.tables.codec_names.index(codec)))
    validate_assignment(c.tables, stages)
    value = evaluate(c.tables, stages).value(c.options.objective)
    return PartitionResult(tuple(stages), c.options.objective, value, value, 0.0, "GIVEN",
                           "plan-from", 0.0)


def place_heads_pass(c: Compilation) -> Compilation:
    """Head-to-backend placement: not built yet, so stages keep one backend each."""
    return c


def plan_pass(c: Compilation) -> Compilation:
    tables, result, units = c.tables, c.result, c.units
    costs = evaluate(tables, result.stages)
    stages = []
    for i, assignment in enumerate(result.stages):
        device, backend = tables.slots[assignment.slot]
        last = units[assignment.end - 1]
        boundary = None
        if i + 1 < len(result.stages):
            cut, codec = assignment.end - 1, assignment.codec
            measured = c.cuts[cut].get(tables.codec_names[codec]) if c.cuts else None
            encode_s, _, decode_s = tables.boundary_s(
                cut, codec, int(tables.slot_device[assignment.slot]),
                int(tables.slot_device[result.stages[i + 1].slot]))
            boundary = Boundary(
                tensors=last.cut_tensors, nbytes=last.cut_bytes, link_s=costs.link_s[i],
                codec=tables.codec_names[codec], wire_bytes=int(tables.codec_wire_bytes[cut, codec]),
                encode_s=encode_s, decode_s=decode_s,
                output_error=measured.output_error if measured else None,
                agreement=measured.agreement if measured else None)
        stages.append(Stage(
            index=i, device=device, backend=backend,
            unit_start=assignment.start, unit_end=assignment.end,
            units=tuple(u.name for u in units[assignment.start:assignment.end]),
            param_bytes=union_param_bytes(units[assignment.start:assignment.end]),
            memory_bytes=costs.memory_bytes[i],
            memory_budget_bytes=int(tables.device_memory_bytes[tables.slot_device[assignment.slot]]),
            compute_s=costs.compute_s[i],
            boundary=boundary,
            guessed_units=() if tables.guessed is None else tuple(
                units[u].name for u in range(assignment.start, assignment.end)
                if tables.guessed[u, assignment.slot]),
        ))
    signature = c.signature
    plan = Plan(
        model=signature.name,
        mode=c.options.mode,
        granularity=c.options.granularity,
        inputs=signature.inputs,
        outputs=signature.outputs,
        fleet=c.fleet.to_dict(),
        units=tuple(UnitInfo(u.name, u.flops, u.param_bytes, u.peak_activation_bytes, u.cut_bytes,
                             unit_features(u)) for u in units),
        stages=tuple(stages),
        solver=SolverReport(result.solver, result.status, result.objective, result.value_s,
                            result.bound_s, result.gap, result.solve_time_s, c.options.time_limit_s),
        costs=tables,
        bottleneck_s=costs.bottleneck_s,
        latency_s=costs.latency_s,
        max_error=c.options.max_error,
    )
    return dataclasses.replace(c, plan=plan)


def workload_pass(c: Compilation) -> Compilation:
    """Workloads: per-model and shared parameter bytes into the plan (off otherwise)."""
    if c.options.workload is None:
        return c
    info = workload_memory(c.graph, c.options.workload)
    return dataclasses.replace(c, plan=dataclasses.replace(c.plan, workload=info))


def emit_pass(c: Compilation) -> Compilation:
    """Write plan.json, and per-stage ONNX artifacts plus manifest.json (skipped without out_dir)."""
    if c.out_dir is None:
        return c
    if c.signature.on_meta:
        raise ArtifactError(
            "emit: the model's weights are on the meta device, so there is nothing to write into "
            "artifacts; build the model with real weights to emit, or plan only "
            "(edgeplan.compile(..., out_dir=None) / `edgeplan compile --plan-only`)")
    c.out_dir.mkdir(parents=True, exist_ok=True)
    # An earlier manifest must not describe half-rewritten artifacts if this emit fails:
    # remove it first, write plan and manifest only once every stage is exported.
    (c.out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    manifest, stages = emit_stages(c.graph, c.plan, c.units, c.fleet, c.example_inputs, c.out_dir,
                                   verify=c.options.verify, targets=c.options.targets,
                                   tvm=c.options.tvm)
    plan = dataclasses.replace(c.plan, stages=stages)
    plan.to_json(c.out_dir / PLAN_FILE)
    write_manifest(manifest, c.out_dir)
    return dataclasses.replace(c, plan=plan)


def emit_stages(gm, plan: Plan, units, fleet: Fleet, example_inputs, out_dir: Path,
                verify: bool = True, targets: str = "onnx",
                tvm: TvmTarget | None = None) -> tuple[Manifest, tuple[Stage, ...]]:
    """Split the graph by the plan, export every stage to ONNX, and (with verify) check each
    against torch. With `targets` "tvm", every stage also gets a TVM library (from its ONNX
    file) that the manifest points at instead; with "auto", both run on this host and the
    faster one is kept. Returns the manifest and the plan's stages with the runtime chosen."""
    if targets not in ("onnx", "tvm", "auto"):
        raise ArtifactError(f"emit: targets {targets!r} is unknown; use 'onnx', 'tvm' or 'auto'")
    tvm = tvm or TvmTarget()
    if targets == "auto" and tvm.target != FLEET_TARGETS and not is_host(resolve_target(tvm.target)):
        raise ArtifactError(
            f"emit: --targets auto times both runtimes on this machine, so it needs the host TVM "
            f"target, not {tvm.target!r}; use --targets tvm to build for that device")
    stage_of_unit = [0] * len(units)
    for stage in plan.stages:
        for u in range(stage.unit_start, stage.unit_end):
            stage_of_unit[u] = stage.index
    stage_graphs = split_stages(gm, stage_of_unit)
    signature = signature_of(gm)
    env = bind_inputs(signature, example_inputs)
    target = OnnxTarget()
    entries, stages = [], []
    for stage, (stage_graph, args) in zip(plan.stages, run_stages(stage_graphs, env)):
        forward = (tuple(t.name for t in stage.boundary.tensors) if stage.boundary
                   else signature.output_nodes)
        missing = [name for name in forward if name not in env]
        if missing:
            raise ArtifactError(f"emit: stage {stage.index} cannot forward {missing}: internal split "
                                f"error, please report with the model")
        artifact = target.emit(stage_graph, stage.index, args, out_dir)
        entry = StageEntry(
            index=stage.index, device=stage.device, backend=stage.backend,
            execution_providers=fleet.device(stage.device).backend(stage.backend).execution_providers,
            artifact=artifact,
            inputs=tuple(_entry(name, env[name]) for name in stage_graph.inputs),
            outputs=tuple(_entry(name, env[name]) for name in stage_graph.outputs),
            forward=tuple(dict.fromkeys(forward)),
            codec=stage.boundary.codec if stage.boundary else "raw",
            link=_link_entry(fleet, stage, plan.stages),
        )
        if verify:
            entry = dataclasses.replace(entry, verified_max_abs_error=_verify(out_dir, entry, env))
        stage_tvm = _stage_tvm(tvm, fleet, stage, targets)
        if targets != "onnx" and stage_tvm is not None:
            if tvm.progress is not None:
                tvm.progress(stage.index, len(plan.stages), f"tvm stage {stage.index}")
            entry, stage = _emit_tvm(out_dir, entry, stage, env, targets, stage_tvm, verify)
        entries.append(entry)
        stages.append(stage)
    if targets != "onnx" and tvm.progress is not None:
        tvm.progress(len(plan.stages), len(plan.stages), "tvm stages done")
    batch = signature.inputs[0].shape[0] if signature.inputs and signature.inputs[0].shape else 1
    manifest = Manifest(
        model=signature.name,
        batch_size=int(batch),
        inputs=tuple(TensorEntry(t.name, t.shape, t.dtype) for t in signature.inputs),
        outputs=tuple(OutputEntry(spec.name, node, spec.shape, spec.dtype)
                      for spec, node in zip(signature.outputs, signature.output_nodes)),
        stages=tuple(entries),
    )
    return manifest, tuple(stages)


def _stage_tvm(tvm: TvmTarget, fleet: Fleet, stage: Stage, targets: str) -> TvmTarget | None:
    """The TVM build of one stage, None for none. With the target "fleet", each stage is
    built for its backend's `tvm_target` (a cpu backend without one: this machine's llvm);
    "tvm" refuses a gpu/npu backend without one, "auto" keeps ONNX Runtime on every stage
    whose target cannot run here, since it can time only what runs on this machine."""
    if tvm.target != FLEET_TARGETS:
        return tvm
    backend = fleet.device(stage.device).backend(stage.backend)
    wanted = backend.tvm_target or ("host" if backend.kind == "cpu" else None)
    if wanted is None:
        if targets == "tvm":
            raise ArtifactError(
                f"tvm target: stage {stage.index} runs on {stage.device}/{stage.backend}, a "
                f"{backend.kind} backend whose fleet entry has no tvm_target; set tvm_target "
                f'(e.g. "cuda" or "opencl") on that backend in the fleet file, or compile with '
                f"--targets auto (keeps ONNX Runtime there) or --targets onnx")
        return None
    if targets == "auto" and not is_host(resolve_target(wanted)):
        return None
    return dataclasses.replace(tvm, target=wanted)


TIMING_WARMUP, TIMING_REPEATS = 3, 15
TVM_TOLERANCE = 1e-4  # max |TVM - torch| a TVM stage may add beyond ONNX Runtime's own error


def _emit_tvm(out_dir: Path, entry: StageEntry, stage: Stage, env: dict, targets: str,
              tvm: TvmTarget, verify: bool) -> tuple[StageEntry, Stage]:
    """Build the stage's TVM library; the manifest entry points at it for "tvm", and at the
    faster of the two (median over TIMING_REPEATS runs, one thread each) for "auto".

    A host library is checked against torch (always for "auto"): one that is off by more
    than TVM_TOLERANCE is an error for "tvm" and is never chosen by "auto"."""
    built = tvm.emit(out_dir / entry.artifact.path, stage.index, out_dir)
    tvm_entry = dataclasses.replace(entry, artifact=built.artifact, verified_max_abs_error=None)
    if not is_host(resolve_target(tvm.target)):  # cross-compiled: cannot run here
        return tvm_entry, dataclasses.replace(stage, runtime="tvm")
    if verify or targets == "auto":
        error = _verify(out_dir, tvm_entry, env)
        tvm_entry = dataclasses.replace(tvm_entry, verified_max_abs_error=error)
        within = error <= TVM_TOLERANCE + (entry.verified_max_abs_error or 0.0)
        if targets == "tvm" and not within:
            raise ArtifactError(
                f"tvm target: stage {stage.index} differs from torch by {error:.2e} (more than "
                f"{TVM_TOLERANCE:g}); compile it with --targets onnx or --targets auto, and report "
                f"the model")
    if targets == "tvm":
        return tvm_entry, dataclasses.replace(stage, runtime="tvm")
    feeds = {t.name: env[t.name].detach().cpu().numpy() for t in entry.inputs}
    times = {"onnxruntime": median_run_s(open_session(out_dir, entry, threads=1), feeds),
             "tvm": median_run_s(open_session(out_dir, tvm_entry, threads=1), feeds)}
    runtime = "tvm" if within and times["tvm"] < times["onnxruntime"] else "onnxruntime"
    chosen = tvm_entry if runtime == "tvm" else entry
    return chosen, dataclasses.replace(stage, runtime=runtime, runtime_s=times)


def median_run_s(session, feeds: dict, repeats: int = TIMING_REPEATS) -> float:
    """Median seconds of one session run after TIMING_WARMUP untimed ones."""
    for _ in range(TIMING_WARMUP):
        session.run(feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _link_entry(fleet: Fleet, stage, stages) -> LinkEntry | None:
    if stage.boundary is None:
        return None
    link = fleet.link(stage.device, stages[stage.index + 1].device)
    return LinkEntry(link.bandwidth_bytes_s, link.latency_s)


def _verify(out_dir: Path, entry: StageEntry, env: dict) -> float:
    """Max |runtime - torch| over the stage's outputs on the example inputs."""
    session = open_session(out_dir, entry, threads=1)
    results = session.run({t.name: env[t.name].detach().cpu().numpy() for t in entry.inputs})
    errors = [float(np.max(np.abs(results[t.name].astype(np.float64)
                                  - env[t.name].detach().cpu().numpy().astype(np.float64)), initial=0.0))
              for t in entry.outputs]
    return max(errors, default=0.0)


def _entry(name: str, value: torch.Tensor) -> TensorEntry:
    return TensorEntry(name, tuple(int(d) for d in value.shape), numpy_dtype_name(value.dtype))


PASSES: tuple[Callable[[Compilation], Compilation], ...] = (
    capture_pass,
    dedup_pass,
    annotate_pass,
    units_pass,
    cost_pass,
    compress_pass,
    partition_pass,
    place_heads_pass,
    plan_pass,
    workload_pass,
    emit_pass,
)


def run_passes(state: Compilation) -> Compilation:
    for step in PASSES:
        started = time.perf_counter()
        state = step(state)
        state.timings[step.__name__.removesuffix("_pass")] = time.perf_counter() - started
    return state


def compile_model(model, example_inputs, fleet="home-lab", out_dir=None, **options) -> Plan:
    """Plan `model` onto `fleet` and, if `out_dir` is given, write plan, artifacts and manifest.

    Options (see CompileOptions): objective ("bottleneck" | "latency"), mode ("inference" |
    "training"), granularity ("block" | "layer"), num_stages, time_limit_s, plan_from (a
    plan.json path or Plan to replay instead of solving; it also sets mode, granularity and
    objective), in_flight_microbatches,
    cost_model, name, verify (check every stage against torch after export).
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(CompileOptions)}
    if unknown:
        raise TypeError(f"compile: unknown option(s) {sorted(unknown)}; known: "
                        f"{[f.name for f in dataclasses.fields(CompileOptions)]}")
    given = options.get("plan_from")
    if given is not None:
        # A replayed plan fixes how units are grouped and costed; read the file once here.
        given = given if isinstance(given, Plan) else Plan.from_json(given)
        options.update(plan_from=given, mode=given.mode, granularity=given.granularity,
                       objective=given.solver.objective, max_error=given.max_error)
    state = Compilation(model=model, example_inputs=example_inputs, fleet=load_fleet(fleet),
                        options=CompileOptions(**options),
                        out_dir=Path(out_dir) if out_dir is not None else None)
    return run_passes(state).plan
