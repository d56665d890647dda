"""bench/plan_quality.py's split search against brute force, and its missing-store error."""

import itertools
import random
from pathlib import Path

import pytest

from edgeplan.cli import load_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return load_module(ROOT / "bench" / "plan_quality.py", "edgeplan_bench_plan_quality")


def test_bottleneck_split_finds_the_cheapest_slowest_stage(bench):
    rng = random.Random(0)
    for _ in range(30):
        count, stages = rng.randint(2, 8), rng.randint(1, 4)
        if stages > count:
            continue
        times = [rng.uniform(1, 10) for _ in range(count)]
        # a stage costs its units plus 3 + its index (later stages are slower devices),
        # and 20 % more with 3+ units
        cost = lambda s, a, b: (sum(times[a:b]) + 3 + s) * (1.2 if b - a >= 3 else 1.0)  # noqa: E731
        split = bench.bottleneck_split(count, stages, cost)
        assert len(split) == count and split == sorted(split) and set(split) == set(range(stages))

        def bottleneck(bounds):
            edges = [0, *bounds, count]
            return max(cost(s, a, b) for s, (a, b) in enumerate(zip(edges, edges[1:])))
        ends = [i + 1 for i in range(count - 1) if split[i] != split[i + 1]]
        brute = min(bottleneck(c) for c in itertools.combinations(range(1, count), stages - 1))
        assert bottleneck(ends) == pytest.approx(brute)


def test_plan_quality_names_the_missing_store(bench, tmp_path, capsys):
    assert bench.main(["--store", str(tmp_path / "none.jsonl")]) == 2
    assert "run `.venv/bin/python bench/predictor.py --store" in capsys.readouterr().err
