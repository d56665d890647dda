"""Profile: measure real per-unit latency on this host's ONNX Runtime CPU (and TVM).

    profile_units(model, example_inputs, threads=(1, 2), tvm=False) -> [UnitProfile, ...]
    ProfileStore("profiles.jsonl").append(records); .load(); .for_backend("host", "cpu1")

The model is captured, annotated and grouped into units (granularity "block") as the
compiler does, then split so that every unit is its own stage. The stage modules run in
order on the example inputs (as `emit_stages` does) to get each unit's concrete inputs;
each unit is exported to ONNX in a temporary directory and timed in an ONNX Runtime
session with `intra_op_num_threads = t` (inter-op 1, sequential execution, default graph
optimizations, intra-op spinning on: as the runtime's StageSession) for each t. Without
spinning a pool's worker sleeps between parallel ops and every op waits for it to wake:
on this VM the held-out CNN's units ran 0.65-0.86x their 1-thread time on two spinning
threads and 1.1-1.4x on two sleeping ones, HF GPT-2's LM head 0.58x and 1.06x, so a
profile without spinning prices a 2-thread stage up to twice what the runtime runs it
in (stores before this change, bench/data host-j ... host-r, did). In each round the
1-thread sessions are timed first, then each multi-thread session after
SPIN_WAKE_RUNS untimed runs (its pool awake and spinning, as between a pipeline's
microbatches) and followed by a pause of SPIN_SETTLE_S, until its pool stops spinning: a
pool left spinning takes a vCPU from the session timed next (HF GPT-2-256 as one stage,
2 threads: 3.7-4.1 ms per run after a pause, 5.6-8.2 ms right after another spinning
session of it, and 14 ms in a bench run without pauses). While a 1-thread session is
timed the calling thread is pinned to one CPU (`os.sched_setaffinity`; sessions are
created unpinned, so 2-thread pools keep every CPU): in one test unpinned 1-thread medians
moved by 20 % between the halves of a pass, pinned by 0.5 %. Every session is warmed up
(`warmup` untimed runs and at least WARMUP_S seconds), then timed in `rounds` interleaved rounds: each round runs every
session of the model in turn, ceil(repeats / rounds) runs timed one by one with
time.perf_counter, and at least MIN_ROUND_S seconds of runs, so tiny units get enough
samples and drift of a shared machine (other processes starting and stopping) falls on
all units alike instead of on whichever was timed at the time. The statistics are over
all timed runs. A fixed reference workload (`reference_model`: two 256 x 256 matmuls
with ReLU on 64 rows, built with onnx.helper, the same on every host) is timed before
and after every round, per thread count. Other tenants of this VM's host slow everything
down in bursts of seconds (the reference ran 127-215 us within one minute, at load
average < 1): a round whose reference ran more than DRIFT_TOLERANCE slower than the
fastest reference (of the call, or `fastest_reference` from earlier calls; the reference
with the fewest threads, pinned, decides: choose_rounds) is timed
again after a pause of RETRY_WAIT_S, doubled at every further slow round up to
MAX_RETRY_WAIT_S (23.5 s of waiting in all), up to `extra_rounds` more rounds, and the `rounds`
rounds with the steadiest reference are kept. Each record keeps the median
reference time of its kept rounds as `reference_s`, so records taken at different times
say how fast the machine was then. The time a predictor learns (`UnitProfile.time_s`) is
`quiet_s`, the median of the quietest round: each round's median of its runs, the
smallest over every round timed (retried ones too). A slow spell only adds time, and it
often covers a whole round without showing in the reference around it: six profiles of
the same two models in one process, spells coming and going, spread by 50-55 % (median
over units, cpu1) in their overall medians and by 2.7-3.6 % in quiet_s (cpu2, two threads
on two shared vCPUs, noisy either way: 29-60 % vs 5-59 %). With `tvm=True` each unit's ONNX file is
also built as a TVM Relax library for this host (the TVM target's dlight build, cached)
and timed with one thread in the same rounds: backend "tvm1". Each (unit, t) pair gives one
UnitProfile on backend `cpu{t}` of device "host" (the `host` device preset in
planner/fleet.py describes this machine; profiling on a fleet's device, name it instead:
`device=`, `edgeplan profile --device`), with robust statistics (median,
p10, p90, and the number of runs more than 3 scaled MADs from the median) and the unit's
static features, the inputs a latency predictor learns from.

Profile store format (JSON lines, UTF-8, one record per line, appended to, never
rewritten); every line is a JSON object:

    {"format": "edgeplan-profile", "version": 1,
     "model": "GPT", "unit": "blocks.0", "unit_index": 1,
     "device": "host", "host": "<platform.node()>", "backend": "cpu1",
     "runtime": "onnxruntime 1.x.y",
     "features": {"flops": ..., "bytes_moved": ..., "op_count": ..., "param_bytes": ...,
                  "activation_bytes": ..., "peak_activation_bytes": ..., "cut_bytes": ...,
                  "cut_nchw_bytes": ...,
                  "<kind>_count": ..., "<kind>_flops": ..., "<kind>_bytes": ...
                  for every kind in OP_KINDS},
     "median_s": ..., "p10_s": ..., "p90_s": ..., "repeats": 15, "outliers": 0,
     "timestamp": "2025-01-01T12:00:00+00:00",
     "parts": [], "reference_s": ..., "quiet_s": ..., "spinning": false}

"reference_s" is the reference workload's time on the same backend while the record was
measured, "quiet_s" the median of the quietest round (both 0 or absent: not measured, as
in records written before they existed or taken from runs, whose time is median_s).
"spinning" is true for a multi-thread session timed with its intra-op pool spinning, as the
runtime runs it; false or absent for one thread, for runs, and for the multi-thread
records of an edgeplan that timed the pool sleeping, which price a 2-thread backend up to
twice too slow (`sleeping_pool`; the predictor leaves them out of a backend that has
spinning records, and says so in a plan where it has only them).

A stage-level record (a measured stage of a recorded run, `records_from_run`) has the
stage's units in "unit" ("blocks.0..blocks.3"), the sum of their features in "features",
each unit's own features in "parts" (one object per unit, in order), and "repeats" is the
number of microbatches the time is averaged over. Unit records leave "parts" empty (it
may be omitted).

Empty lines are allowed (they carry nothing); any other line that is not such a record
makes `load` raise EdgeplanError naming the file and line number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeplan.errors import ArtifactError, EdgeplanError

FORMAT = "edgeplan-profile"
VERSION = 1
DEVICE = "host"
# The `runtime` of records taken from recorded runs (`records_from_run`), not profiled.
RUN_RUNTIME = "edgeplan run"
# Records of the sampled layer space (planner/layer_space.py) are named "<prefix><family>".
LAYER_SPACE_PREFIX = "layers-"
OP_KINDS = ("matmul", "bias", "conv", "stem", "depthwise", "attention", "norm", "elementwise", "reduce",
            "embedding", "layout", "aliased_layout", "epilogue", "copy", "view", "fused", "other")
# A run is an outlier when it lies more than this many scaled MADs from the median.
OUTLIER_MADS = 3.0
# Warm-up and timed time per round: enough runs for a unit of tens of microseconds to
# span many scheduler time slices, a negligible floor for a unit of milliseconds.
WARMUP_S = 0.01
MIN_ROUND_S = 0.005
# A round is timed again when the reference workload around it ran this much slower than
# the fastest it ran in the same call (other tenants' bursts slow it by up to 1.6x here).
DRIFT_TOLERANCE = 0.10
# Pause before timing a slowed round again, doubled for every further slow round up to
# MAX_RETRY_WAIT_S: most bursts last seconds, but some phases last half a minute (a zoo
# ResNet's five profiles over 27 s all ran with the reference 1.4-1.7x slow, which six
# retries 0.5 s apart did not wait out; its stages measured up to 50 % over its units).
RETRY_WAIT_S = 0.5
MAX_RETRY_WAIT_S = 8.0
# Rounds per call, and at most as many again timed while the machine ran slow: more, shorter
# rounds give the quietest round more chances (the same stages profiled five times each,
# interleaved, spread 2.5-3.3 % (cpu1) and 7.8-8.0 % (cpu2) with 6 rounds, 4.4-5.9 % and
# 11.8-47.7 % with 3; HF GPT-2's and a separable CNN's 14 units profiled four times each
# in a noisy phase, 6- and 12-round profiles interleaved: quiet_s's log-sd 9.0 % (cpu1)
# and 12.6 % (cpu2) with 6 rounds, 3.0 % and 7.5 % with 12, at twice the timing time).
ROUNDS = 12
# Untimed runs of a multi-thread session in each round before it is timed, so its pool's
# workers are awake; and the pause after it, so that its pool has stopped spinning before
# the next session is timed (a spinning pool went on slowing a pinned 1-thread reference
# by 4 % for 40-60 ms after its last run here).
SPIN_WAKE_RUNS = 3
SPIN_SETTLE_S = 0.1
MAD_SCALE = 1.4826  # MAD * 1.4826 estimates the standard deviation of a normal sample

Progress = Callable[[int, int, str], None]


# The TVM backend `profile_units(tvm=True)` adds: each unit built as a TVM Relax library
# for this host (dlight schedules, as `compile --targets tvm` builds it), one thread.
TVM_BACKEND = "tvm1"


def backend_name(threads: int) -> str:
    return f"cpu{threads}"


def backend_threads_of(backend: str) -> int | None:
    """The thread count of a backend named by `backend_name`; None for any other name."""
    match = re.fullmatch(r"cpu(\d+)", backend)
    return int(match[1]) if match else None


@dataclass(frozen=True)
class UnitProfile:
    """Measured latency of one unit on one backend, with the unit's static features."""

    model: str
    unit: str
    device: str
    backend: str
    features: dict[str, float]
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    timestamp: str
    outliers: int = 0
    unit_index: int = -1
    host: str = ""
    runtime: str = ""
    parts: tuple[dict[str, float], ...] = ()
    reference_s: float = 0.0
    quiet_s: float = 0.0
    # A multi-thread session timed with its intra-op pool spinning, as the runtime runs it;
    # False for one thread, runs, and multi-thread records of an edgeplan that timed the
    # pool sleeping (`sleeping_pool`).
    spinning: bool = False

    @property
    def time_s(self) -> float:
        """The unit's time on an undisturbed machine: the quietest round's median where it
        was measured (quiet_s), else the median over all runs (records taken from runs)."""
        return self.quiet_s if self.quiet_s > 0 else self.median_s

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> UnitProfile:
        """Parse one store record; raises ValueError or TypeError saying what is wrong."""
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("version")
        if version != VERSION:
            raise ValueError(f"version {version!r} is not supported (this edgeplan reads version "
                             f"{VERSION}); upgrade edgeplan or profile again")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        unknown = sorted(data.keys() - names - {"format", "version"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        parts = data.get("parts", [])
        if not isinstance(parts, list):
            raise ValueError(f"parts must be a list of feature objects, got {parts!r}")
        for features in (data["features"], *parts):
            if not isinstance(features, dict) or not all(
                    isinstance(k, str) and _is_number(v) for k, v in features.items()):
                raise ValueError("features and parts must be objects of numbers")
        for name in ("median_s", "p10_s", "p90_s", "reference_s", "quiet_s"):
            if name not in data:
                continue
            if not _is_number(data[name]) or not math.isfinite(data[name]) or data[name] < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {data[name]!r}")
        if "spinning" in data and not isinstance(data["spinning"], bool):
            raise ValueError(f"spinning must be true or false, got {data['spinning']!r}")
        for name in ("repeats", "outliers", "unit_index"):
            if name in data and (not isinstance(data[name], int) or isinstance(data[name], bool)):
                raise ValueError(f"{name} must be an integer, got {data[name]!r}")
        for name in ("model", "unit", "device", "backend", "timestamp", "host", "runtime"):
            if name in data and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string, got {data[name]!r}")
        values = {k: v for k, v in data.items() if k in names}
        values["features"] = {k: float(v) for k, v in data["features"].items()}
        values["parts"] = tuple({k: float(v) for k, v in part.items()} for part in parts)
        return cls(**values)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ProfileStore:
    """An append-only JSON-lines file of UnitProfile records (format: module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, records: Iterable[UnitProfile]) -> int:
        """Append records (creating the file); returns how many were written."""
        lines = [json.dumps(r.to_dict(), sort_keys=False) + "\n" for r in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A line cut short by an interrupted write must not swallow the next record:
        # start on a fresh line, so the damage stays one malformed line that load reports.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as existing:
                existing.seek(-1, 2)
                needs_newline = existing.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as out:
            if needs_newline:
                out.write("\n")
            out.writelines(lines)
        return len(lines)

    def load(self) -> list[UnitProfile]:
        """Every record, in file order; a malformed line raises EdgeplanError (file:line)."""
        if not self.path.is_file():
            raise EdgeplanError(f"profile store {self.path}: no such file; write one with "
                                f"`edgeplan profile FILE:FACTORY --store {self.path}`")
        records = []
        with open(self.path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(UnitProfile.from_dict(json.loads(line)))
                except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
                    raise EdgeplanError(
                        f"profile store {self.path}, line {number}: not an {FORMAT} record "
                        f"({exc}); fix or delete that line") from None
        return records

    def for_backend(self, device: str, backend: str) -> list[UnitProfile]:
        return [r for r in self.load() if r.device == device and r.backend == backend]


def unmarked_profile(record: UnitProfile) -> bool:
    """Whether a record was profiled on ONNX Runtime without the `spinning` mark: one thread,
    or a pool timed sleeping. Records of runs and hand-written ones (no "onnxruntime"
    runtime) are not profiles."""
    return record.runtime.startswith("onnxruntime") and not record.spinning


def sleeping_pool(record: UnitProfile) -> bool:
    """Whether a profiled record timed a multi-thread ONNX Runtime session with its pool
    sleeping between ops (backend cpu{t}, t > 1, unmarked): a backend the runtime never
    runs, as every edgeplan before the profiler kept pools spinning did."""
    return unmarked_profile(record) and (backend_threads_of(record.backend) or 1) > 1


def unit_features(unit) -> dict[str, float]:
    """Static features of a unit: its totals and per-op-kind counts, FLOPs and bytes moved."""
    features = {
        "flops": float(unit.flops),
        "bytes_moved": float(unit.bytes_moved),
        "op_count": float(unit.op_count),
        "param_bytes": float(unit.param_bytes),
        "activation_bytes": float(unit.activation_bytes),
        "peak_activation_bytes": float(unit.peak_activation_bytes),
        "cut_bytes": float(unit.cut_bytes),
        # 4-D activations crossing the cut: ONNX Runtime keeps them in its blocked conv
        # layout inside a stage and reorders them at a stage boundary.
        "cut_nchw_bytes": float(sum(t.nbytes for t in unit.cut_tensors if len(t.shape) == 4)),
        "cut_aliased_bytes": float(sum(t.nbytes for t in unit.cut_tensors if t.aliased_planes)),
    }
    for kind in OP_KINDS:
        for quantity in ("count", "flops", "bytes"):
            features[f"{kind}_{quantity}"] = 0.0
    for mix in unit.op_mix:
        kind = mix.kind if mix.kind in OP_KINDS else "other"
        features[f"{kind}_count"] += mix.count
        features[f"{kind}_flops"] += mix.flops
        features[f"{kind}_bytes"] += mix.bytes_moved
    return features


def robust_stats(samples: Sequence[float]) -> tuple[float, float, float, int]:
    """(median, p10, p90, outliers): outliers lie > OUTLIER_MADS scaled MADs from the median."""
    import numpy as np

    values = np.asarray(samples, dtype=np.float64)
    median = float(np.median(values))
    p10, p90 = (float(v) for v in np.percentile(values, [10, 90]))
    mad = float(np.median(np.abs(values - median))) * MAD_SCALE
    outliers = int(np.sum(np.abs(values - median) > OUTLIER_MADS * mad)) if mad > 0 else 0
    return median, p10, p90, outliers


def onnx_session(path: Path | bytes, threads: int):
    """An ONNX Runtime CPU session as the profiler times one: `threads` intra-op threads,
    sequential, its pool spinning as in the runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # ONNX Runtime's default intra-op spinning stays on, as in the runtime (module docstring).
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def reference_model() -> bytes:
    """The fixed reference workload, serialized ONNX: relu(relu(x @ w1) @ w2), x 64 x 256,
    w1 and w2 256 x 256 (seeded), 17 MFLOP."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((256, 256), dtype=np.float32) / 16,
                                       name) for name in ("w1", "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["y"])]
    graph = helper.make_graph(nodes, "edgeplan-reference",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def reference_feeds() -> dict:
    """The reference workload's input x (seeded, 64 x 256 float32)."""
    import numpy as np

    return {"x": np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32)}


def choose_rounds(round_references: Sequence[dict[int, float]], fastest: dict[int, float],
                  rounds: int, extra_rounds: int) -> list[int] | None:
    """Indices of the rounds to keep, or None to time another round.

    `round_references[i]` is the reference workload's time around round i per thread
    count, `fastest` the fastest reference time seen. The machine's speed is read from the
    reference with the fewest threads (pinned to one CPU: other tenants' slow spells show
    there; a 2-thread reference also swings with whatever runs on the other vCPU, often
    for minutes, which no retry waits out). Done when `rounds` rounds are steady (within
    DRIFT_TOLERANCE of the fastest) or `rounds + extra_rounds` were timed; then the
    `rounds` rounds with the lowest reference relative to the fastest are kept.
    """
    steady = sum(_is_steady(refs, fastest) for refs in round_references)
    if steady < rounds and len(round_references) < rounds + extra_rounds:
        return None
    slowdown = [refs[min(refs)] / fastest[min(refs)] for refs in round_references]
    return sorted(sorted(range(len(round_references)), key=lambda i: slowdown[i])[:rounds])


def fastest_reference_of(records: Iterable[UnitProfile], host: str | None = None,
                         device: str = DEVICE,
                         backend_threads: Mapping[str, int] | None = None) -> dict[int, float]:
    """Thread count -> the fastest `reference_s` among this host's records of `device`
    (backends cpu{t}, and those `backend_threads` names: backend -> thread count, for
    records profiled under a fleet's backend name): what `profile_units(fastest_reference=...)`
    takes, so that profiling added to a store later waits out slow spells judged by the
    store's own speed."""
    host = platform.node() if host is None else host
    named = backend_threads or {}
    fastest: dict[int, float] = {}
    for r in records:
        if r.reference_s <= 0 or r.device != device or r.host != host:
            continue
        threads = named.get(r.backend, backend_threads_of(r.backend))
        if threads is not None:
            fastest[threads] = min(fastest.get(threads, r.reference_s), r.reference_s)
    return fastest


def _is_steady(references: dict[int, float], fastest: dict[int, float]) -> bool:
    """Whether a round's fewest-thread reference lies within DRIFT_TOLERANCE of the fastest."""
    probe = min(references)
    return references[probe] <= fastest[probe] * (1.0 + DRIFT_TOLERANCE)


def pinned_cpu() -> int | None:
    """The CPU 1-thread timings run on: the last one this process may use (None where
    the platform has no affinity control)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return max(os.sched_getaffinity(0))


def pinned_for(threads: int, cpu: int | None):
    """1-thread timings run pinned to `cpu`, others unpinned (module docstring): `pinned`
    for a session of `threads` threads."""
    return pinned(cpu if threads == 1 else None)


@contextmanager
def pinned(cpu: int | None):
    """Pin the calling thread to `cpu` for the block (no-op for None), then restore."""
    if cpu is None:
        yield
        return
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def time_session(session, feeds: dict, warmup: int, repeats: int, min_s: float = 0.0) -> list[float]:
    """Per-run seconds of `repeats` runs (more, until they took `min_s`) after `warmup`
    untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples: list[float] = []
    while len(samples) < repeats or sum(samples) < min_s:
        started = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - started)
    return samples


