"""Partition solver: CP-SAT against the exact DP and brute force on seeded random instances."""

import dataclasses
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeplan.errors import PlanError
from edgeplan.passes.partition import (
    StageAssignment,
    evaluate,
    partition,
    solve_cpsat,
    solve_dp,
    validate_assignment,
)
from edgeplan.planner.cost import CostTables


def random_tables(seed: int, max_units: int = 8, max_devices: int = 4, tight: bool = False,
                  min_units: int = 1, min_devices: int = 1, codecs: int = 1,
                  overhead: bool = False, codec_scale: bool = False, joins: bool = False) -> CostTables:
    rng = np.random.default_rng(seed)
    unit_count = int(rng.integers(min_units, max_units + 1))
    device_count = int(rng.integers(min_devices, max_devices + 1))
    slots, slot_device = [], []
    for d in range(device_count):
        for b in range(int(rng.integers(1, 3))):
            slots.append((f"dev{d}", f"b{b}"))
            slot_device.append(d)
    speed = rng.uniform(0.2, 5.0, size=len(slots))
    work = rng.uniform(1e-3, 2e-2, size=unit_count)
    compute = work[:, None] / speed[None, :]
    weights = rng.integers(1, 100, size=unit_count) * 1_000_000
    peak = rng.integers(1, 20, size=unit_count) * 1_000_000
    total = int(weights.sum() + peak.max())
    low, high = (0.2, 0.7) if tight else (0.4, 1.5)
    memory = (rng.uniform(low, high, size=device_count) * total).astype(np.int64)
    bandwidth = rng.uniform(5e7, 1e9, size=(device_count, device_count))
    bandwidth = np.triu(bandwidth, 1) + np.triu(bandwidth, 1).T
    np.fill_diagonal(bandwidth, np.inf)
    latency = rng.uniform(1e-4, 5e-3, size=(device_count, device_count))
    latency = np.triu(latency, 1) + np.triu(latency, 1).T
    np.fill_diagonal(latency, 0.0)
    cut_bytes = rng.integers(1, 50, size=max(unit_count - 1, 0)) * 1_000_000
    codec_arrays = {}
    if codecs > 1:
        # Codec 0 is raw; the others shrink the cut and cost encode/decode time; some are
        # over the error budget at some cuts.
        ratio = np.hstack([np.ones((len(cut_bytes), 1)), rng.uniform(0.1, 0.7, size=(len(cut_bytes), codecs - 1))])
        codec_time = np.hstack([np.zeros((len(cut_bytes), 1)),
                                rng.uniform(1e-4, 4e-3, size=(len(cut_bytes), codecs - 1))])
        allowed = np.hstack([np.ones((len(cut_bytes), 1), dtype=bool), rng.random((len(cut_bytes), codecs - 1)) < 0.7])
        codec_arrays = dict(
            codec_names=("raw", *(f"c{i}" for i in range(1, codecs))),
            codec_wire_bytes=(cut_bytes[:, None] * ratio).astype(np.int64),
            codec_encode_s=codec_time * 0.6, codec_decode_s=codec_time * 0.4, codec_allowed=allowed,
            codec_time_scale=rng.uniform(0.2, 3.0, size=device_count) if codec_scale else None)
    return CostTables(
        unit_names=tuple(f"u{i}" for i in range(unit_count)),
        device_names=tuple(f"dev{d}" for d in range(device_count)),
        slots=tuple(slots),
        compute_s=compute,
        memory_sum_bytes=weights.astype(np.int64),
        memory_max_bytes=peak.astype(np.int64),
        cut_bytes=cut_bytes,
        device_memory_bytes=memory,
        link_latency_s=latency,
        link_bandwidth=bandwidth,
        slot_device=np.array(slot_device),
        stage_overhead_s=rng.uniform(0, 8e-3, size=len(slots)) if overhead else None,
        # A cut inside a stage saves up to half the smaller neighbour's time or costs up to
        # a quarter of it (fusion across the cut vs weights evicting each other).
        join_s=(rng.uniform(-0.5, 0.25, size=(len(cut_bytes), len(slots)))
                * np.minimum(compute[:-1], compute[1:])) if joins else None,
        **codec_arrays,
    )


