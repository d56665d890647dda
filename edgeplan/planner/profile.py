"""Profile: measure real per-unit latency on this host's ONNX Runtime CPU backend.

    profile_units(model, example_inputs, threads=(1, 2)) -> [UnitProfile, ...]
    ProfileStore("profiles.jsonl").append(records); .load(); .for_backend("host", "host-cpu1")

The model is captured, annotated and grouped into units (granularity "block") as the
compiler does, then split so that every unit is its own stage. The stage modules run in
order on the example inputs (as `emit_onnx` does) to get each unit's concrete inputs;
each unit is exported to ONNX in a temporary directory and timed in an ONNX Runtime
session with `intra_op_num_threads = t` (inter-op 1, sequential execution, default graph
optimizations, as the runtime's StageSession) for each t: `warmup` untimed runs, then
`repeats` runs timed one by one with time.perf_counter. Each (unit, t) pair gives one
UnitProfile on backend `host-cpu{t}` of device "host", with robust statistics (median,
p10, p90, and the number of runs more than 3 scaled MADs from the median) and the unit's
static features, the inputs a latency predictor learns from.

Profile store format (JSON lines, UTF-8, one record per line, appended to, never
rewritten); every line is a JSON object:

    {"format": "edgeplan-profile", "version": 1,
     "model": "GPT", "unit": "blocks.0", "unit_index": 1,
     "device": "host", "host": "<platform.node()>", "backend": "host-cpu1",
     "runtime": "onnxruntime 1.x.y",
     "features": {"flops": ..., "bytes_moved": ..., "op_count": ..., "param_bytes": ...,
                  "activation_bytes": ..., "peak_activation_bytes": ..., "cut_bytes": ...,
                  "<kind>_count": ..., "<kind>_flops": ... for every kind in OP_KINDS},
     "median_s": ..., "p10_s": ..., "p90_s": ..., "repeats": 15, "outliers": 0,
     "timestamp": "2025-01-01T12:00:00+00:00"}

Empty lines are allowed (they carry nothing); any other line that is not such a record
makes `load` raise EdgeplanError naming the file and line number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from edgeplan.errors import EdgeplanError

FORMAT = "edgeplan-profile"
VERSION = 1
DEVICE = "host"
OP_KINDS = ("matmul", "conv", "attention", "norm", "elementwise", "reduce", "embedding", "view",
            "other")
# A run is an outlier when it lies more than this many scaled MADs from the median.
OUTLIER_MADS = 3.0
MAD_SCALE = 1.4826  # MAD * 1.4826 estimates the standard deviation of a normal sample

Progress = Callable[[int, int, str], None]


def backend_name(threads: int) -> str:
    return f"host-cpu{threads}"


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
        features = data["features"]
        if not isinstance(features, dict) or not all(
                isinstance(k, str) and _is_number(v) for k, v in features.items()):
            raise ValueError("features must be an object of numbers")
        for name in ("median_s", "p10_s", "p90_s"):
            if not _is_number(data[name]) or not math.isfinite(data[name]) or data[name] < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {data[name]!r}")
        for name in ("repeats", "outliers", "unit_index"):
            if name in data and (not isinstance(data[name], int) or isinstance(data[name], bool)):
                raise ValueError(f"{name} must be an integer, got {data[name]!r}")
        for name in ("model", "unit", "device", "backend", "timestamp", "host", "runtime"):
            if name in data and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string, got {data[name]!r}")
        values = {k: v for k, v in data.items() if k in names}
        values["features"] = {k: float(v) for k, v in features.items()}
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


def unit_features(gm, unit) -> dict[str, float]:
    """Static features of a unit: its totals and per-op-kind counts and FLOPs."""
    from edgeplan.passes.records import COST_KEY

    features = {
        "flops": float(unit.flops),
        "bytes_moved": float(unit.bytes_moved),
        "op_count": float(unit.op_count),
        "param_bytes": float(unit.param_bytes),
        "activation_bytes": float(unit.activation_bytes),
        "peak_activation_bytes": float(unit.peak_activation_bytes),
        "cut_bytes": float(unit.cut_bytes),
    }
    for kind in OP_KINDS:
        features[f"{kind}_count"] = 0.0
        features[f"{kind}_flops"] = 0.0
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in unit.nodes:
        cost = by_name[name].meta[COST_KEY]
        kind = cost.kind if cost.kind in OP_KINDS else "other"
        features[f"{kind}_count"] += 1
        features[f"{kind}_flops"] += cost.flops
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


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_session(session, feeds: dict, warmup: int, repeats: int) -> list[float]:
    """Per-run seconds of `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - started)
    return samples


def profile_units(model, example_inputs, *, threads: Sequence[int] = (1, 2), warmup: int = 3,
                  repeats: int = 15, name: str | None = None,
                  progress: Progress | None = None) -> list[UnitProfile]:
    """Measure every unit of `model` on backends host-cpu{t} for t in `threads`.

    Returns one UnitProfile per (unit, thread count), units in graph order and thread
    counts in the given order within a unit. `progress(done, total, label)` is called
    after each export and each timing (and once with done=0 before starting).
    """
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
    if repeats < 1 or warmup < 0:
        raise EdgeplanError(f"profile: need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")

    gm = annotate(capture(model, example_inputs, name))
    signature = signature_of(gm)
    if signature.on_meta:
        raise EdgeplanError("profile: the model's weights are on the meta device, so there is "
                            "nothing to run; build it with real weights (device='cpu')")
    units = group_units(gm, "block")
    stage_graphs = split_stages(gm, list(range(len(units))))
    env = bind_inputs(signature, example_inputs)
    total = len(units) * (1 + len(threads))
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
        for unit, (stage_graph, args) in zip(units, run_stages(stage_graphs, env)):
            artifact = target.emit(stage_graph, unit.index, args, Path(tmp))
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(stage_graph.inputs, args)}
            exported.append((unit, Path(tmp) / artifact.path, feeds))
            step(f"export {unit.name}")

        for unit, path, feeds in exported:
            features = unit_features(gm, unit)
            for t in threads:
                session = _session(path, t)
                # The exporter drops inputs a unit does not read: feed what the file asks for.
                wanted = {i.name for i in session.get_inputs()}
                samples = time_session(session, {k: v for k, v in feeds.items() if k in wanted},
                                       warmup, repeats)
                del session
                median, p10, p90, outliers = robust_stats(samples)
                records.append(UnitProfile(
                    model=signature.name, unit=unit.name, device=DEVICE, backend=backend_name(t),
                    features=dict(features), median_s=median, p10_s=p10, p90_s=p90,
                    repeats=repeats, timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
                    outliers=outliers, unit_index=unit.index, host=host, runtime=runtime))
                step(f"time {unit.name} {backend_name(t)}")
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
    "format_profiles",
    "profile_units",
    "robust_stats",
    "unit_features",
]
