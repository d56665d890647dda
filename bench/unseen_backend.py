"""Adaptation to a backend of another kind (issue 4, part 3): TVM on this host, backend tvm1
(each unit's ONNX file built as a dlight-scheduled TVM Relax library, one thread), predicted
from the ONNX Runtime models of bench/predictor.py's store and k records of TVM.

    .venv/bin/python bench/unseen_backend.py [--store bench/out/predictor_store.jsonl]
                                             [--draws 10] [--repeats 15] [--reuse]

cpu1 and cpu2 differ in thread count only; tvm1 runs other kernels (TVM's generated loops
instead of MLAS), so what a unit costs changes by op kind, not by one factor: the test of
`adapt_from_closest` for a backend unlike every source. Needs apache-tvm (the `tvm` extra)
and bench/predictor.py's files (--store, its `_heldout_splits.json`): the sources are the
predictor fitted on that store, the held-out splits those it timed.

Profiled here with `profile_units(threads=(1,), tvm=True)` (ONNX Runtime with one thread
and TVM, timed in the same rounds; builds cached under ~/.cache/edgeplan/tvm):
- the pool, `<store>_tvm.jsonl`: every zoo model's units alone, where the k samples are
  drawn from,
- the held-out models (HF GPT-2, HF LLaMA, the separable CNN, two sizes each),
  `<store>_tvm_heldout.jsonl`: their units and the stages of their split into 2 stages,
  and all of them timed a second time after all models (the noise floor).
--reuse reads both files instead of profiling.

The table, on tvm1's held-out units and stages: the cpu1 model as is (k = 0), k = 5, 10,
20 random pool records (`adapt_from_closest`, median over --draws draws, with the source
each draw chose), and the own fit of the whole pool (a full profile of the backend).
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
    Profiler,
    closest_adaptation,
    errors,
    held_out_models,
    learned_times,
    noise_floor,
    paired,
    progress_line,
    summary,
    zoo_models,
)

from edgeplan.errors import EdgeplanError  # noqa: E402
from edgeplan.planner.predictor import Predictor, fit_model  # noqa: E402
from edgeplan.planner.profile import TVM_BACKEND, ProfileStore, fastest_reference_of  # noqa: E402

KS = (5, 10, 20)
SOURCE = ("host", "cpu1")  # the model taken as is at k = 0


def tvm_files(store: Path) -> tuple[Path, Path]:
    """(pool, held-out) store files next to bench/predictor.py's --store."""
    return (store.with_name(store.stem + "_tvm.jsonl"), store.with_name(store.stem + "_tvm_heldout.jsonl"))


def read_inputs(store: Path):
    """(the ORT training records, the held-out splits) bench/predictor.py wrote."""
    splits = store.with_name(store.stem + "_heldout_splits.json")
    missing = [p for p in (store, splits) if not p.is_file()]
    if missing:
        raise EdgeplanError(f"unseen_backend: {', '.join(map(str, missing))} not found; run "
                            f"`.venv/bin/python bench/predictor.py --store {store}` first")
    return ProfileStore(store).load(), json.loads(splits.read_text())


def profile_tvm(store: Path, store_records, splits_of: dict[str, list[list[int]]], repeats: int) -> None:
    """Write the pool and held-out TVM files (module docstring); units or stages TVM cannot
    build are listed and left out of tvm1. Rounds are judged slow against the fastest
    reference of the ONNX Runtime store too, so a slow spell that covers the first models
    is waited out instead of taken for the machine's speed."""
    missing = [label for label, _ in held_out_models() if label not in splits_of]
    if missing:
        raise EdgeplanError(f"unseen_backend: the held-out splits of {store} have no {', '.join(missing)}; "
                            f"run `.venv/bin/python bench/predictor.py --store {store}` again")
    pool_path, held_out_path = tvm_files(store)
    profile = Profiler(repeats, fastest=fastest_reference_of(store_records))
    failed = []

    def on_tvm_failure(unit: str, reason: str) -> None:
        failed.append(f"{label} {unit}: {reason.splitlines()[0]}")

    pool = ProfileStore(pool_path)
    pool_path.unlink(missing_ok=True)
    for label, model, inputs in zoo_models():
        pool.append(profile(model, inputs, name=label, threads=(1,), tvm=True,
                            on_tvm_failure=on_tvm_failure, progress=progress_line(label)))
    held_out = ProfileStore(held_out_path)
    held_out_path.unlink(missing_ok=True)
    built = []
    for label, build in held_out_models():
        model, inputs = build()
        two_stages = [s for s in splits_of[label] if s[-1] == 1]
        splits = [list(range(len(splits_of[label][0])))] + two_stages
        built.append((label, model, inputs, splits))
        held_out.append(profile(model, inputs, name=label, splits=splits, threads=(1,), tvm=True,
                                on_tvm_failure=on_tvm_failure, progress=progress_line(label)))
    for name, model, inputs, splits in built:
        held_out.append(profile(model, inputs, name=f"{name}-repeat", splits=splits, threads=(1,),
                                tvm=True, on_tvm_failure=lambda *_: None,
                                progress=progress_line(f"{name} again")))
    print(f"\nTVM could not build {len(failed)} units or stages (timed on ONNX Runtime only):")
    print("\n".join(f"  {line}" for line in failed))