def tolerance(tables: CostTables) -> float:
    # CP-SAT works on times rounded to 1e-6 of the largest value: allow that per term.
    worst = float(tables.compute_s.max(axis=1).sum()) * 4
    return 1e-5 * worst * (len(tables.unit_names) + 2)


def brute_force(tables: CostTables, objective: str) -> float | None:
    """Optimum over every device order, by the DP on each permutation."""
    values = []
    for order in itertools.permutations(range(len(tables.device_names))):
        result = solve_dp(tables, order, objective)
        if result is not None:
            values.append(result.value_s)
    return min(values) if values else None


@pytest.mark.parametrize("objective", ["bottleneck", "latency"])
def test_cpsat_matches_dp_on_fixed_order(objective):
    agreed = infeasible = 0
    for seed in range(300):
        tables = random_tables(seed, tight=seed % 5 == 0, overhead=seed % 3 == 1)
        order = list(np.random.default_rng(seed + 1000).permutation(len(tables.device_names)))
        dp = solve_dp(tables, order, objective)
        cp = solve_cpsat(tables, objective, device_order=order, time_limit_s=20, workers=1)
        if dp is None:
            assert cp is None, f"seed {seed}: DP says infeasible, CP-SAT found {cp}"
            infeasible += 1
            continue
        assert cp is not None and cp.status == "OPTIMAL", f"seed {seed}"
        validate_assignment(tables, cp.stages)
        assert abs(cp.value_s - dp.value_s) <= tolerance(tables), (seed, cp, dp)
        agreed += 1
    assert agreed >= 200 and infeasible >= 1  # both kinds of instance were exercised


def test_stage_overhead_counts_once_per_stage():
    """A per-run cost on a slot is paid once by each stage there, not once per unit."""
    tables = random_tables(3, min_units=4, max_units=4, min_devices=2, max_devices=2)
    with_overhead = dataclasses.replace(tables, stage_overhead_s=np.full(len(tables.slots), 0.05))
    stages = solve_dp(tables, [0, 1], "latency").stages
    plain, extra = evaluate(tables, stages), evaluate(with_overhead, stages)
    assert np.allclose(np.array(extra.compute_s) - np.array(plain.compute_s), 0.05)
    # a big enough per-stage cost makes one stage the best plan
    heavy = dataclasses.replace(tables, stage_overhead_s=np.full(len(tables.slots), 10.0))
    assert len(solve_cpsat(heavy, "latency", time_limit_s=20, workers=1).stages) == 1
    assert CostTables.from_dict(json.loads(json.dumps(with_overhead.to_dict()))) == with_overhead


@pytest.mark.parametrize("objective", ["bottleneck", "latency"])
def test_cpsat_free_order_matches_brute_force(objective):
    for seed in range(40):
        tables = random_tables(seed + 500, max_units=6, max_devices=4, overhead=seed % 3 == 1)
        expected = brute_force(tables, objective)
        result = solve_cpsat(tables, objective, time_limit_s=20, workers=1)
        if expected is None:
            assert result is None
            continue
        assert result.status == "OPTIMAL"
        assert abs(result.value_s - expected) <= tolerance(tables), seed
        assert result.gap == 0.0 and result.bound_s <= result.value_s + 1e-12


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), objective=st.sampled_from(["bottleneck", "latency"]))
def test_planned_memory_never_exceeds_budget(seed, objective):
    tables = random_tables(seed, tight=True)
    try:
        result = partition(tables, objective, time_limit_s=10)
    except PlanError as error:
        assert "nothing fits" in str(error) and "short" in str(error)
        assert all(solve_dp(tables, order, objective) is None
                   for order in itertools.permutations(range(len(tables.device_names))))
        return
    costs = evaluate(tables, result.stages)
    for stage, memory in zip(result.stages, costs.memory_bytes):
        assert memory <= tables.device_memory_bytes[tables.slot_device[stage.slot]]


