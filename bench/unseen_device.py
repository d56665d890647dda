"""Adaptation to an unseen device (issue 4, part 3): a predictor trained on one machine moved
to another machine from k of its records, in both directions.

    .venv/bin/python bench/unseen_device.py [--store bench/out/predictor_store.jsonl]
                                            [--device-dir bench/data/xeon16] [--draws 10]

The two machines:
- this host: the training store and held-out measurements of `bench/predictor.py` (run it
  first; it writes --store, its `_heldout.jsonl` and `_heldout_splits.json`).
- xeon16 (`bench/data/xeon16`, lscpu.txt): the host CPU of the GPU machine lent to this
  project on 2026-11-24, a 16-vCPU KVM Xeon with AMX, 2 MiB of L2 per core and 300 MiB of L3
  (this host: 2 vCPUs of an Ice Lake-SP Xeon, 48 MiB L3), Python 3.12, ONNX Runtime 1.30.0,
  torch 2.11. store.jsonl is `bench/predictor.py`'s training profile run there (both backends,
  the calibration and the whole zoo, and the layer space's linear, matmul, conv, attention and
  norm families: the lease ended during the elementwise family, whose records were lost); its
  held-out set is `edgeplan profile` of the three held-out models at their small sizes (HF
  GPT-2, HF LLaMA, the separable CNN at 64 px), timed twice (heldout.jsonl,
  heldout_again.jsonl). The records were written before `edgeplan profile --device` existed,
  as device "host"; their device was renamed to xeon16 and the held-out models to the names
  `bench/predictor.py` gives them.

For each direction and backend (cpu1, cpu2), on the target machine's held-out units:
- roofline: the `host` preset's figures (what a planner has for a device of that kind with
  no records),
- as is: the source machine's model of the same backend, unchanged (k = 0),
- k = 5, 10, 20 random records of the target (median over --draws draws):
  `adapt_from_closest`, what `Predictor.fit` does with a device that has few records (the
  source backend chosen by the samples, then rescaled and refitted towards it),
- own fit: the target machine's whole store (a full re-profile, nn-Meter's way).
The noise floor of each machine's held-out units (timed twice) comes first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from predictor import (  # noqa: E402
    BACKENDS,
    closest_adaptation,
    errors,
    learned_times,
    noise_floor,
    paired,
    roofline_times,
    split_records,
    summary,
)

from edgeplan.errors import EdgeplanError  # noqa: E402
from edgeplan.planner.predictor import Predictor  # noqa: E402
from edgeplan.planner.profile import ProfileStore  # noqa: E402

KS = (5, 10, 20)


def host_data(store: Path):
    """(training records, held-out units, held-out units timed again) of this host."""
    heldout = store.with_name(store.stem + "_heldout.jsonl")
    splits = store.with_name(store.stem + "_heldout_splits.json")
    missing = [p for p in (store, heldout, splits) if not p.is_file()]
    if missing:
        raise EdgeplanError(f"unseen_device: {', '.join(map(str, missing))} not found; run "
                            f"`.venv/bin/python bench/predictor.py --store {store}` first")
    units, _, again = split_records(ProfileStore(heldout).load(), json.loads(splits.read_text()))
    return ProfileStore(store).load(), units, again


def device_data(directory: Path):
    """(training records, held-out units, held-out units timed again) of another machine."""
    paths = [directory / name for name in ("store.jsonl", "heldout.jsonl", "heldout_again.jsonl")]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EdgeplanError(f"unseen_device: {', '.join(map(str, missing))} not found; --device-dir "
                            f"takes a folder of store.jsonl, heldout.jsonl and heldout_again.jsonl")
    return [ProfileStore(p).load() for p in paths]


def direction(name, source_records, target_records, target_units, device, draws) -> None:
    """One table row per backend: roofline, source as is, k samples, own fit."""
    source = Predictor.fit(source_records)
    own = Predictor.fit(target_records)
    source_device = source_records[0].device
    print(f"\n{name} (held-out units of {device})")
    print(f"{'backend':<8} {'n':>3} | {'roofline':>16} | {'as is':>16} | "
          + " | ".join(f"{'k = ' + str(k):>16}" for k in KS) + f" | {'own fit':>16} | sources chosen")
    for backend in BACKENDS:
        rows = [r for r in target_units if r.backend == backend]
        pool = [r for r in target_records if r.backend == backend]
        cells = [summary(errors(roofline_times(rows, backend), rows)),
                 summary(errors(learned_times(source.models[(source_device, backend)], rows), rows))]
        adapted, chosen = closest_adaptation(list(source.models.values()), pool, rows, device, backend,
                                             KS, draws)
        cells += adapted
        cells.append(summary(errors(learned_times(own.models[(device, backend)], rows), rows)))
        print(f"{backend:<8} {len(rows):>3} | " + " | ".join(cells) + " | "
              + ", ".join(f"{b} {n}" for b, n in sorted(chosen.items())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "bench" / "out" / "predictor_store.jsonl",
                        help="this host's training store, written by bench/predictor.py")
    parser.add_argument("--device-dir", type=Path, default=ROOT / "bench" / "data" / "xeon16",
                        help="the other machine's store.jsonl, heldout.jsonl, heldout_again.jsonl")
    parser.add_argument("--draws", type=int, default=10, help="random sample draws per k")
    args = parser.parse_args(argv)
    try:
        host, host_units, host_again = host_data(args.store)
        other, other_units, other_again = device_data(args.device_dir)
    except EdgeplanError as error:
        print(error, file=sys.stderr)
        return 2
    device = other[0].device
    # The other machine timed the held-out models at their small sizes only: compare like with like.
    host_units = [r for r in host_units if (r.model, r.unit, r.backend)
                  in {(o.model, o.unit, o.backend) for o in other_units}]
    print("Noise floor: held-out units timed twice (|run 1 / run 2 - 1|, median and share within 10 %)")
    for label, first, second in (("host", host_units, host_again), (device, other_units, other_again)):
        for backend in BACKENDS:
            a, b = paired([r for r in first if r.backend == backend], second)
            print(f"{label:<8} {backend:<5} {len(a):>3} units {summary(noise_floor(a, b))}")
    ratio = {(r.unit, r.model, r.backend): r.time_s for r in host_units}
    for backend in BACKENDS:
        times = [r.time_s / ratio[(r.unit, r.model, r.backend)] for r in other_units
                 if r.backend == backend and (r.unit, r.model, r.backend) in ratio]
        print(f"{device}/{backend} time / host/{backend} time, same units: median "
              f"{np.median(times):.2f}, p10-p90 {np.percentile(times, 10):.2f}-{np.percentile(times, 90):.2f}")
    print("\nEach cell: median |error| and share within +-10 %; k = samples of the target machine")
    direction(f"host -> {device}", host, other, other_units, device, args.draws)
    direction(f"{device} -> host", other, host, host_units, "host", args.draws)
    return 0


if __name__ == "__main__":
    sys.exit(main())
