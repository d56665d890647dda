"""Partition benchmark: edgeplan's CP-SAT plan vs the usual pipeline-split baselines.

Part 1 -- for each model x fleet, the predicted bottleneck (ms per microbatch, the steady-state
time of the slowest stage or link, from the roofline cost tables) of:
  edgeplan        `partition(tables, "bottleneck")`: CP-SAT, free device order, any number
                  of stages, seeded by the exact DP over a few device orders;
  uniform         contiguous groups of equal unit count over all devices in fleet order
                  (torch.distributed.pipelining's default split), each stage on its device's
                  fastest backend;
  params-balanced contiguous split over all devices in fleet order with parameter bytes per
                  stage as equal as possible (DeepSpeed's partition_method="parameters").
Units and cost tables come from the compile passes up to and including `cost_pass` (no
partition, no emit); capture/annotate/units run once per model, `cost_pass` once per fleet.
A baseline whose stage does not fit its device's memory prints "OOM (its ms)".

The full run adds LLaMA-7B shapes (meta) as a last model, reusing the Part 2 capture (its
edge-8 row is the Part 2 plan).

Part 2 -- wall time of capture + plan of LLaMA-7B shapes on meta tensors for the 8-device
`edge-8` fleet (the full pass pipeline through plan_pass, out_dir=None), against a 10 s target,
then what shorter CP-SAT time limits give on the same cost tables.

    python bench/partition.py [--time-limit 10] [--quick]

--quick: models gpt and resnet on home-lab, jetson-cluster and phones; no LLaMA-7B.

Prints plain-text tables; nothing is asserted (tests/test_bench_partition.py checks the
edgeplan-vs-baseline invariant on the --quick run).
"""

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from edgeplan.cli import load_module  # noqa: E402
from edgeplan.errors import PlanError  # noqa: E402
from edgeplan.passes.partition import (  # noqa: E402
    PartitionResult,
    StageAssignment,
    evaluate,
    partition,
    validate_assignment,
)
from edgeplan.planner.compile import (  # noqa: E402
    PASSES,
    Compilation,
    CompileOptions,
    cost_pass,
    run_passes,
)
from edgeplan.planner.cost import CostTables  # noqa: E402
from edgeplan.planner.fleet import load_fleet  # noqa: E402
from edgeplan.planner.report import format_plan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TARGET_7B_S = 10.0
# Heterogeneous (wired + a phone on Wi-Fi), homogeneous, phones on Wi-Fi, the 8-device 7B fleet.
FLEETS = ("home-lab", "jetson-cluster", "phones", "edge-8")
QUICK_FLEETS = ("home-lab", "jetson-cluster", "phones")


def load_example(name: str):
    """Import examples/<name>.py the way `edgeplan compile` does."""
    return load_module(EXAMPLES / f"{name}.py")


# (label, factory returning (model, example_inputs)); the first two form --quick.
MODELS: tuple[tuple[str, Callable], ...] = (
    ("gpt", lambda: load_example("gpt").build()),
    ("resnet", lambda: load_example("resnet").build()),
    ("llama_hf", lambda: load_example("llama_hf").build()),
    ("gpt2_hf", lambda: load_example("gpt2_hf").build()),
    ("gpt-24L-1024d (meta)",
     lambda: load_example("gpt").build(device="meta", n_layer=24, d_model=1024, n_head=16, seq=256)),
)
QUICK_MODELS = ("gpt", "resnet")


# --------------------------------------------------------------------------------------
# Baselines: contiguous splits over all devices in fleet order


def _fastest_slot(tables: CostTables, device: int, start: int, end: int) -> int:
    """The slot of `device` with the least total compute for units [start, end)."""
    slots = np.flatnonzero(tables.slot_device == device)
    totals = tables.compute_s[start:end, slots].sum(axis=0)
    return int(slots[int(np.argmin(totals))])


def _on_fleet_order(tables: CostTables, bounds: Sequence[int]) -> list[StageAssignment]:
    """Stages [bounds[i], bounds[i+1]) on device i (fleet order), each on its fastest slot."""
    return [StageAssignment(_fastest_slot(tables, i, start, end), start, end)
            for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))]


def uniform_split(tables: CostTables) -> list[StageAssignment]:
    """Equal unit count per stage over all devices (fewer stages if fewer units than devices)."""
    unit_count = len(tables.unit_names)
    stage_count = min(len(tables.device_names), unit_count)
    sizes = [len(part) for part in np.array_split(np.arange(unit_count), stage_count)]
    return _on_fleet_order(tables, np.concatenate([[0], np.cumsum(sizes)]).tolist())


def balanced_bounds(weights: Sequence[float], stage_count: int) -> list[int]:
    """Greedy prefix-sum split: cut i sits where the prefix sum is closest to (i+1)*total/n.

    Every stage keeps at least one unit. Returns stage_count + 1 bounds from 0 to len(weights).
    """
    weights = np.asarray(weights, dtype=float)
    count = len(weights)
    if not 1 <= stage_count <= count:
        raise ValueError(f"balanced_bounds: {stage_count} stages for {count} units")
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    target = prefix[-1] / stage_count
    bounds = [0]
    for i in range(1, stage_count):
        lo, hi = bounds[-1] + 1, count - (stage_count - i)  # leave one unit per later stage
        candidates = np.arange(lo, hi + 1)
        bounds.append(int(candidates[np.argmin(np.abs(prefix[candidates] - i * target))]))
    bounds.append(count)
    return bounds


