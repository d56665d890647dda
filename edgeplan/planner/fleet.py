"""Fleets: the devices edgeplan plans onto, their compute backends, and the links between them.

A `Fleet` is a set of `Device`s. Each device has one memory budget shared by all of its
`Backend`s (CPU, GPU, NPU: a Jetson's GPU and CPU share the same LPDDR5), and devices talk
over `Link`s: explicit ones for the pairs you name, `default_link` (a full mesh, gigabit
Ethernet unless you say otherwise) for every other pair.

Get a fleet with `load_fleet(spec)`: a `Fleet` passes through, a preset fleet name
("home-lab", see `list_fleets()`) or the path of a .toml file (a .json file holding
`Fleet.to_dict()` also works). Preset fleets are TOML text in this module and go through the
same parser and validation as your files; `preset:NAME` is their source in error messages.

Fleet file format (TOML)
------------------------
Human units: `memory_gb` (1 GB = 1e9 bytes), `bandwidth_mbps` (megabits/s), `latency_ms`.
Each of these also has an exact form, which `Fleet.to_dict()` writes so that a fleet
round-trips bit for bit: `memory_bytes`, `bandwidth_bytes_s`, `latency_s`. Give one form of
a quantity, not both.

```toml
name = "my-lab"
[default_link]            # optional, full mesh default
bandwidth_mbps = 1000
latency_ms = 0.3
[[device]]
name = "pi-a"
preset = "raspberry-pi-5-8gb"   # take everything from a preset...
count = 2                        # optional: expands to pi-a-0, pi-a-1 (same device kind several times)
[[device]]
name = "box"
memory_gb = 16                   # ...or spell it out (or override preset fields)
address = "10.0.0.5:7000"
  [[device.backend]]
  name = "cpu"
  kind = "cpu"
  peak_gflops = 200
  mem_bandwidth_gbs = 38.4
[[link]]
a = "pi-a-0"
b = "box"
bandwidth_mbps = 300
latency_ms = 2
```

Top level: `name` (required), `default_link`, `[[device]]` (at least one), `[[link]]`.

`[[device]]` keys:
  name           required, unique in the fleet; letters, digits, '.', '_', '-'
  preset         a device preset id (see `list_presets()`); every other key overrides it
  count          N >= 1: N identical devices named NAME-0 ... NAME-(N-1) (always suffixed,
                 even for N = 1); links must name the expanded names
  memory_gb      memory edgeplan may use (RAM minus the OS reserve); or memory_bytes
  address        "host:port" of the device's worker (not allowed with count > 1)
  codec_gbs      one core's boundary-codec speed (`edgeplan codecs` on the device prints it):
                 codec times measured on the compiling host are scaled by host / device
                 figure; without it they are charged as measured on the host
  kind           label of where the device came from (default: the preset id, or "custom")
  only_backends  list of backend names to keep from the preset, in this order
                 (e.g. ["gpu"] to plan a Jetson onto its GPU alone)
  [[device.backend]]  one table per backend. With a preset, a table whose name matches a
                 preset backend overrides only the keys it gives; another name adds a backend.

`[[device.backend]]` keys: name, kind ("cpu" | "gpu" | "npu"), peak_gflops (dense fp32
GFLOP/s), mem_bandwidth_gbs (GB/s) are required; op_overhead_us (default 5),
efficiency (achievable fraction of peak, default 0.5), execution_providers (ONNX Runtime
EPs in preference order, default ["CPUExecutionProvider"]) and tvm_target (what `--targets
tvm` builds this backend's stages for: a name of edgeplan.targets.tvm.TARGETS such as
"aarch64", or a TVM target as JSON; default: none, which means this machine's llvm for a
cpu backend and no TVM build for a gpu or npu) are optional.

`[[link]]` keys: a, b (device names), bandwidth_mbps (or bandwidth_bytes_s), latency_ms (or
latency_s), or `preset` = "gigabit-ethernet" | "wifi-5" | "wifi-6" with optional overrides.
Links are symmetric; a pair may appear once. `[default_link]` takes the same keys minus a, b.

Errors are `FleetError`s whose message names the file, the device or link, the field, and
the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, NamedTuple

from edgeplan.errors import EdgeplanError

__all__ = [
    "Backend",
    "Device",
    "Fleet",
    "FleetError",
    "Link",
    "fleet_from_dict",
    "list_fleets",
    "list_presets",
    "load_fleet",
    "preset_device",
]


class FleetError(EdgeplanError, ValueError):
    """A fleet file, dict or object is invalid; the message names where, what, and the fix."""


_BACKEND_KINDS = ("cpu", "gpu", "npu")
# Names end up in artifact paths and command lines, so keep them to a safe alphabet.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# Endpoint name of the default link, which stands for every pair without an explicit link.
_ANY_DEVICE = "*"
_GIB = 1 << 30


# --- small checks shared by the dataclasses and the parser ----------------------------------


@contextmanager
def _within(place: str) -> Iterator[None]:
    """Prefix FleetErrors raised inside with where they happened: file, device, backend."""
    try:
        yield
    except FleetError as error:
        raise FleetError(f"{place}: {error}") from None


def _did_you_mean(word: object, choices: Sequence[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names) or "(none)"


def _check_name(value: object, field_name: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.match(value):
        raise FleetError(
            f"{field_name} {value!r} is not a valid name; fix: name the {what} with letters, "
            "digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _is_number(value: object) -> bool:
    # TOML booleans are Python ints; a `true` where a number belongs is a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(value: object, field_name: str, fix: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise FleetError(f"{field_name} must be a positive number, got {value!r}; fix: {fix}")
    return float(value)


def _check_non_negative(value: object, field_name: str, fix: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise FleetError(f"{field_name} must be a number >= 0, got {value!r}; fix: {fix}")
    return float(value)


def _check_positive_int(value: object, field_name: str, fix: str) -> int:
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if isinstance(value, bool) or not integral or value <= 0:
        raise FleetError(f"{field_name} must be a whole number > 0, got {value!r}; fix: {fix}")
    return int(value)


def _check_address(value: object) -> str | None:
    if value is None:
        return None
    fix = 'write it as "host:port", e.g. "10.0.0.5:7000"'
    if not isinstance(value, str):
        raise FleetError(f"address must be a string, got {value!r}; fix: {fix}")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FleetError(f"address {value!r} is not host:port; fix: {fix}")
    return value


_FIX_MEMORY = ("set memory_gb to the memory edgeplan may use on the device (its RAM minus what "
               "the OS needs), or take it from a preset")
_FIX_CODEC = ("set codec_gbs to what `edgeplan codecs` prints on the device (one core's int8 "
              "encode + decode GB/s), or leave it out to charge codec times as measured on the host")
_FIX_PEAK = "set peak_gflops to the backend's dense fp32 GFLOP/s from its datasheet"
_FIX_MEM_BANDWIDTH = "set mem_bandwidth_gbs to the backend's memory bandwidth in GB/s from its datasheet"
_FIX_OVERHEAD = "set op_overhead_us to the fixed cost of one operator launch in microseconds"
_FIX_EFFICIENCY = "set efficiency to the achievable fraction of peak, a number in (0, 1]"
_FIX_LINK_BANDWIDTH = ("set bandwidth_mbps to the link's measured throughput in megabits/s "
                       "(e.g. from iperf3), or use a link preset")
_FIX_LINK_LATENCY = "set latency_ms to the link's one-way latency in milliseconds"


# --- the fleet model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """One way to run operators on a device: its CPU, GPU or NPU, with roofline figures."""

    name: str
    kind: str
    peak_gflops: float
    mem_bandwidth_gbs: float
    op_overhead_us: float = 5.0
    efficiency: float = 0.5
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    tvm_target: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "backend name", "backend")
        with _within(f"backend {self.name!r}"):
            if self.kind not in _BACKEND_KINDS:
                raise FleetError(
                    f"kind {self.kind!r} is not a backend kind{_did_you_mean(self.kind, _BACKEND_KINDS)}; "
                    f"fix: use one of {_names(_BACKEND_KINDS)}")
            # Normalise ints (TOML `200`) to floats so equal fleets compare and serialise equal.
            object.__setattr__(self, "peak_gflops", _check_positive(self.peak_gflops, "peak_gflops", _FIX_PEAK))
            object.__setattr__(self, "mem_bandwidth_gbs", _check_positive(
                self.mem_bandwidth_gbs, "mem_bandwidth_gbs", _FIX_MEM_BANDWIDTH))
            object.__setattr__(self, "op_overhead_us", _check_non_negative(
                self.op_overhead_us, "op_overhead_us", _FIX_OVERHEAD))
            efficiency = _check_positive(self.efficiency, "efficiency", _FIX_EFFICIENCY)
            if efficiency > 1:
                raise FleetError(f"efficiency must be at most 1, got {efficiency!r}; fix: {_FIX_EFFICIENCY}")
            object.__setattr__(self, "efficiency", efficiency)
            providers = self.execution_providers
            if (isinstance(providers, str) or not isinstance(providers, Sequence) or not providers
                    or not all(isinstance(p, str) and p for p in providers)):
                raise FleetError(
                    f"execution_providers must be a non-empty list of ONNX Runtime provider names, "
                    f'got {providers!r}; fix: e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]')
            object.__setattr__(self, "execution_providers", tuple(providers))
            if self.tvm_target is not None and not (isinstance(self.tvm_target, str) and self.tvm_target.strip()):
                raise FleetError(
                    f"tvm_target must be a TVM target name or JSON string, got {self.tvm_target!r}; "
                    f'fix: e.g. tvm_target = "aarch64", or leave it out')


@dataclass(frozen=True)
class Device:
    """A machine in the fleet: a memory budget shared by its backends, and where to reach it."""

    name: str
    memory_bytes: int
    backends: tuple[Backend, ...]
    kind: str = "custom"
    address: str | None = None
    codec_gbs: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "device name", "device")
        with _within(f"device {self.name!r}"):
            object.__setattr__(self, "memory_bytes", _check_positive_int(
                self.memory_bytes, "memory_bytes", _FIX_MEMORY))
            backends = self.backends
            if isinstance(backends, Backend) or not isinstance(backends, Sequence):
                raise FleetError(f"backends must be a tuple of Backend, got {backends!r}; "
                                 "fix: pass backends=(Backend(...), ...)")
            if not backends:
                raise FleetError("has no backends; fix: add at least one [[device.backend]] table "
                                 "(name, kind, peak_gflops, mem_bandwidth_gbs) or use a preset")
            seen: set[str] = set()
            for backend in backends:
                if not isinstance(backend, Backend):
                    raise FleetError(f"backends must hold Backend objects, got {backend!r}; "
                                     "fix: build each with Backend(...)")
                if backend.name in seen:
                    raise FleetError(f"backend name {backend.name!r} is used twice; "
                                     "fix: give each backend of a device its own name")
                seen.add(backend.name)
            object.__setattr__(self, "backends", tuple(backends))
            if not isinstance(self.kind, str) or not self.kind:
                raise FleetError(f"kind must be a non-empty string, got {self.kind!r}; "
                                 'fix: use a preset id or "custom"')
            _check_address(self.address)
            if self.codec_gbs is not None:
                object.__setattr__(self, "codec_gbs", _check_positive(self.codec_gbs, "codec_gbs", _FIX_CODEC))

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        available = [backend.name for backend in self.backends]
        raise FleetError(f"device {self.name!r} has no backend {name!r}{_did_you_mean(name, available)}; "
                         f"available backends: {_names(available)}")


@dataclass(frozen=True)
class Link:
    """A network path between devices a and b (symmetric): latency plus bytes over bandwidth."""

    a: str
    b: str
    bandwidth_bytes_s: float
    latency_s: float

    def __post_init__(self) -> None:
        for end in (self.a, self.b):
            if not isinstance(end, str) or not end:
                raise FleetError(f"link ends must be device names, got a={self.a!r}, b={self.b!r}; "
                                 "fix: set a and b to the names of the two devices it connects")
        is_default = self.a == self.b == _ANY_DEVICE
        with _within("default link" if is_default else f"link {self.a!r} <-> {self.b!r}"):
            if self.a == self.b and not is_default:
                raise FleetError(f"connects device {self.a!r} to itself; fix: remove this link "
                                 "(units on one device share memory, nothing crosses a network)")
            object.__setattr__(self, "bandwidth_bytes_s", _check_positive(
                self.bandwidth_bytes_s, "bandwidth_bytes_s", _FIX_LINK_BANDWIDTH))
            object.__setattr__(self, "latency_s", _check_non_negative(
                self.latency_s, "latency_s", _FIX_LINK_LATENCY))

    def transfer_s(self, nbytes: float) -> float:
        """Seconds to send nbytes over this link; nothing to send costs nothing, not even latency."""
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bandwidth_bytes_s


class _LinkPreset(NamedTuple):
    description: str
    link: Link


# Throughputs are what a bulk TCP transfer achieves, not the PHY rate on the box.
_LINK_PRESETS: Mapping[str, _LinkPreset] = MappingProxyType({
    # 1000BASE-T: 1 Gbit/s = 125e6 B/s; ~0.3 ms through one switch and two kernel stacks.
    "gigabit-ethernet": _LinkPreset("1 Gbit/s wired Ethernet through one switch",
                                    Link(_ANY_DEVICE, _ANY_DEVICE, 125e6, 0.3e-3)),
    # 802.11ac 2x2 at 80 MHz links at 867 Mbit/s; ~400 Mbit/s effective TCP (approximate).
    "wifi-5": _LinkPreset("Wi-Fi 5 (802.11ac), ~400 Mbit/s effective, 2 ms",
                          Link(_ANY_DEVICE, _ANY_DEVICE, 400e6 / 8, 2e-3)),
    # 802.11ax 2x2 at 80 MHz links at 1201 Mbit/s; ~600 Mbit/s effective TCP (approximate).
    "wifi-6": _LinkPreset("Wi-Fi 6 (802.11ax), ~600 Mbit/s effective, 1.5 ms",
                          Link(_ANY_DEVICE, _ANY_DEVICE, 600e6 / 8, 1.5e-3)),
})
_GIGABIT_ETHERNET = _LINK_PRESETS["gigabit-ethernet"].link


@dataclass(frozen=True)
class Fleet:
    """Devices plus the links between them; pairs without an explicit link use default_link."""

    name: str
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    default_link: Link = _GIGABIT_ETHERNET
    # Where the fleet came from, for error messages; two fleets read from different files are
    # still the same fleet, so it takes no part in ==.
    source: str = field(default="<preset>", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", str(self.source))
        with _within(self.source):
            _check_name(self.name, "fleet name", "fleet")
            with _within(f"fleet {self.name!r}"):
                self._check_devices()
                self._check_links()

    def _check_devices(self) -> None:
        devices = self.devices
        if isinstance(devices, Device) or not isinstance(devices, Sequence):
            raise FleetError(f"devices must be a tuple of Device, got {devices!r}; "
                             "fix: pass devices=(Device(...), ...)")
        if not devices:
            raise FleetError("has no devices; fix: add at least one [[device]] table")
        seen: set[str] = set()
        for device in devices:
            if not isinstance(device, Device):
                raise FleetError(f"devices must hold Device objects, got {device!r}; "
                                 "fix: build each with Device(...) or preset_device(...)")
            if device.name in seen:
                raise FleetError(f"device name {device.name!r} is used twice; "
                                 "fix: give each device its own name")
            seen.add(device.name)
        object.__setattr__(self, "devices", tuple(devices))

    def _check_links(self) -> None:
        links, default_link = self.links, self.default_link
        if isinstance(links, Link) or not isinstance(links, Sequence):
            raise FleetError(f"links must be a tuple of Link, got {links!r}; fix: pass links=(Link(...), ...)")
        known = [device.name for device in self.devices]
        pairs: set[frozenset[str]] = set()
        for link in links:
            if not isinstance(link, Link):
                raise FleetError(f"links must hold Link objects, got {link!r}; fix: build each with Link(...)")
            for end in (link.a, link.b):
                if end not in known:
                    raise FleetError(
                        f"link {link.a!r} <-> {link.b!r} names unknown device {end!r}"
                        f"{_did_you_mean(end, known)}; fix: use one of {_names(known)}")
            pair = frozenset((link.a, link.b))
            if pair in pairs:
                raise FleetError(f"link {link.a!r} <-> {link.b!r} is given twice (links are symmetric); "
                                 "fix: keep one of them")
            pairs.add(pair)
        object.__setattr__(self, "links", tuple(links))
        if not isinstance(default_link, Link):
            raise FleetError(f"default_link must be a Link, got {default_link!r}; "
                             "fix: pass Link('*', '*', bandwidth_bytes_s, latency_s)")
        # The default link's ends are placeholders; pin them so == and to_dict agree.
        if (default_link.a, default_link.b) != (_ANY_DEVICE, _ANY_DEVICE):
            object.__setattr__(self, "default_link",
                               dataclasses.replace(default_link, a=_ANY_DEVICE, b=_ANY_DEVICE))

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        known = [device.name for device in self.devices]
        raise FleetError(f"{self.source}: fleet {self.name!r} has no device {name!r}"
                         f"{_did_you_mean(name, known)}; known devices: {_names(known)}")

    def link(self, a: str, b: str) -> Link:
        """The link between devices a and b in either order: explicit, else default_link."""
        if a == b:
            raise FleetError(f"{self.source}: fleet {self.name!r}: no link from device {a!r} to itself; "
                             "fix: only ask for links between two different devices "
                             "(moving data within a device costs nothing)")
        self.device(a)
        self.device(b)
        for link in self.links:
            if (link.a, link.b) == (a, b):
                return link
            if (link.b, link.a) == (a, b):
                return dataclasses.replace(link, a=a, b=b)
        return dataclasses.replace(self.default_link, a=a, b=b)

    def slots(self) -> list[tuple[str, str]]:
        """(device name, backend name) for every backend of every device, in fleet order."""
        return [(device.name, backend.name) for device in self.devices for backend in device.backends]

    def to_dict(self) -> dict:
        """JSON-ready dict in the fleet-file schema, exact units; fleet_from_dict inverts it."""
        return {
            "name": self.name,
            "default_link": {"bandwidth_bytes_s": self.default_link.bandwidth_bytes_s,
                             "latency_s": self.default_link.latency_s},
            "device": [_device_to_dict(device) for device in self.devices],
            "link": [{"a": link.a, "b": link.b, "bandwidth_bytes_s": link.bandwidth_bytes_s,
                      "latency_s": link.latency_s} for link in self.links],
        }


def _backend_to_dict(backend: Backend) -> dict:
    return {
        "name": backend.name,
        "kind": backend.kind,
        "peak_gflops": backend.peak_gflops,
        "mem_bandwidth_gbs": backend.mem_bandwidth_gbs,
        "op_overhead_us": backend.op_overhead_us,
        "efficiency": backend.efficiency,
        "execution_providers": list(backend.execution_providers),
        **({"tvm_target": backend.tvm_target} if backend.tvm_target is not None else {}),
    }


def _device_to_dict(device: Device) -> dict:
    out: dict[str, Any] = {"name": device.name, "kind": device.kind, "memory_bytes": device.memory_bytes}
    if device.address is not None:  # TOML has no null, so an absent address is an absent key
        out["address"] = device.address
    if device.codec_gbs is not None:
        out["codec_gbs"] = device.codec_gbs
    out["backend"] = [_backend_to_dict(backend) for backend in device.backends]
    return out


# --- device presets ----------------------------------------------------------------------------
# Figures come from vendor datasheets and product pages. Peak GFLOP/s of CPUs is derived as
# cores x GHz x fp32 FLOP/cycle/core, where a 128-bit NEON/SSE FMA pipe does 4 lanes x 2 = 8
# FLOP/cycle and a 256-bit AVX2 FMA pipe 16. "approximate" marks estimates, where the vendor
# publishes no figure. op_overhead_us and efficiency are estimates everywhere: calibrate them
# by measurement. memory_bytes is physical RAM minus the stated OS/runtime reserve.

_CPU_EP = ("CPUExecutionProvider",)
_CUDA_EP = ("CUDAExecutionProvider", "CPUExecutionProvider")
# One QNN EP serves the Adreno GPU (backend_type "gpu") and the Hexagon NPU (backend_type "htp").
_QNN_EP = ("QNNExecutionProvider", "CPUExecutionProvider")
# ONNX Runtime has no Mali or Tensor-TPU EP; NNAPI hands the graph to the vendor driver.
_NNAPI_EP = ("NnapiExecutionProvider", "CPUExecutionProvider")
_OPENVINO_EP = ("OpenVINOExecutionProvider", "CPUExecutionProvider")


class _DevicePreset(NamedTuple):
    description: str
    device: Device


def _preset(kind: str, description: str, memory_bytes: int, *backends: Backend,
            codec_gbs: float) -> _DevicePreset:
    return _DevicePreset(description, Device(name=kind, memory_bytes=memory_bytes,
                                             backends=tuple(backends), kind=kind, codec_gbs=codec_gbs))


_DEVICE_PRESET_LIST = (
    _preset(
        "raspberry-pi-5-8gb",
        "Raspberry Pi 5 8GB: 4x Cortex-A76 @ 2.4 GHz, LPDDR4X-4267, CPU only",
        # 8 GiB LPDDR4X (Raspberry Pi 5 product brief) - 1.5 GiB for Raspberry Pi OS and the
        # Python/ONNX Runtime process = 6.5 GiB.
        8 * _GIB - 3 * _GIB // 2,
        Backend(
            name="cpu", kind="cpu",
            # BCM2712, 4x Cortex-A76 @ 2.4 GHz (Raspberry Pi 5 product brief); A76 has two
            # 128-bit NEON FMA pipes = 16 FLOP/cycle: 4 x 2.4 x 16 = 153.6 GFLOP/s.
            peak_gflops=153.6,
            # LPDDR4X-4267 on a 32-bit bus: 4267 MT/s x 4 B = 17.07 GB/s.
            mem_bandwidth_gbs=17.07,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        # codec_gbs: estimated from the core (Cortex-A76 @ 2.4 GHz, 2x 128-bit NEON: about 1/3
        # of the `host` preset's AVX-512 core); measure it with `edgeplan codecs` on the device.
        codec_gbs=0.8,
    ),
    _preset(
        "jetson-orin-nano-8gb",
        "NVIDIA Jetson Orin Nano 8GB (original clocks): Ampere GPU 1024 CUDA cores + 6x A78AE, 68 GB/s",
        # 8 GiB LPDDR5 shared by CPU and GPU (Jetson Orin Nano Series data sheet) - 2 GiB for
        # JetPack's Ubuntu and the CUDA/cuDNN context = 6 GiB.
        6 * _GIB,
        Backend(
            name="gpu", kind="gpu",
            # 1024 CUDA cores x 2 FLOP (FMA) x 0.625 GHz max GPU clock (data sheet) = 1280 GFLOP/s.
            peak_gflops=1280.0,
            # 128-bit LPDDR5 at 4266 MT/s: 16 B x 4266 MT/s = 68 GB/s (data sheet).
            mem_bandwidth_gbs=68.0,
            # Kernel launches from an A78AE cost more than on a desktop (approximate).
            op_overhead_us=20.0, efficiency=0.6,
            execution_providers=_CUDA_EP),
        Backend(
            name="cpu", kind="cpu",
            # 6x Cortex-A78AE @ 1.5 GHz (data sheet), 2x128-bit NEON FMA = 16 FLOP/cycle:
            # 6 x 1.5 x 16 = 144 GFLOP/s.
            peak_gflops=144.0, mem_bandwidth_gbs=68.0,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        # codec_gbs: estimated (Cortex-A78AE @ 1.5 GHz, the Pi 5's core at 0.6x its clock).
        codec_gbs=0.5,
    ),
    _preset(
        "jetson-orin-nano-super-8gb",
        "NVIDIA Jetson Orin Nano 8GB in MAXN SUPER mode (JetPack 6.1+): GPU @ 1020 MHz, 102 GB/s",
        # Same module as jetson-orin-nano-8gb: 8 GiB - 2 GiB reserve = 6 GiB.
        6 * _GIB,
        Backend(
            name="gpu", kind="gpu",
            # 1024 CUDA cores x 2 x 1.02 GHz (Jetson Orin Nano Super Developer Kit page) = 2089 GFLOP/s.
            peak_gflops=2088.96,
            # LPDDR5 at 6400 MT/s x 16 B = 102.4 GB/s (product page: 102 GB/s).
            mem_bandwidth_gbs=102.4,
            op_overhead_us=20.0, efficiency=0.6,
            execution_providers=_CUDA_EP),
        Backend(
            name="cpu", kind="cpu",
            # 6x Cortex-A78AE @ 1.7 GHz x 16 FLOP/cycle = 163.2 GFLOP/s.
            peak_gflops=163.2, mem_bandwidth_gbs=102.4,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        # codec_gbs: estimated (Cortex-A78AE @ 1.7 GHz).
        codec_gbs=0.55,
    ),
    _preset(
        "jetson-agx-orin-64gb",
        "NVIDIA Jetson AGX Orin 64GB: Ampere GPU 2048 CUDA cores + 12x A78AE, 204.8 GB/s",
        # 64 GiB LPDDR5 (Jetson AGX Orin Series data sheet) - 4 GiB for Ubuntu and the CUDA
        # context = 60 GiB. Its two DLAs are reachable only through TensorRT, so not modelled.
        60 * _GIB,
        Backend(
            name="gpu", kind="gpu",
            # 2048 CUDA cores x 2 x 1.3 GHz (data sheet) = 5324.8 GFLOP/s (NVIDIA: 5.3 TFLOPS).
            peak_gflops=5324.8,
            # 256-bit LPDDR5 at 6400 MT/s: 32 B x 6400 MT/s = 204.8 GB/s (data sheet).
            mem_bandwidth_gbs=204.8,
            op_overhead_us=10.0, efficiency=0.6,
            execution_providers=_CUDA_EP),
        Backend(
            name="cpu", kind="cpu",
            # 12x Cortex-A78AE @ 2.2 GHz (data sheet) x 16 FLOP/cycle = 422.4 GFLOP/s.
            peak_gflops=422.4, mem_bandwidth_gbs=204.8,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        # codec_gbs: estimated (Cortex-A78AE @ 2.2 GHz).
        codec_gbs=0.75,
    ),
    _preset(
        "snapdragon-8-gen3-phone",
        "Snapdragon 8 Gen 3 phone (e.g. Galaxy S24 Ultra, 12 GB): Kryo CPU, Adreno 750, Hexagon NPU",
        # 12 GiB LPDDR5X (Galaxy S24 Ultra spec sheet) - 6 GiB for Android, its services and other
        # apps; Android's low-memory killer reclaims a foreground app well before all RAM is used.
        6 * _GIB,
        Backend(
            name="cpu", kind="cpu",
            # Kryo (Snapdragon 8 Gen 3 product brief): 1x X4 @ 3.3 + 3x A720 @ 3.2 + 2x A720 @ 3.0
            # + 2x A520 @ 2.3 GHz. X4: 4x128-bit FMA = 32, A720: 16, A520: 8 FLOP/cycle (approximate):
            # 1x3.3x32 + 3x3.2x16 + 2x3.0x16 + 2x2.3x8 = 105.6 + 153.6 + 96 + 36.8 = 392 GFLOP/s.
            peak_gflops=392.0,
            # LPDDR5X at 4800 MHz (9600 MT/s) on a 64-bit bus: 8 B x 9600 MT/s = 76.8 GB/s.
            mem_bandwidth_gbs=76.8,
            # Phones throttle under sustained load, hence a lower efficiency (approximate).
            op_overhead_us=5.0, efficiency=0.35,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        Backend(
            name="gpu", kind="gpu",
            # Adreno 750: ~4.6 TFLOPS fp32 (approximate; third-party spec databases, Qualcomm
            # publishes no fp32 figure).
            peak_gflops=4600.0, mem_bandwidth_gbs=76.8,
            op_overhead_us=50.0, efficiency=0.3,
            execution_providers=_QNN_EP),
        Backend(
            name="npu", kind="npu",
            # Hexagon NPU: ~45 INT8 TOPS (approximate; third-party figure, Qualcomm publishes none).
            # QNN's HTP runs float graphs in fp16; assuming fp16 at 1/4 of the INT8 rate:
            # 45 / 4 = 11.25 TFLOP/s (approximate).
            peak_gflops=11250.0, mem_bandwidth_gbs=76.8,
            op_overhead_us=30.0, efficiency=0.3,
            execution_providers=_QNN_EP),
        # codec_gbs: estimated (Cortex-X4 @ 3.3 GHz, 4x 128-bit NEON).
        codec_gbs=1.4,
    ),
    _preset(
        "tensor-g3-phone",
        "Google Tensor G3 phone (Pixel 8 Pro, 12 GB): 9-core CPU, Mali-G715 MC7, TPU via NNAPI",
        # 12 GiB LPDDR5X (Pixel 8 Pro tech specs) - 6 GiB for Android and other apps = 6 GiB.
        6 * _GIB,
        Backend(
            name="cpu", kind="cpu",
            # 1x X3 @ 2.91 + 4x A715 @ 2.37 + 4x A510 @ 1.7 GHz. X3: 32, A715: 16, A510: 8
            # FLOP/cycle (approximate): 93.12 + 151.68 + 54.4 = 299.2 GFLOP/s.
            peak_gflops=299.2,
            # LPDDR5X on a 64-bit bus, ~68 GB/s (approximate; Google publishes no speed grade).
            mem_bandwidth_gbs=68.0,
            op_overhead_us=5.0, efficiency=0.35,
            execution_providers=_CPU_EP, tvm_target="aarch64"),
        Backend(
            name="gpu", kind="gpu",
            # Mali-G715 MC7 @ ~890 MHz, assuming 2 execution engines x 32 fp32 FMA lanes = 128
            # FLOP/cycle/core: 7 x 128 x 0.89 = 797 GFLOP/s (approximate).
            peak_gflops=797.0, mem_bandwidth_gbs=68.0,
            op_overhead_us=50.0, efficiency=0.3,
            execution_providers=_NNAPI_EP),
        Backend(
            name="npu", kind="npu",
            # Tensor G3 TPU: Google publishes no throughput; 4 TFLOP/s fp16 is a placeholder
            # estimate (approximate) - measure before trusting plans that lean on it.
            peak_gflops=4000.0, mem_bandwidth_gbs=68.0,
            op_overhead_us=30.0, efficiency=0.3,
            execution_providers=_NNAPI_EP),
        # codec_gbs: estimated (Cortex-X3 @ 2.9 GHz, 4x 128-bit NEON).
        codec_gbs=1.15,
    ),
    _preset(
        "intel-n100-edge-box",
        "Intel N100 mini PC, 16 GB DDR5-4800 single channel: 4x Gracemont E-cores + UHD Graphics (24 EU)",
        # 16 GiB DDR5 SO-DIMM - 2 GiB for a server Linux and the runtime = 14 GiB.
        14 * _GIB,
        Backend(
            name="cpu", kind="cpu",
            # 4 Gracemont E-cores @ 3.4 GHz max turbo (Intel ARK, N100); AVX2 on 2x128-bit FMA
            # = 16 FLOP/cycle: 4 x 3.4 x 16 = 217.6 GFLOP/s.
            peak_gflops=217.6,
            # DDR5-4800, one 64-bit channel: 8 B x 4800 MT/s = 38.4 GB/s (Intel ARK).
            mem_bandwidth_gbs=38.4,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP),
        Backend(
            name="gpu", kind="gpu",
            # UHD Graphics, 24 EU @ 750 MHz max (Intel ARK); an Xe-LP EU has 8 fp32 FMA lanes = 16
            # FLOP/cycle: 24 x 16 x 0.75 = 288 GFLOP/s.
            peak_gflops=288.0, mem_bandwidth_gbs=38.4,
            op_overhead_us=30.0, efficiency=0.4,
            execution_providers=_OPENVINO_EP),
        # codec_gbs: estimated (Gracemont @ 3.4 GHz, AVX2 on 128-bit units).
        codec_gbs=1.0,
    ),
    _preset(
        "intel-nuc-13-pro-i7-32gb",
        "Intel NUC 13 Pro, Core i7-1360P, 32 GB DDR4-3200 dual channel, Iris Xe (96 EU)",
        # 32 GiB DDR4 (2 SO-DIMMs) - 3 GiB for a desktop Linux and the runtime = 29 GiB.
        29 * _GIB,
        Backend(
            name="cpu", kind="cpu",
            # i7-1360P (Intel ARK): 4 P-cores @ 5.0 GHz, 2x256-bit FMA = 32 FLOP/cycle, plus 8
            # E-cores @ 3.7 GHz, 16 FLOP/cycle: 4x5.0x32 + 8x3.7x16 = 640 + 473.6 = 1113.6 GFLOP/s
            # at max turbo; sustained all-core clocks are lower, hence efficiency 0.35.
            peak_gflops=1113.6,
            # DDR4-3200, two 64-bit channels: 16 B x 3200 MT/s = 51.2 GB/s.
            mem_bandwidth_gbs=51.2,
            op_overhead_us=5.0, efficiency=0.35,
            execution_providers=_CPU_EP),
        Backend(
            name="gpu", kind="gpu",
            # Iris Xe, 96 EU @ 1.5 GHz max (Intel ARK) x 16 FLOP/cycle = 2304 GFLOP/s.
            peak_gflops=2304.0, mem_bandwidth_gbs=51.2,
            op_overhead_us=20.0, efficiency=0.4,
            execution_providers=_OPENVINO_EP),
        # codec_gbs: estimated (Raptor Cove @ up to 5.0 GHz, AVX2).
        codec_gbs=2.5,
    ),
    _preset(
        "host",
        "This development VM: 2 vCPUs of an Intel Xeon @ 2.8 GHz (Ice Lake-SP, AVX-512), "
        "ONNX Runtime CPU with 1 or 2 intra-op threads (the backends `edgeplan profile` measures)",
        # 23 GiB of RAM (free -g) shared with other users: 16 GiB for edgeplan (approximate).
        16 * _GIB,
        Backend(
            name="cpu1", kind="cpu",
            # One core: AVX-512 with two FMA units = 64 fp32 FLOP/cycle x 2.8 GHz = 179.2
            # GFLOP/s (approximate: the VM does not say whether the second FMA unit exists).
            peak_gflops=179.2,
            # A share of a server's DDR4 as one core sees it (approximate; not published).
            mem_bandwidth_gbs=15.0,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP),
        Backend(
            name="cpu2", kind="cpu",
            # Both cores: 2 x 179.2 GFLOP/s (approximate, as above).
            peak_gflops=358.4, mem_bandwidth_gbs=25.0,
            op_overhead_us=5.0, efficiency=0.5,
            execution_providers=_CPU_EP),
        # codec_gbs: measured here with `edgeplan codecs`: 1.4-2.8 over repeated runs (other
        # tenants slow this VM in spells); other presets' estimates are relative to this one.
        codec_gbs=2.3,
    ),
)
_DEVICE_PRESETS: Mapping[str, _DevicePreset] = MappingProxyType(
    {preset.device.kind: preset for preset in _DEVICE_PRESET_LIST})


# --- fleet presets: TOML text, parsed like a user's file ---------------------------------------


class _FleetPreset(NamedTuple):
    description: str
    toml: str


_FLEET_PRESETS: Mapping[str, _FleetPreset] = MappingProxyType({
    "home-lab": _FleetPreset(
        "Raspberry Pi 5, Jetson Orin Nano and Intel N100 box on gigabit Ethernet; "
        "a Snapdragon 8 Gen 3 phone on Wi-Fi 5",
        """
