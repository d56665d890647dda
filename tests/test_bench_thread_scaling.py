"""bench/thread_scaling.py on one aligned pair: twins that differ only in size, timed on
both backends in every timing. Slow (profiles on this machine): run with `pytest -m slow`."""

from pathlib import Path

import numpy as np
import pytest

from edgeplan.cli import load_module

BENCH = Path(__file__).resolve().parent.parent / "bench" / "thread_scaling.py"


@pytest.mark.slow
def test_one_pair_is_timed_as_twins_in_every_timing(capsys, monkeypatch):
    bench = load_module(BENCH, "edgeplan_bench_thread_scaling")
    descriptions, ratios = bench.speedups(samples=1, timings=2)
    first, twin = (d.split() for d in descriptions)
    assert first[:4] == twin[:4] and first[5:] == twin[5:]  # channels, kernel, stride, activation
    assert abs(int(first[4].removesuffix("px")) - int(twin[4].removesuffix("px"))) == 4 * int(first[3][1:])
    assert len(ratios) == 2 and all(r.shape == (2,) for r in ratios)
    # two threads never take twice one thread's time, nor less than half of it
    assert all(np.all((r > 0.4) & (r < 2.0)) for r in ratios)
    # the report of these very timings (profiling them again would take as long)
    monkeypatch.setattr(bench, "speedups", lambda samples, timings: (descriptions, ratios))
    assert bench.main(["--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{ratios[0][0]:.3f} {ratios[0][1]:.3f}   {ratios[1][0]:.3f} {ratios[1][1]:.3f}" in printed
    assert "one unit, timing to timing" in printed and "twin to twin, same timing" in printed
    with pytest.raises(SystemExit):
        bench.main(["--timings", "1"])