def warm_up(session, feeds: dict, warmup: int) -> None:
    """`warmup` untimed runs, and more until they took WARMUP_S (allocations, caches)."""
    started = time.perf_counter()
    count = 0
    while count < warmup or time.perf_counter() - started < WARMUP_S:
        session.run(None, feeds)
        count += 1


def profile_units(model, example_inputs, *, threads: Sequence[int] = (1, 2), warmup: int = 3,
                  repeats: int = 15, rounds: int = ROUNDS, extra_rounds: int | None = None,
                  fastest_reference: Mapping[int, float] | None = None,
                  name: str | None = None,
                  progress: Progress | None = None,
                  stage_of_unit: Sequence[int] | None = None,
                  splits: Sequence[Sequence[int]] | None = None,
                  tvm: bool = False, on_tvm_failure: Callable[[str, str], None] | None = None,
                  device: str = DEVICE) -> list[UnitProfile]:
    """Measure every unit of `model` on backends cpu{t} of this machine for t in `threads`,
    recorded as fleet device `device` ("host" by default: the `host` preset; on a fleet's
    device, its name or its preset kind, which `Predictor.model_for` looks up in that order).

    Returns one UnitProfile per (unit, backend), units in graph order and within a unit
    the thread counts in the given order, then TVM_BACKEND. `progress(done, total, label)` is called
    after each export and each kept timing round (and once with done=0 before starting).
    Rounds timed while the machine ran slow are repeated, at most `extra_rounds` times
    (default: `rounds`; module docstring); `fastest_reference` (thread count -> the
    fastest `reference_s` of records profiled before on this host) keeps a call that runs
    entirely in a slow spell from taking it for the machine's speed.

    With `stage_of_unit` (the stage index of every unit, as a plan assigns them), the
    stages are timed instead, each exported as one ONNX file like the compiler emits it:
    a stage of several units gives a stage-level record (summed features and "parts").
    With `splits` (several such lists), the stages of all of them are timed in the same
    rounds, each distinct stage once (in the order of first appearance): put the units alone
    (`list(range(units))`) next to splits into pairs, and the difference between a stage
    and its units is measured at the same moments of the machine instead of calls apart.

    With `tvm`, every unit (or stage) is also built as a TVM library for this host and
    timed with one thread, interleaved with the ONNX Runtime sessions: backend TVM_BACKEND
    (needs apache-tvm; builds are cached like the TVM target's). A unit (or stage) TVM
    cannot build raises the TVM target's error, or, with `on_tvm_failure`, is timed on
    ONNX Runtime only and reported as on_tvm_failure(its name, the error): TVM's ONNX
    importer lacks operators ONNX Runtime runs (Tile of a symbolic shape in grouped-query
    attention), and one such unit need not cost the rest of the model its TVM records.
    """
    import numpy as np
    import onnxruntime as ort

    from edgeplan.passes.annotate import annotate
    from edgeplan.passes.capture import bind_inputs, capture, signature_of
    from edgeplan.passes.split import run_stages, split_stages
    from edgeplan.passes.units import group_units
    from edgeplan.targets.onnx import OnnxTarget

    threads = tuple(int(t) for t in threads)
    if not threads or any(t < 1 for t in threads):
        raise EdgeplanError(f"profile: thread counts must be >= 1, got {list(threads)}")
    if len(set(threads)) != len(threads):
        raise EdgeplanError(f"profile: thread counts repeat: {list(threads)}")
    extra_rounds = rounds if extra_rounds is None else extra_rounds
    if repeats < 1 or warmup < 0 or rounds < 1 or extra_rounds < 0:
        raise EdgeplanError(f"profile: need repeats >= 1, warmup >= 0, rounds >= 1 and "
                            f"extra_rounds >= 0, got {repeats}, {warmup}, {rounds}, {extra_rounds}")

    if tvm:
        from edgeplan.targets.tvm import require_tvm

        require_tvm()  # one error up front, not one per unit
    gm = annotate(capture(model, example_inputs, name))
    signature = signature_of(gm)
    if signature.on_meta:
        raise EdgeplanError("profile: the model's weights are on the meta device, so there is "
                            "nothing to run; build it with real weights (device='cpu')")
    units = group_units(gm, "block")
    if stage_of_unit is not None and splits is not None:
        raise EdgeplanError("profile: give stage_of_unit (one split) or splits (several), not both")
    if splits is None:
        splits = [list(range(len(units))) if stage_of_unit is None else stage_of_unit]
    if not splits:
        raise EdgeplanError("profile: splits is empty; give at least one stage_of_unit list")
    # (split, stage index in it, its units) of every distinct stage, first appearance first
    stages: list[tuple[list[int], int, list]] = []
    seen_spans = set()
    for split in splits:
        split = _checked_split(split, len(units))
        for index in range(split[-1] + 1):
            group = [u for u in units if split[u.index] == index]
            if (group[0].index, group[-1].index) not in seen_spans:
                seen_spans.add((group[0].index, group[-1].index))
                stages.append((split, index, group))
    env = bind_inputs(signature, example_inputs)
    total = len(stages) * (2 if tvm else 1) + rounds
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    if progress is not None:
        progress(0, total, "capture")
    host = platform.node()
    runtime = f"onnxruntime {ort.__version__}"
    target = OnnxTarget()
    records: list[UnitProfile] = []
    with tempfile.TemporaryDirectory(prefix="edgeplan-profile-") as tmp:
        exported = []
        for number, split in enumerate(dict.fromkeys(tuple(split) for split, _, _ in stages)):
            wanted = {index: group for used, index, group in stages if tuple(used) == split}
            folder = Path(tmp) / f"split{number}"  # emit names files by stage index
            folder.mkdir()
            for index, (stage_graph, args) in enumerate(run_stages(split_stages(gm, list(split)), env)):
                if index not in wanted:
                    continue
                artifact = target.emit(stage_graph, index, args, folder)
                feeds = {n: a.detach().cpu().numpy() for n, a in zip(stage_graph.inputs, args)}
                exported.append((index, wanted[index], folder / artifact.path, feeds))
                step(f"export {_group_name(wanted[index])}")

        # keys: (unit or stage index, its units, backend, threads the timing uses)
        runs, keys = [], []
        for index, group, path, feeds in exported:
            for t in threads:
                session = onnx_session(path, t)
                # The exporter drops inputs a unit does not read: feed what the file asks for.
                wanted = [i.name for i in session.get_inputs()]
                feeds_used = {k: feeds[k] for k in wanted}
                runs.append((session, feeds_used))
                keys.append((index, group, backend_name(t), t))
            if tvm:
                try:
                    runs.append((_tvm_runner(path, index, session, feeds_used), feeds_used))
                    keys.append((index, group, TVM_BACKEND, 1))
                except ArtifactError as error:
                    if on_tvm_failure is None:
                        raise
                    on_tvm_failure(_group_name(group), str(error))
                step(f"build TVM {_group_name(group)}")
        reference_input = reference_feeds()
        timed_threads = sorted({t for *_, t in keys})
        references = {t: onnx_session(reference_model(), t) for t in timed_threads}
        cpu = pinned_cpu()

        for (session, feeds), (*_, t) in zip(runs, keys):
            with pinned_for(t, cpu):
                warm_up(session, feeds, warmup)
        for t, session in references.items():
            with pinned_for(t, cpu):
                warm_up(session, reference_input, warmup)
        if max(timed_threads) > 1:
            time.sleep(SPIN_SETTLE_S)  # the warmed pools stop spinning before anything is timed

        def timed_by_threads(sessions, repeats_each: int) -> list[list[float]]:
            """Per-run seconds of each (session, feeds, threads), 1-thread sessions first,
            each multi-thread one woken first and left to stop spinning after (module
            docstring: spinning); returned in the given order."""
            timed: list[list[float]] = [[] for _ in sessions]
            for i in sorted(range(len(sessions)), key=lambda i: sessions[i][2]):
                session, feeds, t = sessions[i]
                with pinned_for(t, cpu):
                    timed[i] = time_session(session, feeds, SPIN_WAKE_RUNS if t > 1 else 0, repeats_each,
                                            MIN_ROUND_S)
                if t > 1:
                    time.sleep(SPIN_SETTLE_S)
            return timed

        def reference_times() -> dict[int, float]:
            timed = timed_by_threads([(session, reference_input, t) for t, session in references.items()], 5)
            return {t: float(np.median(samples)) for t, samples in zip(references, timed)}

        def time_round() -> list[list[float]]:
            return timed_by_threads([(session, feeds, t) for (session, feeds), (*_, t) in zip(runs, keys)],
                                    math.ceil(repeats / rounds))

        # Every round timed: the slower of the reference times before and after it (per
        # thread count) and its samples per session; choose_rounds says when to stop.
        round_references: list[dict[int, float]] = []
        round_samples: list[list[list[float]]] = []
        before = reference_times()
        fastest = {t: min(before[t], (fastest_reference or {}).get(t, math.inf)) for t in timed_threads}
        reported = 0
        wait_s = RETRY_WAIT_S
        while True:
            if round_references and not _is_steady(round_references[-1], fastest):
                time.sleep(wait_s)
                wait_s = min(2.0 * wait_s, MAX_RETRY_WAIT_S)
                before = reference_times()
            round_samples.append(time_round())
            after = reference_times()
            fastest = {t: min(fastest[t], before[t], after[t]) for t in timed_threads}
            round_references.append({t: max(before[t], after[t]) for t in timed_threads})
            before = after
            kept = choose_rounds(round_references, fastest, rounds, extra_rounds)
            steady = rounds if kept is not None else sum(
                _is_steady(r, fastest) for r in round_references)
            while reported < min(steady, rounds):
                reported += 1
                step(f"round {reported}/{rounds}" + (
                    f" ({len(round_references) - steady} timed again: machine slowed)"
                    if kept is None and len(round_references) > steady else ""))
            if kept is not None:
                break
        samples_per_run = [[x for k in kept for x in round_samples[k][i]] for i in range(len(runs))]
        reference_rounds = {t: [round_references[k][t] for k in kept] for t in timed_threads}
        runs.clear()  # the sessions are done: free them before building records
        references.clear()
        for i, ((index, group, backend, t), timed) in enumerate(zip(keys, samples_per_run)):
            parts = tuple(unit_features(unit) for unit in group)
            median, p10, p90, outliers = robust_stats(timed)
            quiet = min(float(np.median(samples[i])) for samples in round_samples)
            records.append(UnitProfile(
                model=signature.name, unit=_group_name(group), device=device,
                backend=backend, features=combine_features(parts), median_s=median,
                p10_s=p10, p90_s=p90, repeats=len(timed),
                timestamp=datetime.now(UTC).isoformat(timespec="seconds"), outliers=outliers,
                unit_index=index, host=host, runtime=runtime,
                parts=parts if len(parts) > 1 else (),
                reference_s=float(np.median(reference_rounds[t])), quiet_s=quiet,
                spinning=t > 1))
    order = [backend_name(t) for t in threads] + [TVM_BACKEND]
    position = {_group_name(group): i for i, (_, _, group) in enumerate(stages)}
    records.sort(key=lambda r: (position[r.unit], order.index(r.backend)))
    return records