name = "home-lab"
[default_link]
preset = "gigabit-ethernet"
[[device]]
name = "pi5"
preset = "raspberry-pi-5-8gb"
[[device]]
name = "orin-nano"
preset = "jetson-orin-nano-8gb"
[[device]]
name = "n100-box"
preset = "intel-n100-edge-box"
[[device]]
name = "phone"
preset = "snapdragon-8-gen3-phone"
# The phone reaches every wired device through the Wi-Fi access point.
[[link]]
a = "phone"
b = "pi5"
preset = "wifi-5"
[[link]]
a = "phone"
b = "orin-nano"
preset = "wifi-5"
[[link]]
a = "phone"
b = "n100-box"
preset = "wifi-5"
"""),
    "host": _FleetPreset(
        "This machine alone (device preset `host`): plan onto its 1- or 2-thread ONNX Runtime CPU",
        """
name = "host"
[[device]]
name = "host"
preset = "host"
"""),
    "host-pair": _FleetPreset(
        "This machine as a two-stage pipeline: host-0 and host-1, one core and one ONNX Runtime "
        "thread each, handing tensors over in memory",
        """
name = "host-pair"
# Stages of a local pipeline pass numpy arrays between threads: no copy, a queue hand-off.
[default_link]
bandwidth_mbps = 80000
latency_ms = 0.02
[[device]]
name = "host"
preset = "host"
only_backends = ["cpu1"]
memory_gb = 8
count = 2
"""),
    "jetson-cluster": _FleetPreset(
        "4x Jetson Orin Nano 8GB on gigabit Ethernet (homogeneous)",
        """