def every_plan(tables: CostTables, objective: str) -> float | None:
    """Optimum by enumeration: every split into contiguous stages, every slot per stage
    (distinct devices), each scored by `evaluate` (raw boundaries only)."""
    unit_count, best = len(tables.unit_names), None
    for cuts in itertools.product([False, True], repeat=unit_count - 1):
        bounds = [0] + [u + 1 for u, cut in enumerate(cuts) if cut] + [unit_count]
        ranges = list(zip(bounds, bounds[1:]))
        for slots in itertools.product(range(len(tables.slots)), repeat=len(ranges)):
            stages = [StageAssignment(k, a, b) for k, (a, b) in zip(slots, ranges)]
            try:
                validate_assignment(tables, stages)
            except PlanError:
                continue
            value = evaluate(tables, stages).value(objective)
            best = value if best is None else min(best, value)
    return best


def test_joins_count_the_cuts_inside_a_stage():
    """Hand numbers: a stage of units [0, 3) pays the joins of cuts 0 and 1, not cut 2."""
    tables = random_tables(3, min_units=4, max_units=4, min_devices=2, max_devices=2)
    join = np.zeros((3, len(tables.slots)))
    join[:, 0] = [-0.001, 0.002, 0.5]
    joined = dataclasses.replace(tables, join_s=join)
    stages = [StageAssignment(0, 0, 3), StageAssignment(len(tables.slots) - 1, 3, 4)]
    plain, extra = evaluate(tables, stages), evaluate(joined, stages)
    assert np.allclose(np.array(extra.compute_s) - np.array(plain.compute_s), [0.001, 0.0])
    assert CostTables.from_dict(json.loads(json.dumps(joined.to_dict()))) == joined


@pytest.mark.parametrize("objective", ["bottleneck", "latency"])
def test_joins_match_enumeration(objective):
    """With signed joins: the DP (every order) and CP-SAT against enumerating every plan."""
    saved = 0
    for seed in range(40):
        tables = random_tables(seed + 9000, max_units=5, max_devices=3, overhead=seed % 2 == 0,
                               joins=True)
        expected = every_plan(tables, objective)
        result = solve_cpsat(tables, objective, time_limit_s=20, workers=1)
        if expected is None:
            assert result is None and brute_force(tables, objective) is None
            continue
        assert abs(brute_force(tables, objective) - expected) <= 1e-12, seed
        assert result.status == "OPTIMAL"
        assert abs(result.value_s - expected) <= tolerance(tables), seed
        assert result.bound_s <= result.value_s + 1e-12
        saved += any(s.end - s.start > 1 for s in result.stages)
    assert saved >= 10  # plans with cuts inside stages were exercised


@pytest.mark.parametrize("objective", ["bottleneck", "latency"])
def test_joins_with_codecs_match_dp(objective):
    for seed in range(30):
        tables = random_tables(seed + 9500, max_units=7, max_devices=3, codecs=3, joins=True)
        order = list(range(len(tables.device_names)))
        dp = solve_dp(tables, order, objective)
        cp = solve_cpsat(tables, objective, device_order=order, time_limit_s=20, workers=1)
        assert (dp is None) == (cp is None), seed
        if dp is not None:
            assert abs(cp.value_s - dp.value_s) <= tolerance(tables), (seed, cp, dp)


def test_num_stages_is_exact():
    tables = random_tables(7, max_units=8, max_devices=4)
    for count in range(1, min(len(tables.unit_names), len(tables.device_names)) + 1):
        result = solve_cpsat(tables, num_stages=count, time_limit_s=10, workers=1)
        dp_best = min((r.value_s for order in itertools.permutations(range(len(tables.device_names)))
                       if (r := solve_dp(tables, order, num_stages=count)) is not None), default=None)
        if dp_best is None:
            assert result is None
            continue
        assert len(result.stages) == count
        assert abs(result.value_s - dp_best) <= tolerance(tables)