def _checked_split(stage_of_unit: Sequence[int], count: int) -> list[int]:
    split = [int(s) for s in stage_of_unit]
    if len(split) != count or split != sorted(split) or any(
            b - a > 1 for a, b in zip([-1, *split], split)):
        raise EdgeplanError(f"profile: stage_of_unit must give each of the {count} units a "
                            f"stage index, starting at 0 and growing by 0 or 1, got {list(stage_of_unit)}")
    return split


class _TvmRunner:
    """A TVM stage session behind ONNX Runtime's `run(output_names, feeds)`, so both are
    warmed up and timed by the same code."""

    def __init__(self, session):
        self.session = session

    def run(self, _output_names, feeds):
        return self.session.run(feeds)


def _tvm_runner(path: Path, index: int, unit_session, feeds: dict) -> _TvmRunner:
    """The unit's ONNX file built as a TVM library next to it, in a one-thread session."""
    from edgeplan.runtime.manifest import StageEntry, TensorEntry
    from edgeplan.runtime.tvm_session import TvmStageSession
    from edgeplan.targets.tvm import TvmTarget

    built = TvmTarget(target="host", schedule="dlight").emit(path, index, path.parent)
    outputs = unit_session.run(None, feeds)
    entry = StageEntry(
        index=index, device=DEVICE, backend=TVM_BACKEND, execution_providers=("tvm:llvm",),
        artifact=built.artifact,
        inputs=tuple(TensorEntry(n, tuple(a.shape), str(a.dtype)) for n, a in feeds.items()),
        outputs=tuple(TensorEntry(o.name, tuple(a.shape), str(a.dtype))
                      for o, a in zip(unit_session.get_outputs(), outputs)),
        forward=())
    return _TvmRunner(TvmStageSession(path.parent, entry, threads=1))