name = "jetson-cluster"
[default_link]
preset = "gigabit-ethernet"
[[device]]
name = "orin-nano"
preset = "jetson-orin-nano-8gb"
count = 4
"""),
    "pi-cluster": _FleetPreset(
        "4x Raspberry Pi 5 8GB on gigabit Ethernet (homogeneous)",
        """
name = "pi-cluster"
[default_link]
preset = "gigabit-ethernet"
[[device]]
name = "pi5"
preset = "raspberry-pi-5-8gb"
count = 4
"""),
    "pi-pair-slow-link": _FleetPreset(
        "2x Raspberry Pi 5 8GB over a 20 Mbit/s, 2 ms link (weak Wi-Fi or a 4G uplink): where "
        "boundary compression pays",
        """
name = "pi-pair-slow-link"
[default_link]
bandwidth_mbps = 20
latency_ms = 2
[[device]]
name = "pi"
preset = "raspberry-pi-5-8gb"
count = 2
"""),
    "phones": _FleetPreset(
        "Snapdragon 8 Gen 3 phone, Pixel 8 Pro and Jetson Orin Nano on Wi-Fi 6",
        """
name = "phones"
[default_link]
preset = "wifi-6"
[[device]]
name = "galaxy-s24"
preset = "snapdragon-8-gen3-phone"
[[device]]
name = "pixel-8-pro"
preset = "tensor-g3-phone"
[[device]]
name = "orin-nano"
preset = "jetson-orin-nano-8gb"
"""),
    "edge-8": _FleetPreset(
        "8 devices with 172 GiB together, enough for a 7B fp32 model (~28 GB of weights): "
        "2x Jetson AGX Orin 64GB, 4x Jetson Orin Nano, 2x Intel N100 box on gigabit Ethernet",
        """
