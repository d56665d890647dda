"""ONNX Runtime against TVM per stage, and what the TVM compile cache saves.

    python bench/targets.py [--trials 64] [--repeats 30] [--no-tune]

For the CNN (examples/resnet.py) and GPT (examples/gpt.py) examples, split in two stages,
one table: per stage, the median time of ONNX Runtime, TVM unscheduled (`none`), TVM with
dlight rules, and TVM with MetaSchedule (`--trials` measurements per stage), all at one
thread on this machine, then the best TVM path and its ratio to ONNX Runtime (goal: <= 1.5).
Then `edgeplan.compile(..., targets="tvm")` twice with an empty cache: cold against warm.

Timings are medians of `--repeats` runs after warm-up; on a shared machine re-run them when
it is quiet. Tuning takes minutes per stage on 2 cores (`--no-tune` skips it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import edgeplan  # noqa: E402
from edgeplan.cli import progress_bar  # noqa: E402
from edgeplan.planner.compile import median_run_s  # noqa: E402
from edgeplan.runtime.manifest import read_manifest  # noqa: E402
from edgeplan.runtime.session import open_session  # noqa: E402
from edgeplan.targets.tvm import TvmTarget  # noqa: E402


def median_ms(session, feeds: dict, repeats: int) -> float:
    return median_run_s(session, feeds, repeats) * 1e3


def stage_feeds(directory: Path, inputs: dict) -> list[dict]:
    """Each stage's input tensors, produced by running the ONNX stages in order."""
    manifest = read_manifest(directory)
    env = {name: value.numpy() for name, value in inputs.items()}
    feeds = []
    for entry in manifest.stages:
        feeds.append({t.name: env[t.name] for t in entry.inputs})
        env.update(open_session(directory, entry, threads=1).run(env))
    return feeds


def bench_model(name: str, model, inputs, schedules, trials: int, repeats: int, cache: Path):
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / name
        edgeplan.compile(model, inputs, fleet="home-lab", out_dir=out, num_stages=2, time_limit_s=5)
        manifest = read_manifest(out)
        for entry, feeds in zip(manifest.stages, stage_feeds(out, inputs)):
            row = {"model": name, "stage": entry.index,
                   "onnxruntime": median_ms(open_session(out, entry, threads=1), feeds, repeats)}
            for schedule in schedules:
                target = TvmTarget(schedule=schedule, trials=trials, cache=cache, progress=progress_bar)
                folder = out / schedule
                folder.mkdir(exist_ok=True)
                started = time.perf_counter()
                built = target.emit(out / entry.artifact.path, entry.index, folder)
                row[f"{schedule} build s"] = time.perf_counter() - started
                tvm_entry = dataclasses.replace(entry, artifact=built.artifact)
                row[schedule] = median_ms(open_session(folder, tvm_entry, threads=1), feeds, repeats)
            rows.append(row)
    return rows


def cache_speedup(model, inputs, cache: Path) -> tuple[float, float]:
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as scratch:
            started = time.perf_counter()
            edgeplan.compile(model, inputs, fleet="home-lab", out_dir=scratch, num_stages=2,
                             time_limit_s=5, targets="tvm", tvm=TvmTarget(cache=cache))
            times.append(time.perf_counter() - started)
    return times[0], times[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=64, help="MetaSchedule measurements per stage")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement")
    parser.add_argument("--no-tune", action="store_true", help="skip MetaSchedule")
    args = parser.parse_args(argv)

    import gpt
    import resnet

    schedules = ["none", "dlight"] + ([] if args.no_tune else ["metaschedule"])
    models = {"cnn": resnet.build(), "gpt": gpt.build()}
    with tempfile.TemporaryDirectory() as cache_root:
        rows = []
        for name, (model, inputs) in models.items():
            rows += bench_model(name, model, inputs, schedules, args.trials, args.repeats,
                                Path(cache_root) / "bench")
        cold, warm = cache_speedup(*models["gpt"], Path(cache_root) / "speedup")

    header = ["model", "stage", "ORT ms", *(f"TVM {s} ms" for s in schedules), "best TVM",
              "best/ORT", *(f"{s} build s" for s in schedules)]
    table = []
    for row in rows:
        best = min(schedules, key=lambda s: row[s])
        table.append([row["model"], str(row["stage"]), f"{row['onnxruntime']:.3f}",
                      *(f"{row[s]:.3f}" for s in schedules), best,
                      f"{row[best] / row['onnxruntime']:.1f}x",
                      *(f"{row[f'{s} build s']:.1f}" for s in schedules)])
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    print(f"per stage, median of {args.repeats} runs at one thread (ORT intra-op 1, TVM pool 1); "
          f"metaschedule: {args.trials} trials per stage")
    for line in [header, ["-" * w for w in widths], *table]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    print(f"\ncompile gpt --targets tvm (dlight): cold cache {cold:.1f} s, warm cache {warm:.1f} s "
          f"({cold / warm:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
