"""Local pipeline: run the stages of a compiled model as a microbatched pipeline of threads.

A batch is cut along dim 0 into microbatches of the compiled batch size. The pipeline is
a list of steps, one thread each, joined by bounded queues: a stage step decodes what it
received, runs its session, keeps the tensors the next stage needs (`forward` in the
manifest) and encodes them with the boundary's codec; with `emulate_links`, a link step
between two stages holds each message for latency + wire bytes / bandwidth, like the
real link would (timings from such runs are emulated, not measured on devices). ONNX
Runtime releases the GIL, so steps overlap. Outputs are collected in order and
concatenated along dim 0 (an output without a batch dimension is stacked, one entry per
microbatch).
"""

from __future__ import annotations

import json
import os
import platform
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeplan.errors import EdgeplanError, InputError, StageError
from edgeplan.runtime.codecs import decode, encode
from edgeplan.runtime.manifest import (
    LinkEntry,
    Manifest,
    StageEntry,
    TensorEntry,
    read_manifest,
)
from edgeplan.runtime.session import StageSession, open_session
from edgeplan.runtime.weights import WeightStore

QUEUE_DEPTH = 2
_DONE = object()


@dataclass(frozen=True)
class RunStats:
    """Wall time of the last run; busy time per microbatch of each stage (codecs included)
    and of each emulated link; the ONNX Runtime threads each local stage ran with (0: not
    a local run)."""

    microbatches: int
    wall_s: float
    stage_mean_s: tuple[float, ...]
    link_mean_s: tuple[float, ...] = ()
    threads_per_stage: int = 0

    @property
    def throughput_per_s(self) -> float:
        return self.microbatches / self.wall_s if self.wall_s else float("inf")


RUNS_FILE = "runs.jsonl"


def record_run(directory: str | Path, stats: RunStats, emulated_links: bool, remote: bool = False) -> Path:
    """Append one run's measurements to DIR/runs.jsonl (one JSON object a line).

    Fields: unix time, host, microbatches, wall_s, stage_mean_s (busy seconds per
    microbatch, codecs included), link_mean_s (emulated links), emulated_links, remote
    (run on deployed workers; stage times measured there), threads_per_stage (intra-op
    threads of each local stage, 0 when remote). `inspect` shows the latest next to the
    predictions; `edgeplan profile --from-run` turns them into profile records.
    """
    path = Path(directory) / RUNS_FILE
    record = {"time": time.time(), "host": platform.node(), "microbatches": stats.microbatches,
              "wall_s": stats.wall_s, "stage_mean_s": list(stats.stage_mean_s),
              "link_mean_s": list(stats.link_mean_s), "emulated_links": emulated_links,
              "remote": remote, "threads_per_stage": stats.threads_per_stage}
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return path


def latest_run(directory: str | Path) -> dict | None:
    """The last record of DIR/runs.jsonl, or None when nothing was recorded."""
    path = Path(directory) / RUNS_FILE
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


class StageStep:
    """Decode incoming payloads, run the stage, forward what later stages need, encode it.

    Shared by the local pipeline and the network worker (runtime/worker.py), so a stage
    computes the same bytes wherever it runs.
    """

    kind = "stage"

    def __init__(self, session: StageSession, last: bool):
        self.session = session
        self.forward = session.stage.forward
        self.codec = None if last or session.stage.codec == "raw" else session.stage.codec

    def __call__(self, tensors: dict) -> dict:
        tensors = {name: decode(value) if isinstance(value, bytes) else value
                   for name, value in tensors.items()}
        available = {**tensors, **self.session.run(tensors)}
        forwarded = {name: available[name] for name in self.forward}
        if self.codec is None:
            return forwarded
        return {name: encode(array, self.codec) for name, array in forwarded.items()}


class _LinkStep:
    """Hold each message for as long as the link would take to carry it (emulation)."""

    kind = "link"

    def __init__(self, link: LinkEntry):
        self.link = link

    def __call__(self, tensors: dict) -> dict:
        wire = sum(len(v) if isinstance(v, bytes) else v.nbytes for v in tensors.values())
        time.sleep(self.link.latency_s + wire / self.link.bandwidth_bytes_s)
        return tensors


def _is_batched(entry, batch_size: int) -> bool:
    return len(entry.shape) >= 1 and entry.shape[0] == batch_size