name = "edge-8"
[default_link]
preset = "gigabit-ethernet"
[[device]]
name = "agx-orin"
preset = "jetson-agx-orin-64gb"
count = 2
[[device]]
name = "orin-nano"
preset = "jetson-orin-nano-8gb"
count = 4
[[device]]
name = "n100-box"
preset = "intel-n100-edge-box"
count = 2
"""),
})


# --- parsing: one path for files, dicts and presets ---------------------------------------------

_FLEET_KEYS = ("name", "default_link", "device", "link")
_DEVICE_KEYS = ("name", "preset", "count", "memory_gb", "memory_bytes", "address", "codec_gbs",
                "kind", "only_backends", "backend")
_BACKEND_KEYS = ("name", "kind", "peak_gflops", "mem_bandwidth_gbs", "op_overhead_us",
                 "efficiency", "execution_providers", "tvm_target")
_BACKEND_REQUIRED = MappingProxyType({
    "name": 'name the backend, e.g. name = "cpu"',
    "kind": 'set kind = "cpu", "gpu" or "npu"',
    "peak_gflops": _FIX_PEAK,
    "mem_bandwidth_gbs": _FIX_MEM_BANDWIDTH,
})
_DEFAULT_LINK_KEYS = ("preset", "bandwidth_mbps", "bandwidth_bytes_s", "latency_ms", "latency_s")
_LINK_KEYS = ("a", "b") + _DEFAULT_LINK_KEYS

# Each quantity's spellings and how each converts to the model's unit.
_Units = Mapping[str, Callable[[float], float]]
_MEMORY_UNITS: _Units = MappingProxyType({"memory_gb": lambda gb: gb * 1e9, "memory_bytes": float})
_BANDWIDTH_UNITS: _Units = MappingProxyType({
    "bandwidth_mbps": lambda mbps: mbps * 1e6 / 8, "bandwidth_bytes_s": float})
_LATENCY_UNITS: _Units = MappingProxyType({"latency_ms": lambda ms: ms / 1000, "latency_s": float})


def _check_keys(table: Mapping, known: Sequence[str], what: str) -> None:
    for key in table:
        if key not in known:
            raise FleetError(f"unknown key {key!r} in {what}{_did_you_mean(key, known)}; "
                             f"fix: rename or remove it (known keys: {', '.join(known)})")


def _check_table(value: object, what: str, toml_header: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise FleetError(f"{what} must be a table, got {value!r}; fix: write it as {toml_header}")
    return value


def _table_array(parent: Mapping, key: str, toml_header: str) -> list[Mapping]:
    tables = parent.get(key, [])
    if isinstance(tables, Mapping) or isinstance(tables, str) or not isinstance(tables, Sequence):
        raise FleetError(f"{key!r} must be an array of tables, got {tables!r}; "
                         f"fix: write one {toml_header} (double brackets) per entry")
    return list(tables)


def _unit_value(table: Mapping, units: _Units, fix: str, positive: bool) -> float:
    """The quantity given by exactly one of its spellings in `units`, in the model's unit."""
    given = [key for key in units if key in table]
    if len(given) > 1:
        raise FleetError(f"{' and '.join(given)} both given; fix: keep only one of them")
    if not given:
        raise FleetError(f"missing {' or '.join(units)}; fix: {fix}")
    key = given[0]
    check = _check_positive if positive else _check_non_negative
    return units[key](check(table[key], key, fix))