def params_balanced_split(tables: CostTables, param_bytes: Sequence[int]) -> list[StageAssignment]:
    """Parameter bytes per stage as equal as possible, over all devices in fleet order."""
    stage_count = min(len(tables.device_names), len(tables.unit_names))
    return _on_fleet_order(tables, balanced_bounds(param_bytes, stage_count))


@dataclass(frozen=True)
class Baseline:
    bottleneck_s: float
    fits: bool
    stages: int


def score(tables: CostTables, stages: Sequence[StageAssignment]) -> Baseline:
    """Predicted bottleneck of an assignment and whether every stage fits its device."""
    try:
        validate_assignment(tables, stages)
        fits = True
    except PlanError:
        fits = False
    return Baseline(evaluate(tables, stages).bottleneck_s, fits, len(stages))


# --------------------------------------------------------------------------------------
# Part 1: the comparison table


@dataclass
class Row:
    model: str
    fleet: str
    units: int
    edgeplan: PartitionResult | None  # None: edgeplan found no plan (the model does not fit)
    edgeplan_error: str | None
    uniform: Baseline
    params: Baseline

    @property
    def best_baseline_s(self) -> float | None:
        feasible = [b.bottleneck_s for b in (self.uniform, self.params) if b.fits]
        return min(feasible) if feasible else None


def graph_state(model, example_inputs, fleet: str, time_limit_s: float) -> Compilation:
    """Run the fleet-independent passes (everything before cost_pass) once."""
    state = Compilation(model=model, example_inputs=example_inputs, fleet=load_fleet(fleet),
                        options=CompileOptions(time_limit_s=time_limit_s), out_dir=None)
    for step in PASSES[:PASSES.index(cost_pass)]:
        state = step(state)
    return state


def costed(state: Compilation, fleet: str) -> Compilation:
    """Cost tables of a captured model on a fleet (cost_pass with that fleet)."""
    return cost_pass(dataclasses.replace(state, fleet=load_fleet(fleet), tables=None, timings={}))


