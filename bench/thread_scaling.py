"""How smoothly ONNX Runtime's 2-thread speedup follows a unit's shape, against how well it repeats.

    .venv/bin/python bench/thread_scaling.py [--samples 24] [--timings 2]

Times the layer space's aligned_separable_block pairs (planner/layer_space.py: twin
separable blocks alike but for their output size, 4 px apart) on backends cpu1 and cpu2
with the profiler the store uses, `--timings` times in one process, and prints each twin's
speedup (cpu2 time / cpu1 time) in every timing. Two figures: how far one unit's speedup
moves between timings (what no predictor can beat), and how far the twins' speedups lie
apart: twins differ by 4 px a side (6-14 %), so a law smooth in FLOPs, bytes and sizes gives
them nearly the same speedup, and errs by about half their gap on each.
"""

from __future__ import annotations

import argparse

import numpy as np

from edgeplan.planner.layer_space import layer_space
from edgeplan.planner.profile import profile_units


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="layer space samples (pairs: samples)")
    parser.add_argument("--timings", type=int, default=2, help="timings of every unit, in one process (2 or more)")
    args = parser.parse_args(argv)
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
