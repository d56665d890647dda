"""bench/predictor.py's continuous-learning measure and its pairing of second timings, on
the committed xeon16 records (as this host's) with stages made up from their units: every
stage runs 1.25x the sum of its units, which no unit record shows, so only a recorded run
can teach it."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgeplan.cli import load_module
from edgeplan.errors import EdgeplanError
from edgeplan.planner.predictor import Predictor
from edgeplan.planner.profile import ProfileStore, combine_features

ROOT = Path(__file__).resolve().parent.parent
XEON16 = ROOT / "bench" / "data" / "xeon16"
STAGE_SLOWDOWN = 1.25


@pytest.fixture(scope="module")
def bench():
    return load_module(ROOT / "bench" / "predictor.py", "edgeplan_bench_predictor")


def as_host(name: str):
    return [dataclasses.replace(r, device="host") for r in ProfileStore(XEON16 / name).load()]


def made_up_stages(bench, units, splits_of):
    """A stage record per multi-unit stage of the splits: its units' summed time x STAGE_SLOWDOWN."""
    stages = []
    for model, splits in splits_of.items():
        for backend in bench.BACKENDS:
            rows = sorted((r for r in units if r.model == model and r.backend == backend),
                          key=lambda r: r.unit_index)
            for split in splits:
                for index in range(split[-1] + 1):
                    inside = [r for r, s in zip(rows, split) if s == index]
                    if len(inside) < 2:
                        continue
                    seconds = STAGE_SLOWDOWN * sum(r.time_s for r in inside)
                    parts = tuple(r.features for r in inside)
                    stages.append(dataclasses.replace(
                        inside[0], unit=bench.stage_label([r.unit for r in inside]), unit_index=index,
                        features=combine_features(parts), parts=parts, median_s=seconds, quiet_s=seconds))
    return stages


def test_a_recorded_run_teaches_the_stages_of_other_splits(bench):
    store, units = as_host("store.jsonl"), as_host("heldout.jsonl")
    counts = {m: len({r.unit for r in units if r.model == m}) for m in {r.model for r in units}}
    splits_of = {m: [bench.balanced_split(np.ones(n), stages) for stages in (2, 3)] for m, n in counts.items()}
    measured = units + made_up_stages(bench, units, splits_of)
    # timed a second time 2 % faster: the run is taught in one timing and judged in the other
    measured += [dataclasses.replace(r, model=r.model + "-repeat", median_s=0.98 * r.median_s,
                                     quiet_s=0.98 * r.quiet_s) for r in measured]
    units, stages, again = bench.split_records(measured, splits_of)
    assert len(stages) == 2 * sum(2 + 3 for _ in counts)  # both backends; no one-unit stage here
    for backend, (before, after, run_stages) in bench.after_one_run(Predictor.fit(store), store, units,
                                                                    stages, again, splits_of).items():
        # each split recorded once in each timing, the other one's stages judged in the other
        # timing: 5 stages per model and direction, twice
        assert len(before) == len(after) == 2 * sum(2 + 3 for _ in counts)
        # the 2-stage run judges the 3 stages of the other split, and the other way round
        assert sorted(set(run_stages)) == [2, 3] and (run_stages == 2).sum() == 2 * 3 * len(counts)
        assert np.median(np.abs(before)) > 0.12  # the slowdown is news to the unit records
        assert np.median(np.abs(after)) < 0.5 * np.median(np.abs(before))


def test_second_timings_pair_with_their_first_by_name(bench):
    first = as_host("heldout.jsonl")
    # the same records as their own second timing, in another order: every pair is one record
    a, b = bench.paired(first, [dataclasses.replace(r, model=r.model + "-repeat") for r in reversed(first)])
    assert len(a) == len(first) == 2 * 22
    assert (bench.noise_floor(a, b) == 0).all()
    # the real second timing: a pair for every unit, and not the same times
    a, b = bench.paired(first, [dataclasses.replace(r, model=r.model + "-repeat")
                                for r in as_host("heldout_again.jsonl")])
    assert len(a) == len(first) and np.median(np.abs(bench.noise_floor(a, b))) > 0


def test_refeature_recomputes_features_from_the_rebuilt_models(bench):
    """A store profiled before a feature changed takes this version's features: each record
    its unit's, a stage record its units' as parts, a second timing its model's; the
    measurements stay."""
    cnn = [r for r in as_host("heldout.jsonl") if r.model == "sep-cnn-64" and r.backend == "cpu1"]
    norm = [r for r in as_host("store.jsonl") if r.model == "layers-norm" and r.backend == "cpu1"][:2]
    stale = [dataclasses.replace(r, features={**r.features, "flops": -1.0}) for r in cnn[:3] + norm]
    first, second = stale[:2]
    stage = dataclasses.replace(first, unit=f"{first.unit}..{second.unit}",
                                parts=(first.features, second.features),
                                features=combine_features((first.features, second.features)))
    again = dataclasses.replace(stale[2], model="sep-cnn-64-repeat")
    out = bench.refeature(stale + [stage, again], samples=24)

    expected = {(name, u.name): bench.unit_features(u) for name, build in
                (("sep-cnn-64", dict(bench.held_out_models())["sep-cnn-64"]),
                 ("layers-norm", lambda: next(bench.layer_space(samples=24, seed=0, families=("norm",)))[1:3]))
                for u in bench.units_of(*build())}
    assert [r.features for r in out[:5]] == [expected[(r.model, r.unit)] for r in stale]
    assert all(r.features["flops"] >= 0 for r in out)
    assert out[5].parts == (expected[("sep-cnn-64", first.unit)], expected[("sep-cnn-64", second.unit)])
    assert out[5].features == combine_features(out[5].parts)
    assert out[6].features == expected[("sep-cnn-64", again.unit)] and out[6].model == "sep-cnn-64-repeat"
    assert [r.time_s for r in out] == [r.time_s for r in stale + [stage, again]]
    with pytest.raises(EdgeplanError, match="cannot rebuild model 'mystery'"):
        bench.refeature([dataclasses.replace(first, model="mystery")], samples=24)
    # a layer space drawn otherwise than the one timed: its measurements are not its units'
    with pytest.raises(EdgeplanError, match="layers-norm layers.0 holds 1 bytes of weights in the store"):
        bench.refeature([dataclasses.replace(norm[0], features={**norm[0].features, "param_bytes": 1.0})],
                        samples=24)