def compare(label: str, state: Compilation, fleet: str, time_limit_s: float) -> Row:
    """One table row; reuses the state's partition result if it was made for this fleet."""
    if state.result is not None and state.fleet.name == fleet:
        tables, result, error = state.tables, state.result, None
    else:
        state = costed(state, fleet)
        tables = state.tables
        try:
            result, error = partition(tables, "bottleneck", time_limit_s=time_limit_s), None
        except PlanError as exc:
            result, error = None, str(exc)
    return Row(
        model=label, fleet=fleet, units=len(state.units), edgeplan=result, edgeplan_error=error,
        uniform=score(tables, uniform_split(tables)),
        params=score(tables, params_balanced_split(tables, [u.param_bytes for u in state.units])),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _baseline_cell(b: Baseline) -> str:
    return _ms(b.bottleneck_s) if b.fits else f"OOM ({_ms(b.bottleneck_s)})"


def format_rows(rows: Sequence[Row]) -> str:
    header = ["model", "fleet", "units", "edgeplan ms (stages)", "uniform ms", "params-balanced ms",
              "speedup vs best baseline", "solver status/gap", "solve s"]
    table = []
    for r in rows:
        best = r.best_baseline_s
        if r.edgeplan is None:
            edge, speedup, status, solve = "does not fit", "-", "INFEASIBLE", "-"
        else:
            e = r.edgeplan
            edge = f"{_ms(e.value_s)} ({len(e.stages)})"
            speedup = f"{best / e.value_s:.2f}x" if best is not None else "baselines OOM"
            status = f"{e.status} {e.gap:.1%}"
            solve = f"{e.solve_time_s:.2f}"
        table.append([r.model, r.fleet, str(r.units), edge, _baseline_cell(r.uniform),
                      _baseline_cell(r.params), speedup, status, solve])
    return "\n".join(_table(header, table))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def regressions(rows: Sequence[Row], rel_tol: float = 1e-9) -> list[str]:
    """Rows where edgeplan is worse than a feasible baseline (should never happen)."""
    bad = []
    for r in rows:
        for name, b in (("uniform", r.uniform), ("params-balanced", r.params)):
            if not b.fits:
                continue
            if r.edgeplan is None:
                bad.append(f"{r.model} on {r.fleet}: edgeplan found no plan but {name} fits")
            elif r.edgeplan.value_s > b.bottleneck_s * (1 + rel_tol):
                bad.append(f"{r.model} on {r.fleet}: edgeplan {_ms(r.edgeplan.value_s)} ms > "
                           f"{name} {_ms(b.bottleneck_s)} ms ({r.edgeplan.status})")
    return bad


# --------------------------------------------------------------------------------------
# Part 2: LLaMA-7B on edge-8


@dataclass
class Llama7B:
    build_s: float
    timings: dict
    state: Compilation

    @property
    def capture_s(self) -> float:
        return self.timings["capture"]

    @property
    def plan_s(self) -> float:
        return sum(t for name, t in self.timings.items() if name != "capture")

    @property
    def total_s(self) -> float:
        return self.capture_s + self.plan_s


def llama_7b(time_limit_s: float) -> Llama7B:
    """Capture + plan LLaMA-7B shapes on meta onto edge-8: the passes edgeplan.compile runs.

    Same as `edgeplan.compile(model, inputs, fleet="edge-8", out_dir=None, time_limit_s=...)`
    (compile_model builds this Compilation and calls run_passes), kept here so the per-pass
    timings are visible.
    """
    started = time.perf_counter()
    model, inputs = load_example("llama_hf").build_7b()
    build_s = time.perf_counter() - started
    state = Compilation(model=model, example_inputs=inputs, fleet=load_fleet("edge-8"),
                        options=CompileOptions(time_limit_s=time_limit_s), out_dir=None)
    state = run_passes(state)
    return Llama7B(build_s, dict(state.timings), state)


PROBE_LIMITS_S = (0.5, 1.0, 2.0)


def probe_time_limits(tables: CostTables, limits: Sequence[float] = PROBE_LIMITS_S) -> str:
    """What shorter CP-SAT time limits give on the same tables (the solve only, no capture)."""
    lines = ["  shorter solver time limits on the same tables (partition only):"]
    for limit in limits:
        try:
            r = partition(tables, "bottleneck", time_limit_s=limit)
            lines.append(f"    limit {limit:4.1f} s: {r.status:8s} {_ms(r.value_s)} ms  "
                         f"bound {_ms(r.bound_s)} ms  gap {r.gap:.1%}  solve {r.solve_time_s:.2f} s")
        except PlanError as exc:
            lines.append(f"    limit {limit:4.1f} s: no plan ({str(exc).splitlines()[0]})")
    return "\n".join(lines)


def format_7b(run: Llama7B, time_limit_s: float) -> str:
    met = "met" if run.total_s <= TARGET_7B_S else "NOT met"
    passes = "  ".join(f"{name} {t:.2f}" for name, t in run.timings.items() if t >= 0.005)
    solver = run.state.plan.solver
    return "\n".join([
        f"LLaMA-7B shapes (meta, {len(run.state.units)} units) on edge-8, solver time limit "
        f"{time_limit_s:g} s",
        f"  model build (meta, not timed below) {run.build_s:.2f} s",
        f"  capture {run.capture_s:.2f} s   plan {run.plan_s:.2f} s "
        f"(CP-SAT {solver.solve_time_s:.2f} s, {solver.status})   total {run.total_s:.2f} s   "
        f"target <= {TARGET_7B_S:g} s: {met}",
        f"  per pass (s): {passes}",
        (f"  CP-SAT proved optimality in {solver.solve_time_s:.2f} s, under its {time_limit_s:g} s "
         f"limit: the limit was not reduced" if solver.status == "OPTIMAL" else
         f"  CP-SAT stopped at its {time_limit_s:g} s limit ({solver.status}, gap {solver.gap:.1%})"),
        "",
        probe_time_limits(run.state.tables),
        "",
        format_plan(run.state.plan),
    ])


# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=10.0,
                        help="CP-SAT time limit per partition, seconds (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help=f"models {', '.join(QUICK_MODELS)} only, and skip the LLaMA-7B parts")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    started = time.perf_counter()
    models = [m for m in MODELS if not args.quick or m[0] in QUICK_MODELS]
    fleets = QUICK_FLEETS if args.quick else FLEETS

    # Part 2 first, in a process that has captured nothing yet: the cold time a user sees.
    run7b = None
    if not args.quick:
        run7b = llama_7b(args.time_limit)

    rows = []
    for label, factory in models:
        model, inputs = factory()
        state = graph_state(model, inputs, fleets[0], args.time_limit)
        rows.extend(compare(label, state, fleet, args.time_limit) for fleet in fleets)
    if run7b is not None:  # the 7B rows reuse the capture timed above
        rows.extend(compare("llama-7B (meta)", run7b.state, fleet, args.time_limit) for fleet in fleets)

    print(f"Predicted bottleneck per microbatch (roofline cost model, inference, block units); "
          f"CP-SAT time limit {args.time_limit:g} s")
    print(format_rows(rows))
    for r in rows:
        if r.edgeplan_error:
            print(f"  {r.model} on {r.fleet}: {r.edgeplan_error.split('; ')[0]}")
    bad = regressions(rows)
    print("edgeplan worse than a feasible baseline: " + ("; ".join(bad) if bad else "never"))
    if run7b is not None:
        print()
        print(format_7b(run7b, args.time_limit))
    print()
    print(f"benchmark wall time {time.perf_counter() - started:.1f} s")
    return rows


if __name__ == "__main__":
    main()
