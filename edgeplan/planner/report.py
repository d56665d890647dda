"""Human-readable views of a Plan: the per-stage table that `edgeplan inspect` prints.

Torch-free.
"""

from __future__ import annotations

from edgeplan.planner.plan import Plan

MB = 1e6


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.rjust(width) if i else cell.ljust(width)
                     for i, (cell, width) in enumerate(zip(cells, widths)))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths), _row(["-" * w for w in widths], widths),
            *(_row(r, widths) for r in rows)]


def _units_label(units: tuple[str, ...]) -> str:
    return units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]} ({len(units)})"


def format_plan(plan: Plan, manifest=None, run: dict | None = None) -> str:
    """The inspect table: one row per stage, the bottleneck marked, then solver facts.

    With `run` (the latest record of runs.jsonl), each stage also shows its measured busy
    time per microbatch next to the prediction.
    """
    kind, where = plan.bottleneck_index
    header = ["stage", "device", "backend", "units", "params MB", "memory MB / budget",
              "predicted ms", "boundary MB", "link ms"]
    compressed = plan.max_error is not None
    if compressed:
        header += ["codec", "ratio", "out err", "agree"]
    if run is not None:
        header.append("measured ms")
    runtimes = any(stage.runtime != "onnxruntime" or stage.runtime_s for stage in plan.stages)
    if runtimes:
        header += ["runtime", "ORT ms", "TVM ms"]
    if manifest is not None:
        header.append("|runtime-torch|" if runtimes else "|ORT-torch|")
    rows = []
    for stage in plan.stages:
        compute = f"{stage.compute_s * 1e3:.3f}" + (" *" if (kind, where) == ("stage", stage.index) else "")
        if stage.boundary:
            link = f"{stage.boundary.link_s * 1e3:.3f}" + (" *" if (kind, where) == ("link", stage.index) else "")
            boundary = f"{stage.boundary.nbytes / MB:.3f}"
        else:
            link = boundary = "-"
        row = [str(stage.index), stage.device, stage.backend, _units_label(stage.units),
               f"{stage.param_bytes / MB:.2f}",
               f"{stage.memory_bytes / MB:.1f} / {stage.memory_budget_bytes / MB:.0f}",
               compute, boundary, link]
        if compressed:
            b = stage.boundary
            row += ["-", "-", "-", "-"] if b is None else [
                b.codec, f"{b.ratio:.2f}x",
                "-" if b.output_error is None else f"{b.output_error:.1e}",
                "-" if b.agreement is None else f"{b.agreement:.2%}"]
        if run is not None:
            row.append(f"{run['stage_mean_s'][stage.index] * 1e3:.3f}")
        if runtimes:
            row += [stage.runtime, *(f"{stage.runtime_s[name] * 1e3:.3f}" if name in stage.runtime_s
                                     else "-" for name in ("onnxruntime", "tvm"))]
        if manifest is not None:
            error = manifest.stages[stage.index].verified_max_abs_error
            row.append("-" if error is None else f"{error:.1e}")
        rows.append(row)
    solver = plan.solver
    lines = [
        f"model {plan.model}  fleet {plan.fleet.get('name', '?')}  mode {plan.mode}  "
        f"units {len(plan.units)} ({plan.granularity})  stages {len(plan.stages)}",
        "",
        *_table(header, rows),
        "",
        f"bottleneck {plan.bottleneck_s * 1e3:.3f} ms ({kind} {where}, marked *)  "
        f"throughput {plan.throughput_per_s:.1f} microbatches/s  latency {plan.latency_s * 1e3:.3f} ms",
        f"solver {solver.solver} {solver.status}  objective {solver.objective} "
        f"{solver.value_s * 1e3:.3f} ms  bound {solver.bound_s * 1e3:.3f} ms  gap {solver.gap:.2%}  "
        f"solve {solver.solve_time_s:.2f} s  cost model {plan.costs.model}",
    ]
    if run is not None:
        lines.append(f"measured: latest of runs.jsonl, {run['microbatches']} microbatches on host "
                     f"{run['host']!r} (this machine's CPU, not the planned devices), "
                     f"{run['microbatches'] / run['wall_s']:.1f} microbatches/s"
                     + (" with emulated links" if run["emulated_links"] else ""))
    if compressed:
        lines.append(f"boundary codecs chosen with the partition under --max-error {plan.max_error:g} "
                     f"(relative L2 error of the outputs on the calibration inputs; codec times "
                     f"measured on the compiling host, scaled to each device's codec_gbs, "
                     f"included in the stage times)")
    if runtimes:
        lines.append("runtime: what runs each stage; ORT ms / TVM ms: median of one-thread runs on "
                     "the compiling host, measured by --targets auto (which keeps the faster)")
    used = {(stage.device, stage.backend) for stage in plan.stages}
    sources = [f"{'/'.join(slot)}: {source}" for slot, source in zip(plan.costs.slots, plan.costs.slot_sources)
               if source and slot in used]
    if sources:
        lines.append(f"learned costs of the stages' backends: {'; '.join(sources)}")
    if plan.costs.guessed_units:
        lines.append(f"guessed (no measurements): {', '.join(plan.costs.guessed_units)}")
    if plan.workload is not None:
        lines += ["", *format_workload(plan.workload)]
    return "\n".join(lines)


def format_workload(workload) -> list[str]:
    """Per-model parameter memory of a multi-model plan: own and shared with other models."""
    rows = [[m.name, ", ".join(m.inputs), ", ".join(m.outputs), f"{m.param_bytes / MB:.3f}",
             f"{m.shared_bytes / MB:.3f}", f"{(m.param_bytes - m.shared_bytes) / MB:.3f}"]
            for m in workload.models]
    saved = 1 - workload.param_bytes / workload.unmerged_param_bytes if workload.unmerged_param_bytes else 0.0
    return [
        *_table(["model", "inputs", "outputs", "params MB", "shared MB", "own MB"], rows),
        "",
        f"models hold {workload.unmerged_param_bytes / MB:.3f} MB of weights on their own, "
        f"{workload.param_bytes / MB:.3f} MB distinct ({saved:.1%} less): {workload.shared_weights} "
        f"weight tensor(s) shared across models, stored once per device that runs them "
        f"(stage params and memory above count them once)",
    ]
