"""Merge benchmark: memory and accuracy of a multi-model workload, unmerged vs merged.

Workloads (examples/digits.py): four CNNs of one architecture, three fine-tuned from a
common backbone, trained deterministically on scikit-learn's digits; `digits` with the
example's fully connected widths (512, 256), `digits-wide` with (2048, 1024), where the
weights rather than ONNX Runtime's own overhead dominate resident memory. Rows:

    unmerged   every model compiled on its own (one artifact each), all loaded together
    lossless   edgeplan.compile_workload(merge="identical"): bitwise-equal layers shared
    gemel      passes.merge.merge_models (retraining, budget 0.99), then compile_workload

Columns: distinct parameter bytes (the planner's count) and the bytes of the ONNX
initializers written; resident memory (VmRSS) of a fresh process that loads every stage
session of the row (one WeightStore, every directory announced, --prepacking auto by
default: runtime/weights.py) and runs one microbatch, median of --repeats processes, in
total and above the same process before any session (onnxruntime imported), and the
anonymous part of that (RssAnon: weights and session state, without the ~9 MB of ONNX
Runtime's own code that the first session pages in); per-model accuracy
measured through the compiled runtime on the first 352 test images; merges kept and
rejected; seconds spent retraining. Every row is compiled for the home-lab fleet as one
stage (one edge box running all models).

    python bench/merge.py [--repeats 5] [--epochs 2] [--workloads digits digits-wide]
                          [--prepacking auto|on|off] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import digits  # noqa: E402

import edgeplan  # noqa: E402
from edgeplan.passes.merge import distinct_param_bytes, text_progress  # noqa: E402
from edgeplan.runtime.weights import PREPACKING  # noqa: E402

MEASURE = r"""
import json, sys
import numpy as np
import onnxruntime  # noqa: F401  (part of the baseline)
from edgeplan.runtime import WeightStore, load

def rss_kb():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "RssAnon")}

before = rss_kb()
store = WeightStore(sys.argv[1])  # one store: a weight held by several models is held once
for directory in sys.argv[2:]:
    store.expect(directory)
pipes = [load(d, threads_per_stage=1, weights=store) for d in sys.argv[2:]]
for pipe in pipes:
    pipe.run({t.name: np.zeros(t.shape, t.dtype) for t in pipe.manifest.inputs})
after = rss_kb()
print(json.dumps({"before_kb": before["VmRSS"], "loaded_kb": after["VmRSS"],
                  "anon_kb": after["RssAnon"] - before["RssAnon"]}))