def hand_tables(memory=(20_000_000, 20_000_000)) -> CostTables:
    """Four units, two devices: device 1 is twice as fast; the link is slow."""
    return CostTables(
        unit_names=("embed", "block0", "block1", "head"),
        device_names=("slow", "fast"),
        slots=(("slow", "cpu"), ("fast", "gpu")),
        compute_s=np.array([[0.002, 0.001], [0.010, 0.005], [0.010, 0.005], [0.004, 0.002]]),
        memory_sum_bytes=np.array([2, 3, 3, 2]) * 1_000_000,
        memory_max_bytes=np.array([1, 1, 1, 1]) * 1_000_000,
        cut_bytes=np.array([1_000_000, 1_000_000, 1_000_000]),
        device_memory_bytes=np.array(memory, dtype=np.int64),
        link_latency_s=np.array([[0.0, 0.001], [0.001, 0.0]]),
        link_bandwidth=np.array([[np.inf, 1e9], [1e9, np.inf]]),
        slot_device=np.array([0, 1]),
    )


def test_hand_instance_numbers():
    tables = hand_tables()
    result = partition(tables, time_limit_s=5)
    # One stage on the fast device: 13 ms. Slow first: [embed, block0 | block1, head] gives
    # max(12, 2, 7) = 12 ms. Fast first: [embed..block1 | head] gives max(11, 2, 4) = 11 ms.
    assert result.stages == (StageAssignment(1, 0, 3), StageAssignment(0, 3, 4))
    assert result.value_s == pytest.approx(0.011)
    latency = partition(tables, "latency", time_limit_s=5)
    assert latency.stages == (StageAssignment(1, 0, 4),)
    assert latency.value_s == pytest.approx(0.013)


def test_infeasible_names_device_and_bytes():
    tables = hand_tables(memory=(6_000_000, 5_000_000))
    with pytest.raises(PlanError, match=r"1000000 bytes \(0.00 GB\) short") as info:
        partition(tables, time_limit_s=5)
    message = str(info.value)
    assert "'slow'" in message or "'fast'" in message
    assert "add devices" in message


def test_unit_too_large_for_any_device():
    tables = hand_tables(memory=(3_000_000, 3_500_000))
    with pytest.raises(PlanError, match=r"unit .block0. alone needs 4000000 bytes .* 500000 bytes \(0.00 GB\) short"):
        partition(tables, time_limit_s=5)


def test_validate_rejects_shared_device_and_gaps():
    tables = hand_tables()
    with pytest.raises(PlanError, match="constraint d"):
        validate_assignment(tables, [StageAssignment(0, 0, 2), StageAssignment(0, 2, 4)])
    with pytest.raises(PlanError, match="constraint b"):
        validate_assignment(tables, [StageAssignment(0, 0, 1), StageAssignment(1, 2, 4)])
    with pytest.raises(PlanError, match="constraint a"):
        validate_assignment(tables, [StageAssignment(0, 0, 2)])


def test_out_of_time_keeps_the_dp_plan():
    tables = random_tables(11, min_units=40, max_units=40, min_devices=8, max_devices=8)
    fleet_order = solve_dp(tables, range(8))
    result = partition(tables, time_limit_s=0.01)
    validate_assignment(tables, result.stages)
    assert result.value_s <= fleet_order.value_s + tolerance(tables)
    assert 0.0 <= result.gap <= 1.0 and result.bound_s <= result.value_s