def stage_label(names: Sequence[str]) -> str:
    """A record's `unit` field for consecutive units run as one stage: the unit's name, or
    "first..last"."""
    return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def _group_name(units) -> str:
    return stage_label([unit.name for unit in units])


def combine_features(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Features of consecutive units run as one stage: sums, except the peak (the largest)
    and the cut (the last unit's)."""
    combined = {key: sum(part.get(key, 0.0) for part in parts) for key in parts[0]}
    combined["peak_activation_bytes"] = max(part.get("peak_activation_bytes", 0.0) for part in parts)
    for key in ("cut_bytes", "cut_nchw_bytes"):
        combined[key] = parts[-1].get(key, 0.0)
    return combined


def records_from_run(directory: str | Path, known: Iterable[UnitProfile] = ()) -> list[UnitProfile]:
    """Stage-level records from the recorded runs of a compiled directory (DIR/runs.jsonl).

    One record per stage and run: the stage's measured busy time per microbatch (codecs
    included), its units' features from plan.json as "parts". A local run measured this
    host: device "host", backend cpu{threads per stage}; a remote run measured the planned
    device (its preset kind, else its name) and backend. Runs already in `known` (same
    model, stage and timestamp) are skipped, so importing a directory twice adds nothing.
    """
    from edgeplan.planner.plan import Plan
    from edgeplan.runtime.pipeline import RUNS_FILE

    directory = Path(directory)
    plan = Plan.from_json(directory)
    runs_path = directory / RUNS_FILE
    if not runs_path.is_file():
        raise EdgeplanError(f"{runs_path}: no recorded runs; run the model first with "
                            f"`edgeplan run {directory} --inputs INPUTS.npz`")
    missing = [u.name for u in plan.units if not u.features]
    if missing:
        raise EdgeplanError(f"{directory}/plan.json has no unit features (units {missing[:3]}...): "
                            f"it was compiled by an older edgeplan; compile it again")
    kinds = {d["name"]: d.get("kind", "custom") for d in plan.fleet.get("device", [])}
    seen = {(r.model, r.unit, r.timestamp) for r in known}
    records, skipped = [], 0
    for number, line in enumerate(runs_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
            times = [float(t) for t in run["stage_mean_s"]]
            stamp = datetime.fromtimestamp(float(run["time"]), UTC).isoformat(timespec="seconds")
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeplanError(f"{runs_path}, line {number}: not a run record ({exc}); fix or "
                                f"delete that line") from None
        if len(times) != len(plan.stages):
            raise EdgeplanError(f"{runs_path}, line {number}: {len(times)} stage times for a plan "
                                f"of {len(plan.stages)} stages; the directory was recompiled after "
                                f"that run: delete the old lines of {RUNS_FILE}")
        threads = int(run.get("threads_per_stage", 0))
        if not run.get("remote") and threads < 1:
            skipped += 1  # recorded before runs said their thread count: backend unknown
            continue
        for stage, seconds in zip(plan.stages, times):
            parts = tuple(dict(plan.units[u].features) for u in range(stage.unit_start, stage.unit_end))
            units = plan.units[stage.unit_start:stage.unit_end]
            label = _group_name(units)
            if (plan.model, label, stamp) in seen:
                continue
            if run.get("remote"):
                kind = kinds.get(stage.device, "custom")
                device, backend = (stage.device if kind == "custom" else kind), stage.backend
            else:
                device, backend = DEVICE, backend_name(threads)
            records.append(UnitProfile(
                model=plan.model, unit=label, device=device, backend=backend,
                features=combine_features(parts), median_s=seconds, p10_s=seconds, p90_s=seconds,
                repeats=int(run.get("microbatches", 1)), timestamp=stamp, unit_index=stage.index,
                host=str(run.get("host", "")), runtime=RUN_RUNTIME,
                parts=parts if len(parts) > 1 else ()))
    if not records and skipped:
        raise EdgeplanError(f"{runs_path}: its runs do not say how many threads each stage ran "
                            f"with (recorded by an older edgeplan); run the model again")
    return records


def format_profiles(records: Sequence[UnitProfile]) -> str:
    """One table per backend: unit, MFLOPs, params MB, median and p10-p90 ms, and a total."""
    backends = list(dict.fromkeys((r.device, r.backend) for r in records))
    blocks = []
    for device, backend in backends:
        rows = [r for r in records if (r.device, r.backend) == (device, backend)]
        width = max([len("unit"), len("total")] + [len(r.unit) for r in rows])
        lines = [f"{device}/{backend} ({rows[0].model}, {rows[0].repeats} runs each)",
                 (f"  {'unit':<{width}} {'MFLOP':>9} {'params MB':>9} {'median ms':>9} "
                  f"{'p10-p90 ms':>15} {'outl':>4}")]
        for r in rows:
            lines.append(
                f"  {r.unit:<{width}} {r.features.get('flops', 0) / 1e6:>9.2f} "
                f"{r.features.get('param_bytes', 0) / 1e6:>9.3f} {r.median_s * 1e3:>9.3f} "
                f"{f'{r.p10_s * 1e3:.3f}-{r.p90_s * 1e3:.3f}':>15} {r.outliers:>4}")
        lines.append(
            f"  {'total':<{width}} {sum(r.features.get('flops', 0) for r in rows) / 1e6:>9.2f} "
            f"{sum(r.features.get('param_bytes', 0) for r in rows) / 1e6:>9.3f} "
            f"{sum(r.median_s for r in rows) * 1e3:>9.3f}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


__all__ = [
    "FORMAT",
    "OP_KINDS",
    "VERSION",
    "ProfileStore",
    "UnitProfile",
    "backend_name",
    "choose_rounds",
    "combine_features",
    "fastest_reference_of",
    "format_profiles",
    "profile_units",
    "records_from_run",
    "reference_model",
    "robust_stats",
    "sleeping_pool",
    "unit_features",
    "unmarked_profile",
]