def split_batch(manifest: Manifest, inputs: dict) -> list[dict[str, np.ndarray]]:
    """Check `inputs` against the manifest and cut them into microbatches of its batch size."""
    expected = {t.name: t for t in manifest.inputs}
    missing = [name for name in expected if name not in inputs]
    unknown = [name for name in inputs if name not in expected]
    if missing or unknown:
        raise InputError(
            f"inputs: missing {missing or 'none'}, unexpected {unknown or 'none'}; "
            f"the model takes {list(expected)}")
    batch = manifest.batch_size
    counts = set()
    arrays = {}
    for name, entry in expected.items():
        array = np.asarray(inputs[name])
        if array.dtype != np.dtype(entry.dtype):
            raise InputError(
                f"input {name!r} has dtype {array.dtype}, the model was compiled for "
                f"{entry.dtype}; convert it with .astype(np.{entry.dtype})")
        batched = _is_batched(entry, batch)
        tail_ok = array.shape[1:] == tuple(entry.shape[1:]) if batched else array.shape == tuple(entry.shape)
        bad_batch = batched and (array.shape[0] == 0 or array.shape[0] % batch)
        if array.ndim != len(entry.shape) or not tail_ok or bad_batch:
            rule = (f"[k*{batch}, {', '.join(map(str, entry.shape[1:]))}] for k >= 1 microbatches"
                    if batched else str(list(entry.shape)))
            raise InputError(
                f"input {name!r} has shape {list(array.shape)}, the model was compiled for "
                f"{list(entry.shape)}: pass {rule}")
        if batched:
            counts.add(array.shape[0] // batch)
        arrays[name] = array
    if len(counts) > 1:
        raise InputError(f"inputs: batched inputs disagree on the batch size ({sorted(counts)} microbatches)")
    count = counts.pop() if counts else 1
    return [
        {name: (array[i * batch:(i + 1) * batch] if _is_batched(expected[name], batch) else array)
         for name, array in arrays.items()}
        for i in range(count)
    ]


def gather_outputs(manifest: Manifest, per_microbatch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The model outputs from per-microbatch results (in order): concatenated on dim 0, or
    stacked for outputs without a batch dimension."""
    outputs = {}
    for entry in manifest.outputs:
        parts = [tensors[entry.tensor] for tensors in per_microbatch]
        if len(parts) == 1:
            outputs[entry.name] = parts[0]
        elif _is_batched(entry, manifest.batch_size):
            outputs[entry.name] = np.concatenate(parts, axis=0)
        else:
            outputs[entry.name] = np.stack(parts, axis=0)
    return outputs


class ModelIO:
    """The input and output names of a compiled model, for pipelines that hold its manifest."""

    manifest: Manifest

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.manifest.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.manifest.outputs)


class Pipeline(ModelIO):
    """Compiled stages, ready to run: `run({"input_ids": ids}) -> {"logits": ...}`."""

    def __init__(self, directory: str | Path, threads_per_stage: int | None = None,
                 emulate_links: bool = False, weights: WeightStore | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        if threads_per_stage is None:
            threads_per_stage = max(1, (os.cpu_count() or 1) // len(self.manifest.stages))
        self.threads_per_stage = threads_per_stage
        self.weights = WeightStore() if weights is None else weights
        self.weights.expect(self.directory, self.manifest.stages)
        self.sessions = [open_session(self.directory, stage, threads_per_stage, self.weights)
                         for stage in self.manifest.stages]
        self.steps: list = []
        for session in self.sessions:
            last = session is self.sessions[-1]
            self.steps.append(StageStep(session, last))
            if emulate_links and not last:
                self.steps.append(_LinkStep(_require_link(session.stage)))
        self.last_stats: RunStats | None = None

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run a batch (a multiple of the compiled batch size) through the pipeline."""
        microbatches = split_batch(self.manifest, inputs)
        started = time.perf_counter()
        queues = [queue.Queue(maxsize=QUEUE_DEPTH) for _ in range(len(self.steps) + 1)]
        errors: list[BaseException] = []
        busy = [0.0] * len(self.steps)

        def feed():
            for index, feeds in enumerate(microbatches):
                queues[0].put((index, feeds))
            queues[0].put(_DONE)

        def work(position: int, step):
            inbox, outbox = queues[position], queues[position + 1]
            while (item := inbox.get()) is not _DONE:
                if errors:
                    continue  # drain so upstream never blocks; the error is reported once
                index, tensors = item
                try:
                    tick = time.perf_counter()
                    result = step(tensors)
                    busy[position] += time.perf_counter() - tick
                    outbox.put((index, result))
                except Exception as exc:  # a failing step ends the run with its name on it
                    errors.append(exc if isinstance(exc, EdgeplanError) else StageError(
                        f"{step.kind} step {position} failed: {exc.__class__.__name__}: {exc}"))
            outbox.put(_DONE)

        threads = [threading.Thread(target=feed, daemon=True)]
        threads += [threading.Thread(target=work, args=(i, step), daemon=True)
                    for i, step in enumerate(self.steps)]
        for thread in threads:
            thread.start()
        results = []
        while (item := queues[-1].get()) is not _DONE:
            results.append(item)
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        results.sort(key=lambda item: item[0])
        count = len(microbatches)
        self.last_stats = RunStats(
            count, time.perf_counter() - started,
            tuple(b / count for b, step in zip(busy, self.steps) if step.kind == "stage"),
            tuple(b / count for b, step in zip(busy, self.steps) if step.kind == "link"),
            self.threads_per_stage)
        return gather_outputs(self.manifest, [tensors for _, tensors in results])


def _require_link(stage: StageEntry) -> LinkEntry:
    if stage.link is None:
        raise InputError(f"stage {stage.index}: the manifest has no link to the next stage to "
                         f"emulate; recompile with this edgeplan version")
    return stage.link


def load(directory: str | Path, threads_per_stage: int | None = None,
         emulate_links: bool = False, weights: WeightStore | None = None) -> Pipeline:
    """Load a compiled model directory (verifying artifact hashes) into a runnable Pipeline.

    With `emulate_links`, messages between stages are delayed as the planned links would.
    `weights`: a WeightStore to share weights with other pipelines, or to choose its
    `prepacking` (runtime/weights.py); by default each pipeline has its own, "auto".
    """
    return Pipeline(directory, threads_per_stage, emulate_links, weights)


__all__ = ["Pipeline", "RunStats", "TensorEntry", "WeightStore", "load"]
