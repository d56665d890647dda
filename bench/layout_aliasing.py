"""What ONNX Runtime's layout reorders cost per byte against the distance between channel planes.

    .venv/bin/python bench/layout_aliasing.py [--threads 1] [--channels 64]

A depthwise 3x3 conv alone at H x H pixels, run through ONNX Runtime's CPU provider with
its kernel profiler on: the NCHWc transformer wraps the conv in a ReorderInput (NCHW ->
blocked) and a ReorderOutput (blocked -> NCHW). Prints each reorder's median kernel time
and its time per MB of tensor for sizes around the ones whose float32 channel planes lie a
multiple of 4 KiB apart (32, 64, 96, 128 px): there ReorderOutput writes 8 channels at
once into planes that map to the same cache sets (passes/units.py, kind "aliased_layout").
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgeplan.passes.records import ALIASING_BYTES

SIZES = (24, 28, 30, 32, 36, 48, 56, 60, 64, 68, 90, 96, 100, 128)
RUNS, WARMUP = 400, 50


def reorder_times(channels: int, size: int, threads: int, folder: Path) -> dict[str, float]:
    """Median kernel microseconds of each reorder around a depthwise conv at size x size."""
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU()).eval()
    x = torch.randn(1, channels, size, size)
    exported = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), exported, input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"c{channels}-{size}")
    options.log_severity_level = 3
    session = ort.InferenceSession(exported.getvalue(), options, providers=["CPUExecutionProvider"])
    for _ in range(RUNS):
        session.run(None, {"x": x.numpy()})
    durations = collections.defaultdict(list)
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[event["args"]["op_name"]].append(event["dur"])
    return {op: float(np.median(times[WARMUP:])) for op, times in durations.items() if op.startswith("Reorder")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    print(f"{args.channels} channels, {args.threads} thread(s); us, and us per MB of tensor")
    print(f"{'size':>7} {'plane B':>8} {'aliased':>8} {'ReorderInput':>16} {'ReorderOutput':>17}")
    with tempfile.TemporaryDirectory() as folder:
        for size in SIZES:
            times = reorder_times(args.channels, size, args.threads, Path(folder))
            if not {"ReorderInput", "ReorderOutput"} <= set(times):
                raise SystemExit("this host's ONNX Runtime runs the conv without the NCHWc layout: nothing to time")
            plane = size * size * 4
            megabytes = args.channels * plane / 2**20
            cells = [f"{times[op]:6.1f} {times[op] / megabytes:7.0f}" for op in ("ReorderInput", "ReorderOutput")]
            print(f"{size:>4} px {plane:>8} {'yes' if plane % ALIASING_BYTES == 0 else '':>8} "
                  f"{cells[0]:>16} {cells[1]:>17}")


if __name__ == "__main__":
    main()