"""
TEST_IMAGES = 352  # 44 microbatches of 8


def resident_kb(directories: list[Path], repeats: int, prepacking: str) -> tuple[float, float, float]:
    """Median VmRSS (total, above the baseline) and RssAnon above the baseline, in kB, over
    `repeats` fresh processes."""
    totals, above, anon = [], [], []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "-c", MEASURE, prepacking, *map(str, directories)],
                                capture_output=True, text=True, check=True)
        data = json.loads(result.stdout.strip().splitlines()[-1])
        totals.append(data["loaded_kb"])
        above.append(data["loaded_kb"] - data["before_kb"])
        anon.append(data["anon_kb"])
    return statistics.median(totals), statistics.median(above), statistics.median(anon)


def initializer_bytes(directories: list[Path]) -> int:
    return sum(numpy_helper.to_array(i).nbytes for d in directories for f in sorted(d.glob("*.onnx"))
               for i in onnx.load(f).graph.initializer)


def runtime_accuracy(directories: dict[str, Path], data) -> dict[str, float]:
    """Accuracy per model from the compiled artifacts (one directory per model, or one for all)."""
    pixels = data.test_x[:TEST_IMAGES]
    feeds_by_name = {"pixels": pixels, "digit_pixels": pixels,
                     "rotated_pixels": digits.task_inputs("rotated", pixels)}
    accuracy = {}
    for directory in dict.fromkeys(directories.values()):
        pipe = edgeplan.runtime.load(directory, threads_per_stage=1)
        names = [n for n, d in directories.items() if d == directory]
        feeds = {}
        for entry in pipe.manifest.inputs:
            key = "rotated_pixels" if names == ["rotated"] else entry.name
            feeds[entry.name] = feeds_by_name[key].numpy()
        outputs = pipe.run(feeds)
        for name in names:
            logits = outputs[name if name in outputs else "output"]
            labels = digits.task_labels(name, data.test_y[:TEST_IMAGES]).numpy()
            accuracy[name] = float((logits.argmax(1) == labels).mean())
    return accuracy


WORKLOADS = {"digits": digits.HIDDEN, "digits-wide": (2048, 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="processes per memory measurement")
    parser.add_argument("--epochs", type=int, default=2, help="joint fine-tuning epochs per merge")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--prepacking", choices=PREPACKING, default="auto",
                        help="ONNX Runtime weight prepacking in the memory measurement (runtime/weights.py)")
    parser.add_argument("--keep", type=Path, help="write the compiled rows here instead of a temporary folder")
    args = parser.parse_args()
    started = time.perf_counter()
    data = digits.load_data()
    reports = {name: bench_workload(name, WORKLOADS[name], data, args) for name in args.workloads}
    for name, report in reports.items():
        print(f"\nmerges of {name} (torch accuracy on all {len(data.test_y)} test images):")
        print(report.format())
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


def bench_workload(workload_name: str, hidden: tuple[int, int], data, args):
    """Print the table of one workload; returns its MergeReport."""
    started = time.perf_counter()
    models = digits.train_models(data, hidden=hidden)
    print(f"trained the four {workload_name} models in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    workload = digits.workload_of(models, data)
    merged, report = digits.merge_workload(workload, data, epochs=args.epochs,
                                           progress=text_progress(sys.stderr))

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch) if args.keep is None else args.keep / workload_name
        single = {}
        for name, (model, inputs) in workload.items():
            single[name] = scratch / f"unmerged-{name}"
            edgeplan.compile(model, inputs, fleet="home-lab", out_dir=single[name], num_stages=1,
                             time_limit_s=5)
        configs = [("unmerged", single, distinct_param_bytes(m for m, _ in workload.values()), None)]
        for label, source, merge in (("lossless", workload, "identical"), ("gemel", merged, "none")):
            out = scratch / label
            plan = edgeplan.compile_workload(source, fleet="home-lab", out_dir=out, merge=merge,
                                             num_stages=1, time_limit_s=5)
            configs.append((label, {name: out for name in workload}, plan.workload.param_bytes,
                            report if label == "gemel" else None))
        for label, directories, params, merge_report in configs:
            unique = list(dict.fromkeys(directories.values()))
            total_kb, above_kb, anon_kb = resident_kb(unique, args.repeats, args.prepacking)
            rows.append(dict(label=label, params=params, stored=initializer_bytes(unique),
                             total_kb=total_kb, above_kb=above_kb, anon_kb=anon_kb,
                             accuracy=runtime_accuracy(directories, data), report=merge_report))

    base = rows[0]
    print(f"\nworkload {workload_name} (hidden {hidden}): 4 models ({', '.join(workload)}), home-lab fleet, one stage; "
          f"RSS median of {args.repeats} fresh processes, prepacking {args.prepacking}; accuracy via the "
          f"ONNX runtime on {TEST_IMAGES} test images")
    header = (f"{'row':<9} {'params MB':>9} {'ONNX MB':>8} {'less':>6} {'RSS MB':>7} "
              f"{'RSS-base MB':>11} {'less':>6} {'anon MB':>7} {'less':>6}  {'accuracy (before -> after)':<58} "
              f"{'kept':>4} {'rejected':>8} {'retrain s':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        accuracy = "  ".join(f"{n} {base['accuracy'][n]:.3f}->{row['accuracy'][n]:.3f}" for n in workload)
        merge_report = row["report"]
        kept = len(merge_report.kept) if merge_report else "-"
        rejected = len(merge_report.rejected) if merge_report else "-"
        retrain = f"{merge_report.retrain_s:.1f}" if merge_report else "-"
        print(f"{row['label']:<9} {row['params'] / 1e6:>9.3f} {row['stored'] / 1e6:>8.3f} "
              f"{1 - row['params'] / base['params']:>6.1%} {row['total_kb'] / 1e3:>7.1f} "
              f"{row['above_kb'] / 1e3:>11.1f} {1 - row['above_kb'] / base['above_kb']:>6.1%} "
              f"{row['anon_kb'] / 1e3:>7.1f} {1 - row['anon_kb'] / base['anon_kb']:>6.1%}  "
              f"{accuracy:<58} {kept:>4} {rejected:>8} {retrain:>9}")
    worst = min(row["accuracy"][n] / base["accuracy"][n] for n in workload for row in rows[-1:])
    print(f"\ngoal: >= 60% less memory with every model >= 99% of its unmerged accuracy: gemel saves "
          f"{1 - rows[-1]['params'] / base['params']:.1%} of parameter bytes, "
          f"{1 - rows[-1]['above_kb'] / base['above_kb']:.1%} of resident memory above the baseline; "
          f"worst model at {worst:.1%} of its unmerged runtime accuracy "
          f"(the merge decisions used torch accuracy on all {len(data.test_y)} test images)")
    return report


if __name__ == "__main__":
    main()