def table(sources: Predictor, pool, first, second, draws: int) -> None:
    """Noise floor, tvm1 / cpu1 times, and the adaptation row for units and stages."""
    print("\nNoise floor: held-out tvm1 units and stages timed twice (|run 1 / run 2 - 1|, "
          "median and share within 10 %)")
    a, b = paired([r for r in first if r.backend == TVM_BACKEND], second)
    print(f"{TVM_BACKEND:<8} {len(a):>3} {summary(noise_floor(a, b))}")
    cpu1 = {(r.model, r.unit): r.time_s for r in first + pool if r.backend == "cpu1"}
    ratios = [r.time_s / cpu1[(r.model, r.unit)] for r in first + pool
              if r.backend == TVM_BACKEND and (r.model, r.unit) in cpu1]
    print(f"{TVM_BACKEND} time / cpu1 time, same units and moments: median {np.median(ratios):.1f}, "
          f"p10-p90 {np.percentile(ratios, 10):.1f}-{np.percentile(ratios, 90):.1f}")
    tvm_pool = [r for r in pool if r.backend == TVM_BACKEND]
    own = fit_model(tvm_pool, "host", TVM_BACKEND)
    print(f"\nEach cell: median |error| and share within +-10 %; k = samples of {TVM_BACKEND} "
          f"(from {len(tvm_pool)} pool records)")
    print(f"{'level':<6} {'n':>3} | {'cpu1 as is':>16} | "
          + " | ".join(f"{'k = ' + str(k):>16}" for k in KS) + f" | {'own fit':>16} | sources chosen")
    for level in ("unit", "stage"):
        rows = [r for r in first if r.backend == TVM_BACKEND and bool(r.parts) == (level == "stage")]
        if not rows:
            continue
        cells = [summary(errors(learned_times(sources.models[SOURCE], rows), rows))]
        adapted, chosen = closest_adaptation(list(sources.models.values()), tvm_pool, rows, "host",
                                             TVM_BACKEND, KS, draws)
        cells += adapted
        cells.append(summary(errors(learned_times(own, rows), rows)))
        print(f"{level:<6} {len(rows):>3} | " + " | ".join(cells) + " | "
              + ", ".join(f"{b} {n}" for b, n in sorted(chosen.items())))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "bench" / "out" / "predictor_store.jsonl",
                        help="bench/predictor.py's training store (the source models)")
    parser.add_argument("--draws", type=int, default=10, help="random sample draws per k")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per unit or stage")
    parser.add_argument("--reuse", action="store_true", help="read the TVM files instead of profiling")
    args = parser.parse_args(argv)
    try:
        store_records, splits_of = read_inputs(args.store)
        if not args.reuse:
            profile_tvm(args.store, store_records, splits_of, args.repeats)
        paths = tvm_files(args.store)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise EdgeplanError(f"unseen_backend: {', '.join(map(str, missing))} not found; run "
                                f"without --reuse to profile them")
        pool, held_out = (ProfileStore(p).load() for p in paths)
    except EdgeplanError as error:
        print(error, file=sys.stderr)
        return 2
    first = [r for r in held_out if not r.model.endswith("-repeat")]
    second = [r for r in held_out if r.model.endswith("-repeat")]
    table(Predictor.fit(store_records), pool, first, second, args.draws)
    return 0


if __name__ == "__main__":
    sys.exit(main())