@pytest.mark.parametrize("objective", ["bottleneck", "latency"])
def test_codec_choice_matches_dp_and_brute_force(objective):
    """Cut and codec chosen together: CP-SAT against the DP (fixed order) and all orders."""
    compressed = 0
    for seed in range(80):
        # odd seeds: every device encodes and decodes at its own speed
        tables = random_tables(seed + 7000, max_units=7, max_devices=3, codecs=3, codec_scale=seed % 2 == 1)
        order = list(range(len(tables.device_names)))
        dp = solve_dp(tables, order, objective)
        cp = solve_cpsat(tables, objective, device_order=order, time_limit_s=20, workers=1)
        assert (dp is None) == (cp is None), seed
        if dp is None:
            continue
        validate_assignment(tables, cp.stages)
        assert abs(cp.value_s - dp.value_s) <= tolerance(tables), (seed, cp, dp)
        free = solve_cpsat(tables, objective, time_limit_s=20, workers=1)
        assert abs(free.value_s - brute_force(tables, objective)) <= tolerance(tables), seed
        compressed += any(stage.codec for stage in cp.stages[:-1])
    assert compressed >= 10  # codecs were actually chosen, not just raw


def slow_link_int8_tables() -> CostTables:
    """hand_tables over a 50 MB/s link, with int8 (4x smaller, 0.2 ms encode, 0.1 ms decode)."""
    slow = dataclasses.replace(hand_tables(), link_bandwidth=np.array([[np.inf, 5e7], [5e7, np.inf]]))
    return dataclasses.replace(
        slow, codec_names=("raw", "int8"),
        codec_wire_bytes=np.stack([slow.cut_bytes, slow.cut_bytes // 4], axis=1),
        codec_encode_s=np.array([[0.0, 0.0002]] * 3), codec_decode_s=np.array([[0.0, 0.0001]] * 3),
        codec_allowed=np.ones((3, 2), dtype=bool))


def test_compression_pays_on_a_slow_link():
    compressed = slow_link_int8_tables()
    raw = partition(dataclasses.replace(compressed, codec_allowed=np.array([[True, False]] * 3)),
                    time_limit_s=5)
    result = partition(compressed, time_limit_s=5)
    # Raw: a boundary costs 1 ms + 1 MB at 50 MB/s = 21 ms, so one stage on the fast device
    # (13 ms) wins. int8 sends 250 kB (6 ms): the fast-first split [embed..block1 | head]
    # takes max(11 + 0.2 encode, 6, 4 + 0.1 decode) = 11.2 ms.
    assert raw.value_s == pytest.approx(0.013)
    assert len(result.stages) == 2 and result.stages[0].codec == 1
    assert result.value_s == pytest.approx(0.011 + 0.0002)


def test_codec_time_is_charged_at_each_device_speed():
    """The sender encodes on its own core, the receiver decodes on its own: each codec time is
    the host's times that device's codec_time_scale."""
    compressed = slow_link_int8_tables()
    # The fast device's core encodes 5x slower than the host: 11 + 5 x 0.2 = 12 ms, still
    # below the 13 ms of one stage.
    sender_slow = dataclasses.replace(compressed, codec_time_scale=np.array([1.0, 5.0]))
    for result in (partition(sender_slow, time_limit_s=5), solve_dp(sender_slow, [1, 0])):
        assert result.stages[0].codec == 1 and result.value_s == pytest.approx(0.012)
        assert evaluate(sender_slow, result.stages).compute_s == pytest.approx((0.012, 0.0041))
    assert sender_slow.boundary_s(2, 1, 1, 0) == pytest.approx((0.001, 0.006, 0.0001))
    # The slow device decodes 100x slower: 4 + 10 ms > 13 ms, so one stage and no codec.
    receiver_slow = dataclasses.replace(compressed, codec_time_scale=np.array([100.0, 1.0]))
    result = partition(receiver_slow, time_limit_s=5)
    assert result.stages == (StageAssignment(1, 0, 4),) and result.value_s == pytest.approx(0.013)
    assert CostTables.from_dict(json.loads(json.dumps(sender_slow.to_dict()))) == sender_slow
