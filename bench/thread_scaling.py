"""How smoothly ONNX Runtime's 2-thread speedup follows a unit's shape, against how well it repeats.

    .venv/bin/python bench/thread_scaling.py [--samples 24] [--timings 2]
    .venv/bin/python bench/thread_scaling.py --phases 30

Times the layer space's aligned_separable_block pairs (planner/layer_space.py: twin
separable blocks alike but for their output size, 4 px apart) on backends cpu1 and cpu2
with the profiler the store uses, `--timings` times in one process, and prints each twin's
speedup (cpu2 time / cpu1 time) in every timing. Two figures: how far one unit's speedup
moves between timings (what no predictor can beat), and how far the twins' speedups lie
apart: twins differ by 4 px a side (6-14 %), so a law smooth in FLOPs, bytes and sizes gives
them nearly the same speedup, and errs by about half their gap on each.

`--phases SECONDS` instead times the profiler's reference workload (planner/profile.py) on
two threads and on one, pinned, in alternating windows of WINDOW_S for that long, and
prints the ratio's spread and how long the slow spells last: on a shared VM a 2-thread
session switches between two speeds, in spells of 0.2 s to over 10 s, and every
2-thread session switches at the same moments (bench/predictor_notes.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgeplan.planner.layer_space import layer_space
from edgeplan.planner.profile import (
    onnx_session,
    pinned_cpu,
    pinned_for,
    profile_units,
    reference_feeds,
    reference_model,
    warm_up,
)

# One window of the phase timing: long enough for hundreds of reference runs, short
# against the spells it looks for (0.1 s to tens of seconds here).
WINDOW_S = 0.1
# A window runs slow where its ratio lies this far over the fastest tenth's: the two modes
# of this VM's two threads put the reference at 0.59 and 0.76 of its 1-thread time.
SLOW_FACTOR = 1.2


def speedups(samples: int, timings: int) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """The pairs' descriptions and, per timing, each unit's cpu2 / cpu1 time (graph order)."""
    (name, bank, inputs, descriptions), = layer_space(samples=samples, seed=0,
                                                      families=("aligned_separable_block",))
    out = []
    for _ in range(timings):
        times = {(r.unit, r.backend): r.time_s for r in profile_units(bank, inputs, threads=(1, 2), name=name)}
        out.append(np.array([times[(f"layers.{i}", "cpu2")] / times[(f"layers.{i}", "cpu1")]
                             for i in range(len(descriptions))]))
    return descriptions, out


def phase_ratios(seconds: float, window_s: float = WINDOW_S) -> np.ndarray:
    """The reference workload's time per run on two threads over its time on one (pinned,
    as the profiler times one thread), per pair of back-to-back windows, for `seconds`."""
    feeds = reference_feeds()
    sessions = {threads: onnx_session(reference_model(), threads) for threads in (1, 2)}
    cpu = pinned_cpu()
    for threads, session in sessions.items():
        with pinned_for(threads, cpu):
            warm_up(session, feeds, 20)
    ratios = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        per_run = {}
        for threads, session in sessions.items():
            with pinned_for(threads, cpu):
                window_start, runs = time.perf_counter(), 0
                while time.perf_counter() - window_start < window_s:
                    session.run(None, feeds)
                    runs += 1
                per_run[threads] = (time.perf_counter() - window_start) / runs
        ratios.append(per_run[2] / per_run[1])
    return np.array(ratios)


def slow_spells(ratios: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Which windows ran slow (ratio more than SLOW_FACTOR over the fastest tenth's, p10),
    and the lengths, in windows, of the runs of consecutive slow ones."""
    slow = ratios > SLOW_FACTOR * np.percentile(ratios, 10)
    spells, length = [], 0
    for is_slow in np.append(slow, False):
        if is_slow:
            length += 1
        elif length:
            spells.append(length)
            length = 0
    return slow, spells


def print_phases(ratios: np.ndarray, window_s: float = WINDOW_S) -> None:
    pair_s = 2 * window_s  # a 2-thread window and a 1-thread one
    p10, median, p90 = np.percentile(ratios, [10, 50, 90])
    slow, spells = slow_spells(ratios)
    print(f"reference workload, 2 threads / 1 thread, {len(ratios)} window pairs of {pair_s:.1f} s")
    print(f"  ratio p10 {p10:.2f}, median {median:.2f}, p90 {p90:.2f}; more than {SLOW_FACTOR:.1f}x p10 "
          f"in {100 * np.mean(slow):.0f} % of windows (median {np.median(ratios[slow]) if slow.any() else 0:.2f})")
    if spells:
        print(f"  {len(spells)} slow spell(s): median {np.median(spells) * pair_s:.1f} s, "
              f"longest {max(spells) * pair_s:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="layer space samples (pairs: samples)")
    parser.add_argument("--timings", type=int, default=2, help="timings of every unit, in one process (2 or more)")
    parser.add_argument("--phases", type=float, default=0.0, metavar="SECONDS",
                        help="instead, time the reference workload on 2 threads against 1 for this long")
    args = parser.parse_args(argv)
    if args.phases < 0:
        parser.error(f"--phases {args.phases}: give the seconds to time, more than 0")
    if args.phases:
        print_phases(phase_ratios(args.phases))
        return 0
    if args.timings < 2:
        parser.error(f"--timings {args.timings}: give 2 or more, to compare one unit's timings")
    descriptions, ratios = speedups(args.samples, args.timings)
    print(f"{'pair (first twin)':48s} {'twin':>6s}  cpu2 / cpu1 of the twins, per timing")
    for i in range(0, len(descriptions), 2):
        twin = descriptions[i + 1].split()[4]
        cells = "   ".join(f"{r[i]:.3f} {r[i + 1]:.3f}" for r in ratios)
        print(f"{descriptions[i][:48]:48s} {twin:>6s}  {cells}")
    stacked = np.array(ratios)
    repeat = np.abs(stacked[1:] / stacked[:-1] - 1).ravel()
    twins = np.abs(stacked[:, 0::2] / stacked[:, 1::2] - 1).ravel()
    for label, values in (("one unit, timing to timing", repeat), ("twin to twin, same timing", twins)):
        print(f"{label:28s} |speedup ratio - 1|: median {100 * np.median(values):.1f} %, "
              f"p90 {100 * np.percentile(values, 90):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