def _merge_units(base: Mapping, override: Mapping, groups: Sequence[_Units]) -> dict:
    """base updated by override, where giving one spelling of a quantity replaces the others."""
    merged = dict(base)
    for units in groups:
        if any(key in override for key in units):
            for key in units:
                merged.pop(key, None)
    merged.update(override)
    return merged


def _parse_link(table: object, where: str, with_ends: bool) -> Link:
    with _within(where):
        header = "[[link]]" if with_ends else "[default_link]"
        table = _check_table(table, where, header)
        _check_keys(table, _LINK_KEYS if with_ends else _DEFAULT_LINK_KEYS, f"this {header}")
        if "preset" in table:
            name = table["preset"]
            if name not in _LINK_PRESETS:
                raise FleetError(f"unknown link preset {name!r}{_did_you_mean(name, list(_LINK_PRESETS))}; "
                                 f"fix: use one of {_names(list(_LINK_PRESETS))}")
            preset = _LINK_PRESETS[name].link
            base = {"bandwidth_bytes_s": preset.bandwidth_bytes_s, "latency_s": preset.latency_s}
            table = _merge_units(base, table, (_BANDWIDTH_UNITS, _LATENCY_UNITS))
        bandwidth = _unit_value(table, _BANDWIDTH_UNITS, _FIX_LINK_BANDWIDTH, positive=True)
        latency = _unit_value(table, _LATENCY_UNITS, _FIX_LINK_LATENCY, positive=False)
        ends = (_ANY_DEVICE, _ANY_DEVICE)
        if with_ends:
            for key in ("a", "b"):
                if not isinstance(table.get(key), str):
                    raise FleetError(f"{key} must be a device name, got {table.get(key)!r}; "
                                     "fix: set a and b to the names of the two devices it connects")
            ends = (table["a"], table["b"])
    return Link(ends[0], ends[1], bandwidth, latency)


