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


def test_phases_find_the_slow_spells_of_two_threads(capsys):
    bench = load_module(BENCH, "edgeplan_bench_thread_scaling")
    # two modes, as this VM's reference ran: 0.59 and 0.76 of its 1-thread time
    ratios = np.array([0.59, 0.60, 0.76, 0.77, 0.76, 0.58, 0.59, 0.75, 0.60, 0.59])
    slow, spells = bench.slow_spells(ratios)
    assert slow.tolist() == [False, False, True, True, True, False, False, True, False, False]
    assert spells == [3, 1]
    bench.print_phases(ratios, window_s=0.1)
    printed = capsys.readouterr().out
    assert "10 window pairs of 0.2 s" in printed
    assert "in 40 % of windows (median 0.76)" in printed
    assert "2 slow spell(s): median 0.4 s, longest 0.6 s" in printed


def test_phase_ratios_time_both_thread_counts_in_every_window(capsys):
    bench = load_module(BENCH, "edgeplan_bench_thread_scaling")
    ratios = bench.phase_ratios(seconds=0.2, window_s=0.02)
    assert len(ratios) >= 2
    # two threads never take over twice one thread's time, nor less than a third of it
    assert np.all((ratios > 0.3) & (ratios < 2.5))
    with pytest.raises(SystemExit):
        bench.main(["--phases", "-1"])
