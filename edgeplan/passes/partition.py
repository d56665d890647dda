"""Partition: choose pipeline stages (unit ranges) and the device running each, from CostTables.

Decision out, no graph rewrite: `partition(tables, ...) -> PartitionResult`, a list of
stages (slot = device + backend, unit range [start, end)) in pipeline order. The graph
surgery that follows is `edgeplan.passes.split`.

The CP-SAT model (OR-Tools) assigns U units to at most S ordered stage positions, each run
by one slot; the solver also picks the device order. Constraints as in the write-up:
  (a) each unit in exactly one stage;
  (b) stages are contiguous in unit order (a unit's stage index grows by 0 or 1);
  (c) memory: a stage's weights plus its largest live activation fit its device (a weight
      read by several units of the stage counted once);
  (d) at most one stage per device; stages are a prefix of positions, none empty.
Objective "bottleneck" (default) minimizes the slowest stage compute or boundary transfer,
the steady-state time per microbatch of a pipeline; "latency" minimizes the sum (one
microbatch end to end). Times are scaled to integers (about 1e6 steps over the largest
possible value); reported values are re-evaluated on the float tables.

`solve_dp` is an exact dynamic program for a fixed device order (stages use a subsequence
of it): the check for CP-SAT in tests, the hint it starts from, and a fallback bound.

Torch-free: reads numpy arrays only.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeplan.errors import PlanError
from edgeplan.planner.cost import CostTables

OBJECTIVES = ("bottleneck", "latency")
TIME_STEPS = 1_000_000  # integer resolution of times in the CP-SAT model
MEMORY_QUANTUM = 1024  # bytes; unit memory rounds up, budgets round down


@dataclass(frozen=True)
class StageAssignment:
    """One stage: units [start, end) on slot `slot` (an index into CostTables.slots).

    `codec` indexes CostTables.codec_names: how the boundary after this stage is sent
    (0 = raw; ignored on the last stage).
    """

    slot: int
    start: int
    end: int
    codec: int = 0


@dataclass(frozen=True)
class PartitionResult:
    stages: tuple[StageAssignment, ...]
    objective: str
    value_s: float
    bound_s: float
    gap: float
    status: str
    solver: str
    solve_time_s: float


@dataclass(frozen=True)
class StageCosts:
    """Evaluated costs of an assignment: per stage compute and memory, per boundary link."""

    compute_s: tuple[float, ...]
    link_s: tuple[float, ...]
    memory_bytes: tuple[int, ...]

    @property
    def bottleneck_s(self) -> float:
        return max(self.compute_s + self.link_s)

    @property
    def latency_s(self) -> float:
        return sum(self.compute_s) + sum(self.link_s)

    def value(self, objective: str) -> float:
        return self.bottleneck_s if objective == "bottleneck" else self.latency_s


def evaluate(tables: CostTables, stages: Sequence[StageAssignment]) -> StageCosts:
    """Compute, link and memory of each stage of an assignment, on the float tables.

    A stage's compute includes encoding its outgoing boundary and decoding its incoming one.
    """
    compute = [tables.stage_compute_s(s.start, s.end, s.slot) for s in stages]
    memory = [tables.stage_memory(s.start, s.end) for s in stages]
    links = []
    for i, (stage, nxt) in enumerate(zip(stages, stages[1:])):
        encode, link, decode = tables.boundary_s(stage.end - 1, stage.codec,
                                                 int(tables.slot_device[stage.slot]),
                                                 int(tables.slot_device[nxt.slot]))
        compute[i] += encode
        compute[i + 1] += decode
        links.append(link)
    return StageCosts(tuple(compute), tuple(links), tuple(memory))


def validate_assignment(tables: CostTables, stages: Sequence[StageAssignment]) -> None:
    """Raise PlanError unless stages cover all units contiguously, on distinct devices, in memory."""
    unit_count = len(tables.unit_names)
    if not stages:
        raise PlanError("partition: a plan needs at least one stage")
    expected_start = 0
    used_devices: dict[int, int] = {}
    for i, stage in enumerate(stages):
        if not 0 <= stage.slot < len(tables.slots):
            raise PlanError(f"partition: stage {i} names slot {stage.slot}, the fleet has "
                            f"{len(tables.slots)} (device, backend) slots")
        if stage.start != expected_start or stage.end <= stage.start:
            raise PlanError(
                f"partition: stage {i} covers units [{stage.start}, {stage.end}) but must start at "
                f"unit {expected_start} and be non-empty: stages are contiguous (constraint b)")
        expected_start = stage.end
        device = int(tables.slot_device[stage.slot])
        if device in used_devices:
            raise PlanError(
                f"partition: stages {used_devices[device]} and {i} both run on device "
                f"{tables.device_names[device]!r}: at most one stage per device (constraint d)")
        used_devices[device] = i
        if i + 1 < len(stages) and not tables.codec_allowed[stage.end - 1, stage.codec]:
            allowed = [n for n, ok in zip(tables.codec_names, tables.codec_allowed[stage.end - 1]) if ok]
            raise PlanError(
                f"partition: stage {i} sends its boundary with codec "
                f"{tables.codec_names[stage.codec]!r}, which is not allowed at that cut (over the "
                f"error budget); allowed: {', '.join(allowed)}")
        need = tables.stage_memory(stage.start, stage.end)
        budget = int(tables.device_memory_bytes[device])
        if need > budget:
            raise PlanError(
                f"partition: stage {i} (units {tables.unit_names[stage.start]}.."
                f"{tables.unit_names[stage.end - 1]}) needs {need} bytes on device "
                f"{tables.device_names[device]!r}, which has {budget}: {need - budget} bytes short "
                f"(constraint c); move units to another stage or use a larger device")
    if expected_start != unit_count:
        raise PlanError(f"partition: stages cover {expected_start} of {unit_count} units "
                        f"(constraint a); the last stage must end at unit {unit_count}")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise PlanError(f"partition: unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")


# --------------------------------------------------------------------------------------
# Exact DP over a fixed device order


def _range_max(values: np.ndarray) -> np.ndarray:
    """table[i, j] = max(values[i:j]) for i < j (0 elsewhere)."""
    count = len(values)
    table = np.zeros((count + 1, count + 1), dtype=values.dtype)
    for i in range(count):
        table[i, i + 1:] = np.maximum.accumulate(values[i:])
    return table


def solve_dp(tables: CostTables, device_order: Sequence[int], objective: str = "bottleneck",
             num_stages: int | None = None) -> PartitionResult | None:
    """Optimal stages over a subsequence of `device_order` (device indices); None if infeasible."""
    _check_objective(objective)
    started = time.perf_counter()
    unit_count = len(tables.unit_names)
    order = list(device_order)
    max_stages = min(len(order), unit_count)
    if num_stages is not None and num_stages > max_stages:
        return None
    combine = np.maximum if objective == "bottleneck" else np.add

    prefix_compute = np.vstack([np.zeros(len(tables.slots)), np.cumsum(tables.compute_s, axis=0)])
    # interior_join[i', i] = joins of the cuts inside units [i', i): cuts i'..i-2
    prefix_join = np.vstack([np.zeros(len(tables.slots)), np.cumsum(tables.join_s, axis=0)])  # [U, K]
    positions = np.arange(unit_count + 1)
    interior_join = (prefix_join[np.clip(positions - 1, 0, unit_count - 1)][None, :, :]
                     - prefix_join[np.clip(positions, 0, unit_count - 1)][:, None, :])
    memory_need = tables.range_weight_bytes() + _range_max(tables.memory_max_bytes)
    lower = np.tril(np.ones((unit_count + 1, unit_count + 1), dtype=bool))  # i' >= i: no stage

    stage_cost, stage_slot = [], []  # per order position: [i', i] -> seconds / best slot
    for device in order:
        slots = np.flatnonzero(tables.slot_device == device)
        per_slot = (prefix_compute[None, :, slots] - prefix_compute[:, None, slots]
                    + interior_join[:, :, slots] + tables.stage_overhead_s[slots][None, None, :])
        best = per_slot.argmin(axis=2)
        cost = np.take_along_axis(per_slot, best[..., None], axis=2)[..., 0]
        cost[(memory_need > tables.device_memory_bytes[device]) | lower] = np.inf
        stage_cost.append(cost)
        stage_slot.append(slots[best])

    # Boundary arrays indexed by cut position i' (the cut after unit i'-1; 0 and U: none) and
    # codec. A stage [i', i) pays the decode of its incoming cut i' and the encode of its
    # outgoing cut i, so the DP state carries the outgoing codec.
    codec_count = len(tables.codec_names)

    def by_position(values, edge):
        return np.vstack([np.full((1, codec_count), edge), values.astype(float), np.full((1, codec_count), edge)])

    wire = by_position(tables.codec_wire_bytes, 0.0)
    encode = by_position(tables.codec_encode_s, 0.0)
    decode = by_position(tables.codec_decode_s, 0.0)
    usable = by_position(tables.codec_allowed, False).astype(bool)
    usable[unit_count, 0] = True  # the last stage sends nothing: one state, codec 0
    encode_cost = np.where(usable, encode, np.inf)  # [i, k_out]

    inf = np.inf
    shape = (max_stages + 1, len(order), unit_count + 1, codec_count)
    best_value = np.full(shape, inf)
    parent = np.full(shape + (3,), -1, dtype=np.int64)  # (prev position, i', k_in)
    codec_scale = tables.codec_time_scale  # per device: codec times are the host's times x this
    for j in range(len(order)):
        best_value[1, j] = stage_cost[j][0][:, None] + encode_cost * codec_scale[order[j]]
    columns = np.arange(unit_count + 1)
    for count in range(2, max_stages + 1):
        for j in range(len(order)):
            for prev in range(j):
                a, b = order[prev], order[j]
                for k_in in range(codec_count):
                    link = tables.link_latency_s[a, b] + wire[:, k_in] / tables.link_bandwidth[a, b]
                    head = combine(best_value[count - 1, prev, :, k_in], link)  # over i'
                    incoming = stage_cost[j] + decode[:, k_in][:, None] * codec_scale[b]  # [i', i]
                    for k_out in range(codec_count):
                        candidate = combine(head[:, None],
                                            incoming + encode_cost[:, k_out][None, :] * codec_scale[b])
                        split = candidate.argmin(axis=0)
                        value = candidate[split, columns]
                        current = best_value[count, j, :, k_out]
                        better = value < current
                        current[better] = value[better]
                        parent[count, j, better, k_out] = np.stack(
                            [np.full(better.sum(), prev), split[better], np.full(better.sum(), k_in)], axis=1)

    counts = [num_stages] if num_stages is not None else list(range(1, max_stages + 1))
    finals = [(best_value[c, j, unit_count, 0], c, j) for c in counts for j in range(len(order))]
    value, count, j = min(finals, key=lambda item: (item[0], item[1]))
    if not np.isfinite(value):
        return None
    stages, end, codec = [], unit_count, 0
    while count >= 1:
        if count == 1:
            start, prev, incoming_codec = 0, -1, 0
        else:
            prev, start, incoming_codec = parent[count, j, end, codec]
        stages.append(StageAssignment(int(stage_slot[j][start, end]), int(start), int(end), int(codec)))
        end, j, count, codec = int(start), int(prev), count - 1, int(incoming_codec)
    stages.reverse()
    evaluated = evaluate(tables, stages).value(objective)
    return PartitionResult(tuple(stages), objective, evaluated, evaluated, 0.0, "OPTIMAL", "dp",
                           time.perf_counter() - started)


# --------------------------------------------------------------------------------------
# CP-SAT over free device order


def _interchangeable_classes(tables: CostTables) -> list[list[int]]:
    """Groups of devices that can swap places without changing any cost (symmetry breaking)."""
    device_count = len(tables.device_names)
    signature = []
    for d in range(device_count):
        slots = np.flatnonzero(tables.slot_device == d)
        signature.append((int(tables.device_memory_bytes[d]),
                          tables.compute_s[:, slots].tobytes(), tables.join_s[:, slots].tobytes(),
                          tables.stage_overhead_s[slots].tobytes()))
    classes: list[list[int]] = []
    for d in range(device_count):
        for group in classes:
            if all(_swappable(tables, signature, d, other) for other in group):
                group.append(d)
                break
        else:
            classes.append([d])
    return [group for group in classes if len(group) > 1]


def _swappable(tables: CostTables, signature: list, a: int, b: int) -> bool:
    if signature[a] != signature[b]:
        return False
    others = [x for x in range(len(tables.device_names)) if x not in (a, b)]
    return all(
        tables.link_latency_s[a, x] == tables.link_latency_s[b, x]
        and tables.link_bandwidth[a, x] == tables.link_bandwidth[b, x]
        and tables.link_latency_s[x, a] == tables.link_latency_s[x, b]
        and tables.link_bandwidth[x, a] == tables.link_bandwidth[x, b]
        for x in others
    )


def solve_cpsat(tables: CostTables, objective: str = "bottleneck", *, time_limit_s: float = 10.0,
                num_stages: int | None = None, device_order: Sequence[int] | None = None,
                hint: Sequence[StageAssignment] | None = None, workers: int = 2,
                seed: int = 0) -> PartitionResult | None:
    """Solve the partition ILP with CP-SAT; None if proven infeasible."""
    from ortools.sat.python import cp_model

    _check_objective(objective)
    started = time.perf_counter()
    unit_count, slot_count = tables.compute_s.shape
    device_count = len(tables.device_names)
    stage_count = min(device_count, unit_count)
    if num_stages is not None:
        if num_stages > stage_count:
            return None
        stage_count = num_stages

    # Integer scaling: times to ~TIME_STEPS steps over the largest possible objective.
    wire_bytes = tables.codec_wire_bytes.astype(float)  # [cut, codec]
    codec_time = (tables.codec_encode_s + tables.codec_decode_s) * tables.codec_time_scale.max(initial=1.0)
    off_diagonal = ~np.eye(device_count, dtype=bool)
    worst_link = (float((tables.link_latency_s[off_diagonal]).max(initial=0.0))
                  + float(wire_bytes.max(initial=0.0)) / float(tables.link_bandwidth[off_diagonal].min(initial=np.inf)))
    worst_boundary = worst_link + float(codec_time.max(initial=0.0))
    join_added = np.maximum(tables.join_s, 0.0)
    worst_total = (float(tables.compute_s.max(axis=1).sum()) + float(join_added.max(axis=1, initial=0.0).sum())
                   + worst_boundary * max(stage_count - 1, 0)
                   + float(tables.stage_overhead_s.max(initial=0.0)) * stage_count)
    scale = TIME_STEPS / max(worst_total, 1e-12)
    compute_int = np.rint(tables.compute_s * scale).astype(np.int64)
    overhead_int = np.rint(tables.stage_overhead_s * scale).astype(np.int64)
    # join_int[u, k]: the cut after u inside a stage on slot k (row U-1: no cut, 0)
    join_int = np.vstack([np.rint(tables.join_s * scale).astype(np.int64),
                          np.zeros((1, slot_count), dtype=np.int64)])
    # What a unit adds to its stage at least: its compute and its outgoing cut's join where
    # that saves time (a lower bound whether or not the cut lies inside the stage).
    unit_floor = compute_int + np.minimum(join_int, 0)
    # [device, cut, codec]: a stage encodes and decodes at its own device's codec speed
    device_scale = tables.codec_time_scale[:, None, None] * scale
    encode_int = np.rint(tables.codec_encode_s[None] * device_scale).astype(np.int64)
    decode_int = np.rint(tables.codec_decode_s[None] * device_scale).astype(np.int64)
    codecs = [np.flatnonzero(tables.codec_allowed[u]) for u in range(unit_count - 1)]
    # A shared weight leaves each unit's sum and is added once per stage that reads it.
    shared_units = tables.shared_weight_units
    own_bytes = tables.memory_sum_bytes - tables.shared_weight_bytes @ shared_units.astype(np.int64)
    memory_sum = -(-own_bytes // MEMORY_QUANTUM)
    shared_sum = -(-tables.shared_weight_bytes // MEMORY_QUANTUM)
    memory_max = -(-tables.memory_max_bytes // MEMORY_QUANTUM)
    budget = tables.device_memory_bytes // MEMORY_QUANTUM
    horizon = int((compute_int + np.maximum(join_int, 0)).sum(axis=0).max() + overhead_int.max(initial=0)
                  + np.ceil(worst_boundary * scale) * 2 + 1)

    model = cp_model.CpModel()
    in_stage = [[model.NewBoolVar(f"z_u{u}_s{s}") for s in range(stage_count)] for u in range(unit_count)]
    runs_on = [[model.NewBoolVar(f"y_s{s}_k{k}") for k in range(slot_count)] for s in range(stage_count)]
    on_device = [[model.NewBoolVar(f"yd_s{s}_d{d}") for d in range(device_count)] for s in range(stage_count)]
    active = [model.NewBoolVar(f"active_s{s}") for s in range(stage_count)]

    # (a) each unit in exactly one stage.
    for u in range(unit_count):
        model.AddExactlyOne(in_stage[u])
    # (b) contiguity: the stage index starts at 0 and grows by 0 or 1 per unit.
    stage_index = [sum(s * in_stage[u][s] for s in range(stage_count)) for u in range(unit_count)]
    model.Add(stage_index[0] == 0)
    for u in range(unit_count - 1):
        step = stage_index[u + 1] - stage_index[u]
        model.Add(step >= 0)
        model.Add(step <= 1)
    # (d) active stages form a prefix, each runs on one slot, the last unit closes the last
    # active stage (so none is empty), and a device runs at most one stage.
    for s in range(stage_count):
        model.Add(sum(runs_on[s]) == active[s])
        for d in range(device_count):
            model.Add(on_device[s][d] == sum(runs_on[s][k] for k in np.flatnonzero(tables.slot_device == d)))
        if s + 1 < stage_count:
            model.AddImplication(active[s + 1], active[s])
    model.Add(stage_index[unit_count - 1] == sum(active) - 1)
    if num_stages is not None:
        model.Add(sum(active) == num_stages)
    used = [model.NewBoolVar(f"used_d{d}") for d in range(device_count)]
    for d in range(device_count):
        model.Add(sum(on_device[s][d] for s in range(stage_count)) == used[d])
    position = [sum(s * on_device[s][d] for s in range(stage_count)) for d in range(device_count)]

    # (c) memory: weights add up, a shared weight once per stage that reads it (held[w] is
    # 1 if any unit of the stage reads w), activations take the stage's largest.
    for s in range(stage_count):
        peak = model.NewIntVar(0, int(memory_max.max(initial=0)), f"peak_s{s}")
        for u in range(unit_count):
            if memory_max[u]:
                model.Add(peak >= int(memory_max[u])).OnlyEnforceIf(in_stage[u][s])
        weights = sum(int(memory_sum[u]) * in_stage[u][s] for u in range(unit_count))
        for w, readers in enumerate(shared_units):
            held = model.NewBoolVar(f"held_w{w}_s{s}")
            for u in np.flatnonzero(readers):
                model.AddImplication(in_stage[u][s], held)
            weights += int(shared_sum[w]) * held
        for k in range(slot_count):
            model.Add(weights + peak <= int(budget[tables.slot_device[k]])).OnlyEnforceIf(runs_on[s][k])

    # Boundary s (stage s -> s+1) sits at the cut after unit u iff u is the last unit of s;
    # sent[s][u][c] says it goes with codec c (one of the codecs allowed at that cut).
    sent = []
    for s in range(stage_count - 1):
        per_cut = []
        for u in range(unit_count - 1):
            choice = {c: model.NewBoolVar(f"cut_u{u}_s{s}_c{c}") for c in codecs[u]}
            model.AddAtMostOne(choice.values())
            model.AddBoolOr([in_stage[u][s].Not(), in_stage[u + 1][s + 1].Not(), *choice.values()])
            # ... and only then: a stage's join terms subtract its outgoing cut (below).
            for var in choice.values():
                model.AddImplication(var, in_stage[u][s])
                model.AddImplication(var, in_stage[u + 1][s + 1])
            per_cut.append(choice)
        sent.append(per_cut)

    def codec_terms(s, times):
        return [int(times[u, c]) * var for u, choice in enumerate(sent[s]) for c, var in choice.items()]

    # Stage compute time on its slot, plus encoding its outgoing and decoding its incoming
    # boundary. Joins: every unit of the stage adds the join of the cut after it, and the
    # stage's outgoing cut (sent) takes its join back out, leaving the cuts inside it.
    compute = [model.NewIntVar(0, horizon, f"compute_s{s}") for s in range(stage_count)]
    for s in range(stage_count):
        codec_work = {d: sum((codec_terms(s, encode_int[d]) if s + 1 < stage_count else [])
                             + (codec_terms(s - 1, decode_int[d]) if s > 0 else []))
                      for d in range(device_count)}
        for k in range(slot_count):
            outgoing_join = (sum(int(join_int[u, k]) * var for u, choice in enumerate(sent[s])
                                 for var in choice.values() if join_int[u, k])
                             if s + 1 < stage_count else 0)
            model.Add(compute[s] >= sum(int(compute_int[u, k] + join_int[u, k]) * in_stage[u][s]
                                        for u in range(unit_count))
                      - outgoing_join + codec_work[int(tables.slot_device[k])]
                      + int(overhead_int[k])).OnlyEnforceIf(runs_on[s][k])
    # Redundant slot view: unit u runs on slot k. Its load and memory constraints need no
    # enforcement literal, which gives the LP relaxation a far better bound. (The memory
    # one leaves shared weights out: it must stay implied by (c).)
    on_slot = [[model.NewBoolVar(f"x_u{u}_k{k}") for k in range(slot_count)] for u in range(unit_count)]
    for u in range(unit_count):
        model.AddExactlyOne(on_slot[u])
        for s in range(stage_count):
            for k in range(slot_count):
                model.AddBoolOr([in_stage[u][s].Not(), runs_on[s][k].Not(), on_slot[u][k]])
    slot_load = []
    for k in range(slot_count):
        slot_load.append(sum(int(unit_floor[u, k]) * on_slot[u][k] for u in range(unit_count)))
    for d in range(device_count):
        device_slots = np.flatnonzero(tables.slot_device == d)
        model.Add(sum(int(memory_sum[u]) * on_slot[u][k] for u in range(unit_count)
                      for k in device_slots) <= int(budget[d]))
    links = []
    for s in range(stage_count - 1):
        link = model.NewIntVar(0, horizon, f"link_s{s}")
        links.append(link)
        for a in range(device_count):
            for b in range(device_count):
                if a == b:
                    continue
                latency = int(np.rint(tables.link_latency_s[a, b] * scale))
                transfer = np.rint(wire_bytes / tables.link_bandwidth[a, b] * scale).astype(np.int64)
                model.Add(link >= latency + sum(codec_terms(s, transfer))
                          ).OnlyEnforceIf([on_device[s][a], on_device[s + 1][b]])

    if device_order is not None:
        order = list(device_order)
        allowed = set(order)
        for d in range(device_count):
            if d not in allowed:
                model.Add(used[d] == 0)
        for i, j in itertools.combinations(range(len(order)), 2):
            model.Add(position[order[i]] + 1 <= position[order[j]]).OnlyEnforceIf(
                [used[order[i]], used[order[j]]])
    else:
        # Symmetry breaking: interchangeable devices are used in index order.
        for group in _interchangeable_classes(tables):
            for a, b in zip(group, group[1:]):
                model.Add(used[a] >= used[b])
                model.Add(position[a] + 1 <= position[b]).OnlyEnforceIf(used[b])

    # Ties on the objective go to fewer stages (weight below one time step), so equal plans
    # come out the same from run to run; the DP breaks ties the same way.
    tie_weight = stage_count + 1
    if objective == "bottleneck":
        # Redundant bound that tightens the relaxation: the fastest slot of each unit, spread
        # over every stage, and the slowest such unit.
        # (With joins that save time a unit's floor may be below zero: no bound from it.)
        fastest = unit_floor.min(axis=1)
        lower = (int(max(fastest.max(initial=0), -(-int(fastest.sum()) // stage_count)))
                 if fastest.min(initial=0) >= 0 else 0)
        bottleneck = model.NewIntVar(lower, horizon, "bottleneck")
        for var in compute + links + slot_load:
            model.Add(bottleneck >= var)
        model.Minimize(tie_weight * bottleneck + sum(active))
    else:
        model.Minimize(tie_weight * (sum(compute) + sum(links)) + sum(active))

    if hint:
        _add_hint(model, hint, in_stage, runs_on, on_device, on_slot, sent, active, tables)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    status = solver.Solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    bound = (solver.BestObjectiveBound() // tie_weight) / scale
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # No plan in time: report the bound; the caller falls back to its own plan.
        return PartitionResult((), objective, float("inf"), bound, 1.0, solver.StatusName(status),
                               "cp-sat", time.perf_counter() - started)

    stages = []
    for s in range(stage_count):
        if not solver.Value(active[s]):
            break
        slot = next(k for k in range(slot_count) if solver.Value(runs_on[s][k]))
        members = [u for u in range(unit_count) if solver.Value(in_stage[u][s])]
        last = members[-1]
        sends = s < len(sent) and last < unit_count - 1
        codec = next((c for c, var in sent[s][last].items() if solver.Value(var)), 0) if sends else 0
        stages.append(StageAssignment(slot, members[0], last + 1, int(codec)))
    value = evaluate(tables, stages).value(objective)
    return _result(stages, objective, value, bound, solver.StatusName(status), "cp-sat",
                   time.perf_counter() - started)


def _result(stages, objective, value, bound, status, solver, seconds) -> PartitionResult:
    # "OPTIMAL" is proven on integer times; the float value may sit a rounding step above.
    bound = min(bound, value)
    gap = 0.0 if status == "OPTIMAL" else max(0.0, (value - bound) / value if value else 0.0)
    return PartitionResult(tuple(stages), objective, value, bound, gap, status, solver, seconds)


def _add_hint(model, hint, in_stage, runs_on, on_device, on_slot, sent, active, tables) -> None:
    """Start CP-SAT from a known plan: every decision variable gets its value in `hint`."""
    if len(hint) > len(active):
        return
    for s, active_var in enumerate(active):
        stage = hint[s] if s < len(hint) else None
        model.AddHint(active_var, stage is not None)
        for k, var in enumerate(runs_on[s]):
            model.AddHint(var, stage is not None and stage.slot == k)
        for d, var in enumerate(on_device[s]):
            model.AddHint(var, stage is not None and int(tables.slot_device[stage.slot]) == d)
        for u, row in enumerate(in_stage):
            model.AddHint(row[s], stage is not None and stage.start <= u < stage.end)
    for s, per_cut in enumerate(sent):
        for u, choice in enumerate(per_cut):
            for c, var in choice.items():
                model.AddHint(var, s + 1 < len(hint) and hint[s].end - 1 == u and hint[s].codec == c)
    slot_of_unit = {u: stage.slot for stage in hint for u in range(stage.start, stage.end)}
    for u, row in enumerate(on_slot):
        for k, var in enumerate(row):
            model.AddHint(var, slot_of_unit[u] == k)


# --------------------------------------------------------------------------------------
# The pass


def _heuristic_orders(tables: CostTables) -> list[list[int]]:
    """Device orders to seed CP-SAT: fleet order, fastest first, and largest memory first."""
    device_count = len(tables.device_names)
    speed = np.array([tables.compute_s[:, tables.slot_device == d].sum(axis=0).min()
                      for d in range(device_count)])
    orders = [list(range(device_count)), list(np.argsort(speed, kind="stable")),
              list(np.argsort(-tables.device_memory_bytes, kind="stable"))]
    unique = []
    for order in orders:
        order = [int(d) for d in order]
        if order not in unique:
            unique.append(order)
    return unique


def partition(tables: CostTables, objective: str = "bottleneck", *, time_limit_s: float = 10.0,
              num_stages: int | None = None, workers: int = 2) -> PartitionResult:
    """Plan stages with CP-SAT, seeded with the best DP plan over a few device orders."""
    _check_objective(objective)
    device_count = len(tables.device_names)
    if num_stages is not None and not 1 <= num_stages <= min(device_count, len(tables.unit_names)):
        raise PlanError(
            f"partition: asked for {num_stages} stages, but the fleet has {device_count} devices and "
            f"the model {len(tables.unit_names)} units; ask for 1..{min(device_count, len(tables.unit_names))} "
            f"stages, add devices, or use --granularity layer for more units")
    seeds = [r for r in (solve_dp(tables, order, objective, num_stages)
                         for order in _heuristic_orders(tables)) if r is not None]
    best_seed = min(seeds, key=lambda r: r.value_s) if seeds else None
    result = solve_cpsat(tables, objective, time_limit_s=time_limit_s, num_stages=num_stages,
                         hint=best_seed.stages if best_seed else None, workers=workers)
    if result is None:
        raise PlanError(diagnose_infeasible(tables, num_stages))
    if best_seed is not None and best_seed.value_s < result.value_s:
        # CP-SAT ran out of time without matching its starting point: keep the DP plan,
        # with CP-SAT's proven bound (the DP is exact only for its device order).
        result = _result(best_seed.stages, objective, best_seed.value_s, result.bound_s,
                         "FEASIBLE", "dp-seed", result.solve_time_s)
    if not result.stages:
        raise PlanError(
            f"partition: CP-SAT found no plan within {time_limit_s:.1f} s ({result.status}) and no "
            f"heuristic device order fits; raise the time limit (--time-limit) or use a coarser "
            f"granularity")
    validate_assignment(tables, result.stages)
    return result


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 1e9:.2f} GB)"


def diagnose_infeasible(tables: CostTables, num_stages: int | None = None) -> str:
    """Say how many bytes are missing on which device, and what would help."""
    need_units = tables.memory_sum_bytes + tables.memory_max_bytes
    largest = int(np.argmax(tables.device_memory_bytes))
    largest_memory = int(tables.device_memory_bytes[largest])
    fixes = ("add devices or larger ones, use a smaller batch (activations scale with it), "
             "compress boundary tensors, or merge shared layers")
    worst_unit = int(np.argmax(need_units))
    if need_units[worst_unit] > largest_memory:
        return (f"partition: nothing fits: unit {tables.unit_names[worst_unit]!r} alone needs "
                f"{_size(int(need_units[worst_unit]))} but the largest device "
                f"{tables.device_names[largest]!r} has {_size(largest_memory)}: "
                f"{_size(int(need_units[worst_unit]) - largest_memory)} short. Use a device with more "
                f"memory, --granularity layer to split the unit, or a smaller batch")
    # Greedy contiguous fill, largest device first: the overflow left on the last device is
    # what that packing is short by.
    order = list(np.argsort(-tables.device_memory_bytes, kind="stable"))
    if num_stages is not None:
        order = order[:num_stages]
    start = 0
    unit_count = len(tables.unit_names)
    for position, device in enumerate(order):
        budget = int(tables.device_memory_bytes[device])
        end = start
        if position == len(order) - 1:
            end = unit_count
        else:
            while end < unit_count and tables.stage_memory(start, end + 1) <= budget:
                end += 1
        if end == unit_count:
            need = tables.stage_memory(start, end) if end > start else 0
            short = need - budget
            total = tables.stage_memory(0, unit_count)
            fleet_total = int(tables.device_memory_bytes[order].sum())
            overall = (f"at least {_size(total - fleet_total)} short overall"
                       if total > fleet_total else "enough overall, but not in contiguous stages")
            return (f"partition: nothing fits: the model needs {_size(total)} and the "
                    f"{len(order)} device(s) hold {_size(fleet_total)} ({overall}); filled largest "
                    f"device first, the last device {tables.device_names[device]!r} would need "
                    f"{_size(need)} for units {tables.unit_names[start]}..{tables.unit_names[-1]} "
                    f"but has {_size(budget)}: {_size(short)} short. To fix: {fixes}")
        start = end
    return f"partition: nothing fits in {len(order)} stages. To fix: {fixes}"
