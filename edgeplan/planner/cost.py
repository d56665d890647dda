"""Cost model: units x fleet -> CostTables, the numpy arrays the partition solver reads.

The interface is `CostModel.costs(units, fleet, mode) -> CostTables`. The default,
`RooflineCostModel`, predicts a unit's time on a backend as
    max(flops / (peak * efficiency), bytes_moved / bandwidth) + op_count * op_overhead
and a link's time as latency + bytes / bandwidth. A learned predictor replaces it by
returning the same tables.

Memory per unit has two parts, because a stage holds all of its weights but only one
unit's activations at a time:
    stage memory = sum(memory_sum_bytes[units]) + max(memory_max_bytes[units])
Inference: sum = weights, max = peak live activations.
Training: sum = weights x 4 (weights, gradients, two Adam moments) + saved activations x
in-flight microbatches; max = peak live activations.

A weight read by several units (tied embeddings, a layer merged across models) is in the
sum of each of them; a device holds it once. `shared_weights` lists such weights
(bytes, as the sum counts them, and the units that read them), and a stage subtracts
what its range counts more than once:
    stage memory = sum - sum_w bytes_w * max(0, units of the stage reading w - 1) + max

Torch-free: units are read through their plain attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from edgeplan.planner.fleet import Fleet

MODES = ("inference", "training")
# Adam keeps two moments per weight, plus the gradient and the weight itself.
TRAINING_BYTES_PER_WEIGHT_BYTE = 4


class UnitLike(Protocol):
    name: str
    flops: int
    bytes_moved: int
    op_count: int
    param_bytes: int
    activation_bytes: int
    peak_activation_bytes: int
    cut_bytes: int


@dataclass(frozen=True, eq=False)
class CostTables:
    """Arrays the solver reads; U units, K slots (device, backend), D devices.

    compute_s[U, K]         seconds of unit u on slot k
    memory_sum_bytes[U]     bytes that add up within a stage (weights, saved activations)
    memory_max_bytes[U]     bytes of which a stage needs only the largest (live activations)
    cut_bytes[U-1]          bytes crossing the cut after unit u
    device_memory_bytes[D]  memory budget of each device
    link_latency_s[D, D]    link latency between devices (diagonal 0)
    link_bandwidth[D, D]    link bandwidth in bytes/s (diagonal inf)
    slot_device[K]          device index of each slot

    Boundary codecs (filled by passes.compress; without it every cut is sent raw):
    codec_names[C]          codecs a cut may use, "raw" first
    codec_wire_bytes[U-1,C] bytes on the wire for the cut after unit u with codec c
    codec_encode_s[U-1,C]   seconds to encode it (charged to the sending stage)
    codec_decode_s[U-1,C]   seconds to decode it (charged to the receiving stage)
    codec_allowed[U-1,C]    within the error budget and not dominated by another codec
    codec_time_scale[D]     codec times on device d = the times above (measured on the
                            compiling host) x codec_time_scale[d] (host / device codec speed)

    Learned cost models (planner.predictor) mark what they could not predict:
    guessed[U, K]           compute_s[u, k] is a roofline guess, not learned from
                            measurements (None: the model says for itself, e.g. roofline)
    slot_sources[K]         where slot k's learned costs come from ("" where none do): an own
                            fit on n records, or adapted from another device/backend

    stage_overhead_s[K]     seconds a stage on slot k pays once per run, whatever its units
                            (a session run's fixed cost; learned models measure it, the
                            roofline has none: zeros)
    join_s[U-1, K]          seconds a stage on slot k adds when the cut after unit u lies
                            inside it, units u and u+1 running in one session: negative
                            where the runtime fuses or keeps a layout across the cut, positive
                            where the two units' weights evict each other from the caches
                            (learned models fit it on measured stages; roofline: zeros).
                            A stage [a, b) costs sum(compute_s[a:b]) + sum(join_s[a:b-1])
                            + stage_overhead_s, plus its codecs

    Weights read by more than one unit (counted once per stage, see module docstring):
    shared_weight_bytes[W]     bytes of weight w in memory_sum_bytes of each unit reading it
    shared_weight_units[W, U]  unit u reads weight w
    """

    unit_names: tuple[str, ...]
    device_names: tuple[str, ...]
    slots: tuple[tuple[str, str], ...]
    compute_s: np.ndarray
    memory_sum_bytes: np.ndarray
    memory_max_bytes: np.ndarray
    cut_bytes: np.ndarray
    device_memory_bytes: np.ndarray
    link_latency_s: np.ndarray
    link_bandwidth: np.ndarray
    slot_device: np.ndarray
    model: str = "roofline"
    guessed_units: tuple[str, ...] = field(default=())
    slot_sources: tuple[str, ...] = field(default=())
    codec_names: tuple[str, ...] = ("raw",)
    codec_wire_bytes: np.ndarray | None = None
    codec_encode_s: np.ndarray | None = None
    codec_decode_s: np.ndarray | None = None
    codec_allowed: np.ndarray | None = None
    codec_time_scale: np.ndarray | None = None
    shared_weight_bytes: np.ndarray | None = None
    shared_weight_units: np.ndarray | None = None
    guessed: np.ndarray | None = None
    stage_overhead_s: np.ndarray | None = None
    join_s: np.ndarray | None = None

    def __post_init__(self):
        if self.stage_overhead_s is None:
            object.__setattr__(self, "stage_overhead_s", np.zeros(len(self.slots)))
        if self.join_s is None:
            object.__setattr__(self, "join_s", np.zeros((len(self.cut_bytes), len(self.slots))))
        if self.codec_time_scale is None:
            object.__setattr__(self, "codec_time_scale", np.ones(len(self.device_names)))
        if self.shared_weight_bytes is None:
            object.__setattr__(self, "shared_weight_bytes", np.zeros(0, dtype=np.int64))
            object.__setattr__(self, "shared_weight_units",
                               np.zeros((0, len(self.unit_names)), dtype=bool))
        # Without measured codecs every cut is sent raw: one column, no codec time.
        cuts = len(self.cut_bytes)
        if self.codec_wire_bytes is None:
            object.__setattr__(self, "codec_wire_bytes", self.cut_bytes.reshape(cuts, 1).astype(np.int64))
            object.__setattr__(self, "codec_encode_s", np.zeros((cuts, 1)))
            object.__setattr__(self, "codec_decode_s", np.zeros((cuts, 1)))
            object.__setattr__(self, "codec_allowed", np.ones((cuts, 1), dtype=bool))

    def __eq__(self, other) -> bool:
        if not isinstance(other, CostTables):
            return NotImplemented
        return all(
            np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
            for a, b in zip(self._values(), other._values())
        )

    __hash__ = None

    def _values(self):
        return [getattr(self, name) for name in self.__dataclass_fields__]

    def boundary_s(self, cut: int, codec: int, device_a: int, device_b: int) -> tuple[float, float, float]:
        """(encode, link, decode) seconds for the cut after unit `cut` sent with `codec` from
        device a (which encodes) to device b (which decodes)."""
        return (float(self.codec_encode_s[cut, codec] * self.codec_time_scale[device_a]),
                self.link_s(device_a, device_b, float(self.codec_wire_bytes[cut, codec])),
                float(self.codec_decode_s[cut, codec] * self.codec_time_scale[device_b]))

    def stage_compute_s(self, start: int, end: int, slot: int) -> float:
        """Seconds of units [start, end) run as one stage on a slot (codecs not included)."""
        return float(self.compute_s[start:end, slot].sum() + self.join_s[start:end - 1, slot].sum()
                     + self.stage_overhead_s[slot])

    def link_s(self, device_a: int, device_b: int, nbytes: float) -> float:
        """Seconds to move nbytes from device a to device b (0 when nothing crosses)."""
        if device_a == device_b or nbytes <= 0:
            return 0.0
        return float(self.link_latency_s[device_a, device_b]
                     + nbytes / self.link_bandwidth[device_a, device_b])

    def stage_memory(self, start: int, end: int) -> int:
        """Bytes a stage holding units [start, end) needs (a shared weight counted once)."""
        return int(self.memory_sum_bytes[start:end].sum() - self.overcount_bytes(start, end)
                   + self.memory_max_bytes[start:end].max())

    def overcount_bytes(self, start: int, end: int) -> int:
        """Bytes memory_sum_bytes[start:end] counts more than once (shared weights)."""
        readers = self.shared_weight_units[:, start:end].sum(axis=1)
        return int((self.shared_weight_bytes * np.maximum(readers - 1, 0)).sum())

    def range_weight_bytes(self) -> np.ndarray:
        """table[i, j] = memory_sum of units [i, j) with shared weights counted once (i < j)."""
        prefix = np.concatenate([[0], np.cumsum(self.memory_sum_bytes)])
        table = prefix[None, :] - prefix[:, None]
        for nbytes, readers in zip(self.shared_weight_bytes, self.shared_weight_units):
            count = np.concatenate([[0], np.cumsum(readers)])
            table -= nbytes * np.maximum(count[None, :] - count[:, None] - 1, 0)
        return table

    def to_dict(self) -> dict:
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                # JSON has no inf: a same-device link is marked with 0 bandwidth instead.
                value = np.where(np.isinf(value), 0, value) if value.dtype.kind == "f" else value
                value = value.tolist()
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CostTables":
        bandwidth = np.asarray(data["link_bandwidth"], dtype=float)
        bandwidth = np.where(bandwidth == 0, np.inf, bandwidth)
        return cls(
            unit_names=tuple(data["unit_names"]),
            device_names=tuple(data["device_names"]),
            slots=tuple(tuple(s) for s in data["slots"]),
            compute_s=np.asarray(data["compute_s"], dtype=float).reshape(
                len(data["unit_names"]), len(data["slots"])),
            memory_sum_bytes=np.asarray(data["memory_sum_bytes"], dtype=np.int64),
            memory_max_bytes=np.asarray(data["memory_max_bytes"], dtype=np.int64),
            cut_bytes=np.asarray(data["cut_bytes"], dtype=np.int64),
            device_memory_bytes=np.asarray(data["device_memory_bytes"], dtype=np.int64),
            link_latency_s=np.asarray(data["link_latency_s"], dtype=float),
            link_bandwidth=bandwidth,
            slot_device=np.asarray(data["slot_device"], dtype=np.int64),
            model=data.get("model", "roofline"),
            guessed_units=tuple(data.get("guessed_units", ())),
            slot_sources=tuple(data.get("slot_sources", ())),
            codec_names=tuple(data.get("codec_names", ("raw",))),
            **{name: None if data.get(name) is None else np.asarray(data[name], dtype=kind).reshape(
                   len(data["cut_bytes"]), len(data.get("codec_names", ("raw",))))
               for name, kind in (("codec_wire_bytes", np.int64), ("codec_encode_s", float),
                                  ("codec_decode_s", float), ("codec_allowed", bool))},
            shared_weight_bytes=np.asarray(data.get("shared_weight_bytes", []), dtype=np.int64),
            shared_weight_units=np.asarray(data.get("shared_weight_units", []), dtype=bool).reshape(
                -1, len(data["unit_names"])),
            guessed=None if data.get("guessed") is None else np.asarray(
                data["guessed"], dtype=bool).reshape(len(data["unit_names"]), len(data["slots"])),
            stage_overhead_s=None if data.get("stage_overhead_s") is None else np.asarray(
                data["stage_overhead_s"], dtype=float).reshape(len(data["slots"])),
            codec_time_scale=None if data.get("codec_time_scale") is None else np.asarray(
                data["codec_time_scale"], dtype=float).reshape(len(data["device_names"])),
            join_s=None if data.get("join_s") is None else np.asarray(
                data["join_s"], dtype=float).reshape(len(data["cut_bytes"]), len(data["slots"])),
        )


class CostModel(Protocol):
    def costs(self, units: Sequence[UnitLike], fleet: Fleet, mode: str = "inference",
              in_flight_microbatches: int = 1) -> CostTables: ...


def fleet_arrays(fleet: Fleet) -> dict:
    """The fleet part of the cost tables: device memory, links, slots."""
    names = tuple(d.name for d in fleet.devices)
    count = len(names)
    latency = np.zeros((count, count))
    bandwidth = np.full((count, count), np.inf)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                link = fleet.link(a, b)
                latency[i, j] = link.latency_s
                bandwidth[i, j] = link.bandwidth_bytes_s
    slots = tuple(fleet.slots())
    return dict(
        device_names=names,
        slots=slots,
        device_memory_bytes=np.array([d.memory_bytes for d in fleet.devices], dtype=np.int64),
        link_latency_s=latency,
        link_bandwidth=bandwidth,
        slot_device=np.array([names.index(dev) for dev, _ in slots], dtype=np.int64),
    )


def unit_memory(units: Sequence[UnitLike], mode: str, in_flight_microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """(memory_sum_bytes, memory_max_bytes) per unit for a mode (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f"cost: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    weights = np.array([u.param_bytes for u in units], dtype=np.int64)
    peak = np.array([u.peak_activation_bytes for u in units], dtype=np.int64)
    if mode == "inference":
        return weights, peak
    saved = np.array([u.activation_bytes for u in units], dtype=np.int64)
    return weights * TRAINING_BYTES_PER_WEIGHT_BYTE + saved * in_flight_microbatches, peak


def shared_weights(units: Sequence[UnitLike], mode: str) -> dict[str, np.ndarray]:
    """The shared_weight_* arrays of CostTables: weights (by name) that more than one unit reads.

    Bytes are as the units' memory_sum counts them: x4 in training (gradient, Adam moments).
    """
    readers: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for index, unit in enumerate(units):
        for name, nbytes in zip(getattr(unit, "param_names", ()), getattr(unit, "param_sizes", ())):
            readers.setdefault(name, []).append(index)
            sizes[name] = nbytes
    shared = [name for name, read_by in readers.items() if len(read_by) > 1]
    scale = TRAINING_BYTES_PER_WEIGHT_BYTE if mode == "training" else 1
    matrix = np.zeros((len(shared), len(units)), dtype=bool)
    for row, name in enumerate(shared):
        matrix[row, readers[name]] = True
    return dict(shared_weight_bytes=np.array([sizes[n] * scale for n in shared], dtype=np.int64),
                shared_weight_units=matrix)


@dataclass(frozen=True)
class RooflineCostModel:
    """Roofline latency per unit and backend, plus a fixed overhead per operator."""

    def costs(self, units, fleet, mode="inference", in_flight_microbatches=1) -> CostTables:
        arrays = fleet_arrays(fleet)
        flops = np.array([u.flops for u in units], dtype=float)
        moved = np.array([u.bytes_moved for u in units], dtype=float)
        ops = np.array([u.op_count for u in units], dtype=float)
        compute = np.empty((len(units), len(arrays["slots"])))
        for k, (device_name, backend_name) in enumerate(arrays["slots"]):
            backend = fleet.device(device_name).backend(backend_name)
            compute_bound = flops / (backend.peak_gflops * 1e9 * backend.efficiency)
            memory_bound = moved / (backend.mem_bandwidth_gbs * 1e9)
            compute[:, k] = np.maximum(compute_bound, memory_bound) + ops * backend.op_overhead_us * 1e-6
        if mode == "training":
            compute *= 3.0  # backward costs about twice the forward
        memory_sum, memory_max = unit_memory(units, mode, in_flight_microbatches)
        return CostTables(
            unit_names=tuple(u.name for u in units),
            compute_s=compute,
            memory_sum_bytes=memory_sum,
            memory_max_bytes=memory_max,
            cut_bytes=np.array([u.cut_bytes for u in units[:-1]], dtype=np.int64),
            model="roofline",
            **arrays,
            **shared_weights(units, mode),
        )