def _parse_backend(table: object, index: int) -> Backend:
    label = repr(table["name"]) if isinstance(table, Mapping) and isinstance(table.get("name"), str) else f"#{index}"
    with _within(f"backend {label}"):
        table = _check_table(table, "a backend", "[[device.backend]]")
        _check_keys(table, _BACKEND_KEYS, "this [[device.backend]]")
        for key, fix in _BACKEND_REQUIRED.items():
            if key not in table:
                raise FleetError(f"missing {key!r}; fix: {fix}")
        values = dict(table)
        providers = values.get("execution_providers")
        if isinstance(providers, list):
            values["execution_providers"] = tuple(providers)
    return Backend(**values)


def _merge_backends(preset_tables: Sequence[Mapping], override_tables: Sequence[object]) -> list:
    """Preset backends with the file's tables applied: same name overrides keys, new name adds."""
    merged = [dict(table) for table in preset_tables]
    by_name = {table["name"]: table for table in merged}
    for table in override_tables:
        if isinstance(table, Mapping) and table.get("name") in by_name:
            by_name[table["name"]].update(table)
        else:
            merged.append(table)
    return merged


def _with_preset(table: Mapping) -> dict:
    """The device table with its preset's figures filled in under the keys it does not give."""
    name = table["preset"]
    if name not in _DEVICE_PRESETS:
        known = list(_DEVICE_PRESETS)
        raise FleetError(f"unknown preset {name!r}{_did_you_mean(name, known)}; fix: use one of "
                         f"{_names(known)}, or spell the device out with memory_gb and [[device.backend]]")
    base = _device_to_dict(_DEVICE_PRESETS[name].device)
    del base["name"]
    override = {key: value for key, value in table.items() if key not in ("preset", "backend")}
    merged = _merge_units(base, override, (_MEMORY_UNITS,))
    overrides = _table_array(table, "backend", "[[device.backend]]")
    merged["backend"] = _merge_backends(base["backend"], overrides)
    return merged


