"""The partition benchmark in --quick mode: edgeplan's plan is never worse than a baseline.

The baselines (uniform split, parameter-balanced split) are feasible points of the same
problem edgeplan solves, so when they fit in memory the solver's bottleneck is at most
theirs. Slow (captures models and runs CP-SAT): run with `pytest -m slow`.
"""

from pathlib import Path

import pytest

from edgeplan.cli import load_module

BENCH = Path(__file__).resolve().parent.parent / "bench" / "partition.py"


def _load_bench():
    return load_module(BENCH, "edgeplan_bench_partition")  # not "partition": avoid shadowing


@pytest.mark.slow
def test_quick_benchmark_edgeplan_never_worse_than_feasible_baselines(capsys):
    bench = _load_bench()
    rows = bench.main(["--quick", "--time-limit", "10"])
    printed = capsys.readouterr().out

    assert rows, "the benchmark produced no rows"
    assert {r.model for r in rows} == set(bench.QUICK_MODELS)
    assert len(rows) == len(bench.QUICK_MODELS) * len(bench.QUICK_FLEETS)
    assert "edgeplan ms (stages)" in printed and "params-balanced ms" in printed
    for r in rows:
        assert r.model in printed and r.fleet in printed

    for r in rows:
        where = f"{r.model} on {r.fleet}"
        assert r.units >= 1, where
        for name, baseline in (("uniform", r.uniform), ("params-balanced", r.params)):
            assert baseline.stages == min(r.units, _device_count(r.fleet)), where
            if not baseline.fits:
                continue
            assert r.edgeplan is not None, f"{where}: edgeplan found no plan but {name} fits"
            assert r.edgeplan.value_s <= baseline.bottleneck_s * (1 + 1e-9), (
                f"{where}: edgeplan {r.edgeplan.value_s * 1e3:.6f} ms is worse than {name} "
                f"{baseline.bottleneck_s * 1e3:.6f} ms (solver {r.edgeplan.status}, gap {r.edgeplan.gap:.2%})")
    assert bench.regressions(rows) == []


def _device_count(fleet: str) -> int:
    from edgeplan.planner.fleet import load_fleet

    return len(load_fleet(fleet).devices)


def test_balanced_bounds_keep_every_stage_non_empty():
    bench = _load_bench()
    # One huge unit first: the target would put every cut at 1, but each stage needs a unit.
    assert bench.balanced_bounds([100, 1, 1, 1], 3) == [0, 1, 2, 4]
    assert bench.balanced_bounds([1, 1, 1, 1, 1, 1], 3) == [0, 2, 4, 6]
    assert bench.balanced_bounds([5], 1) == [0, 1]
