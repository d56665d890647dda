"""Local pipeline: run the stages of a compiled model as a microbatched pipeline of threads.

A batch is cut along dim 0 into microbatches of the compiled batch size. One thread per
stage takes (sequence number, tensors) from a bounded queue, runs its session, keeps the
tensors the next stage needs (`forward` in the manifest) and passes them on; ONNX Runtime
releases the GIL, so stages overlap. Outputs are collected in order and concatenated
along dim 0 (an output without a batch dimension is stacked, one entry per microbatch).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeplan.errors import EdgeplanError, InputError, StageError
from edgeplan.runtime.manifest import Manifest, TensorEntry, read_manifest
from edgeplan.runtime.session import StageSession

QUEUE_DEPTH = 2
_DONE = object()


@dataclass(frozen=True)
class RunStats:
    """Measured wall time of the last run and per-stage busy time per microbatch."""

    microbatches: int
    wall_s: float
    stage_mean_s: tuple[float, ...]


def _is_batched(entry, batch_size: int) -> bool:
    return len(entry.shape) >= 1 and entry.shape[0] == batch_size


class Pipeline:
    """Compiled stages, ready to run: `run({"input_ids": ids}) -> {"logits": ...}`."""

    def __init__(self, directory: str | Path, threads_per_stage: int | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        if threads_per_stage is None:
            threads_per_stage = max(1, (os.cpu_count() or 1) // len(self.manifest.stages))
        self.sessions = [StageSession(self.directory, stage, threads_per_stage)
                         for stage in self.manifest.stages]
        self.last_stats: RunStats | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.manifest.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.manifest.outputs)

    def _microbatches(self, inputs: dict) -> list[dict[str, np.ndarray]]:
        expected = {t.name: t for t in self.manifest.inputs}
        missing = [name for name in expected if name not in inputs]
        unknown = [name for name in inputs if name not in expected]
        if missing or unknown:
            raise InputError(
                f"inputs: missing {missing or 'none'}, unexpected {unknown or 'none'}; "
                f"the model takes {list(expected)}")
        batch = self.manifest.batch_size
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
            if array.ndim != len(entry.shape) or not tail_ok or (batched and (array.shape[0] == 0 or array.shape[0] % batch)):
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

    def run(self, inputs: dict) -> dict[str, np.ndarray]:
        """Run a batch (a multiple of the compiled batch size) through the pipeline."""
        microbatches = self._microbatches(inputs)
        started = time.perf_counter()
        queues = [queue.Queue(maxsize=QUEUE_DEPTH) for _ in range(len(self.sessions) + 1)]
        errors: list[BaseException] = []
        busy = [0.0] * len(self.sessions)

        def feed():
            for index, feeds in enumerate(microbatches):
                queues[0].put((index, feeds))
            queues[0].put(_DONE)

        def work(position: int, session: StageSession):
            inbox, outbox = queues[position], queues[position + 1]
            forward = session.stage.forward
            while (item := inbox.get()) is not _DONE:
                if errors:
                    continue  # drain so upstream never blocks; the error is reported once
                index, tensors = item
                try:
                    tick = time.perf_counter()
                    produced = session.run(tensors)
                    busy[position] += time.perf_counter() - tick
                    available = {**tensors, **produced}
                    outbox.put((index, {name: available[name] for name in forward}))
                except Exception as exc:  # a stage failure ends the run with its name on it
                    errors.append(exc if isinstance(exc, EdgeplanError) else StageError(
                        f"stage {session.stage.index} on {session.stage.device}: {exc}"))
            outbox.put(_DONE)

        threads = [threading.Thread(target=feed, daemon=True)]
        threads += [threading.Thread(target=work, args=(i, s), daemon=True)
                    for i, s in enumerate(self.sessions)]
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
        self.last_stats = RunStats(len(microbatches), time.perf_counter() - started,
                                   tuple(b / len(microbatches) for b in busy))
        return self._gather([tensors for _, tensors in results])

    def _gather(self, per_microbatch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        outputs = {}
        for entry in self.manifest.outputs:
            parts = [tensors[entry.tensor] for tensors in per_microbatch]
            if len(parts) == 1:
                outputs[entry.name] = parts[0]
            elif _is_batched(entry, self.manifest.batch_size):
                outputs[entry.name] = np.concatenate(parts, axis=0)
            else:
                outputs[entry.name] = np.stack(parts, axis=0)
        return outputs


def load(directory: str | Path, threads_per_stage: int | None = None) -> Pipeline:
    """Load a compiled model directory (verifying artifact hashes) into a runnable Pipeline."""
    return Pipeline(directory, threads_per_stage)


__all__ = ["Pipeline", "RunStats", "TensorEntry", "load"]