def _keep_backends(backends: list[Backend], only: object) -> list[Backend]:
    available = [backend.name for backend in backends]
    if isinstance(only, str) or not isinstance(only, Sequence) or not only:
        raise FleetError(f"only_backends must be a non-empty list of backend names, got {only!r}; "
                         f"fix: e.g. only_backends = [{available[0]!r}]")
    kept = []
    for name in only:
        if name not in available:
            raise FleetError(f"only_backends names {name!r}, which this device does not have"
                             f"{_did_you_mean(name, available)}; fix: use some of {_names(available)}")
        kept.append(backends[available.index(name)])
    return kept


def _parse_device(table: object, index: int) -> tuple[list[Device], int | None]:
    """The device(s) one [[device]] table describes, and its count (None when not given)."""
    label = repr(table["name"]) if isinstance(table, Mapping) and isinstance(table.get("name"), str) else f"#{index}"
    with _within(f"device {label}"):
        table = _check_table(table, "a device", "[[device]]")
        _check_keys(table, _DEVICE_KEYS, "this [[device]]")
        if "name" not in table:
            raise FleetError('missing \'name\'; fix: add name = "..." (unique in the fleet)')
        name = _check_name(table["name"], "name", "device")
        count = None
        if "count" in table:
            count = int(_check_positive_int(table["count"], "count",
                                            "set count to how many identical devices to create"))
        if "preset" in table:
            table = _with_preset(table)
        memory_bytes = round(_unit_value(table, _MEMORY_UNITS, _FIX_MEMORY, positive=True))
        backend_tables = _table_array(table, "backend", "[[device.backend]]")
        if not backend_tables:
            raise FleetError("has no backends; fix: add at least one [[device.backend]] table "
                             "(name, kind, peak_gflops, mem_bandwidth_gbs) or use a preset")
        backends = [_parse_backend(backend, i) for i, backend in enumerate(backend_tables, 1)]
        if "only_backends" in table:
            backends = _keep_backends(backends, table["only_backends"])
        address = _check_address(table.get("address"))
        if address is not None and count is not None and count > 1:
            raise FleetError(f"address {address!r} would be shared by the {count} devices that "
                             f"count = {count} creates; fix: give each device its own [[device]] table")
    device = Device(name=name, memory_bytes=memory_bytes, backends=tuple(backends),
                    kind=table.get("kind", "custom"), address=address, codec_gbs=table.get("codec_gbs"))
    if count is None:
        return [device], None
    return [dataclasses.replace(device, name=f"{name}-{i}") for i in range(count)], count


def _expansion(name: str, count: int) -> str:
    names = [f"{name}-{i}" for i in range(count)]
    shown = _names(names) if count <= 4 else f"{names[0]!r} ... {names[-1]!r}"
    return f"[[device]] {name!r} with count = {count} expands to {shown}"


def fleet_from_dict(d: dict, source: str = "<dict>") -> Fleet:
    """Build and validate a fleet from a parsed fleet file or from `Fleet.to_dict()`."""
    source = str(source)
    if not isinstance(d, Mapping):
        raise FleetError(f"{source}: a fleet must be a table with name, [[device]] and [[link]], "
                         f"got {type(d).__name__}")
    with _within(source):
        _check_keys(d, _FLEET_KEYS, "the top level")
        if "name" not in d:
            raise FleetError('missing \'name\'; fix: add name = "my-lab" at the top of the file')
        name = _check_name(d["name"], "fleet name", "fleet")
        default_link = (_parse_link(d["default_link"], "default_link", with_ends=False)
                        if "default_link" in d else _GIGABIT_ETHERNET)

        devices: list[Device] = []
        origin: dict[str, str] = {}  # device name -> which table made it, for duplicate messages
        expanded: dict[str, str] = {}  # name given with count -> its expansion, for link hints
        for index, table in enumerate(_table_array(d, "device", "[[device]]"), 1):
            made, count = _parse_device(table, index)
            base_name = table["name"]
            where = _expansion(base_name, count) if count is not None else f"[[device]] #{index}"
            if count is not None:
                expanded[base_name] = where
            for device in made:
                if device.name in origin:
                    raise FleetError(
                        f"device name {device.name!r} is used twice ({origin[device.name]}; {where}); "
                        "fix: give each device a unique name")
                origin[device.name] = where
                devices.append(device)
        if not devices:
            raise FleetError(f"fleet {name!r} has no devices; fix: add at least one [[device]] table "
                             "(with a preset or memory_gb and [[device.backend]])")

        links = []
        for index, table in enumerate(_table_array(d, "link", "[[link]]"), 1):
            ends = [table.get(key) for key in ("a", "b")] if isinstance(table, Mapping) else []
            named = all(isinstance(end, str) for end in ends)
            label = f"link {ends[0]!r} <-> {ends[1]!r}" if named else f"link #{index}"
            link = _parse_link(table, label, with_ends=True)
            with _within(label):
                for end in (link.a, link.b):
                    if end in expanded and end not in origin:
                        raise FleetError(f"names {end!r}, but {expanded[end]}; fix: name one of those")
                    if end not in origin:
                        raise FleetError(f"names unknown device {end!r}{_did_you_mean(end, list(origin))}; "
                                         f"fix: use one of {_names(list(origin))}")
            links.append(link)
    return Fleet(name=name, devices=tuple(devices), links=tuple(links),
                 default_link=default_link, source=source)


def _read_fleet_file(path: Path) -> Fleet:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FleetError(f"{path}: cannot read the fleet file ({error}); fix: check the path "
                         "and that it is a UTF-8 text file") from error
    if path.suffix.lower() == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise FleetError(f"{path}: invalid JSON: {error}; fix: correct the syntax there") from error
    else:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise FleetError(f"{path}: invalid TOML: {error}; fix: correct the syntax at that line") from error
    return fleet_from_dict(document, source=str(path))


def load_fleet(spec: "str | os.PathLike | Fleet") -> Fleet:
    """A Fleet passes through; a preset fleet name loads that preset; otherwise a .toml/.json path."""
    if isinstance(spec, Fleet):
        return spec
    if isinstance(spec, Mapping):
        return fleet_from_dict(spec)
    if isinstance(spec, str) and spec in _FLEET_PRESETS:
        return fleet_from_dict(tomllib.loads(_FLEET_PRESETS[spec].toml), source=f"preset:{spec}")
    if not isinstance(spec, (str, os.PathLike)):
        raise FleetError(f"load_fleet: expected a Fleet, a preset fleet name or a path to a .toml "
                         f"file, got {type(spec).__name__}; fix: pass e.g. 'home-lab' or 'my-lab.toml'")
    path = Path(spec)
    if not path.is_file():
        known = list(_FLEET_PRESETS)
        hint = _did_you_mean(os.fspath(spec), known)
        if os.fspath(spec) in _DEVICE_PRESETS:
            hint = " (that is a device preset; a fleet file lists devices with preset = ...)"
        raise FleetError(f"{path}: no such fleet file, and {os.fspath(spec)!r} is not a preset fleet{hint}; "
                         f"fix: use one of the preset fleets ({', '.join(known)}) or the path of a "
                         ".toml fleet file")
    return _read_fleet_file(path)


def list_presets() -> dict[str, str]:
    """Device preset id -> one-line description."""
    return {kind: preset.description for kind, preset in _DEVICE_PRESETS.items()}


def list_fleets() -> dict[str, str]:
    """Fleet preset name -> one-line description."""
    return {name: preset.description for name, preset in _FLEET_PRESETS.items()}


def preset_device(kind: str, name: str | None = None, **overrides) -> Device:
    """The device preset `kind`, named `name` (default: the preset id).

    `overrides` are [[device]] keys: memory_gb or memory_bytes, address, codec_gbs, kind, only_backends,
    and backend (a list of backend dicts; a name matching a preset backend overrides its keys).
    """
    source = f"preset_device({kind!r})"
    with _within(source):
        for key in ("preset", "count"):
            if key in overrides:
                raise FleetError(f"{key!r} cannot be overridden here; fix: pass the preset id as kind "
                                 "and the device name as name, and build several devices one by one")
        if kind not in _DEVICE_PRESETS:
            known = list(_DEVICE_PRESETS)
            raise FleetError(f"unknown preset {kind!r}{_did_you_mean(kind, known)}; fix: use one of {_names(known)}")
        table = {"name": kind if name is None else name, "preset": kind, **overrides}
        (device,), _ = _parse_device(table, 1)
    return device
