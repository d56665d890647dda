"""Compress: measure every boundary codec at every cut, and offer the ones within budget to the ILP.

Decision out, no graph rewrite. For each cut between units, on calibration inputs, every
codec in `edgeplan.runtime.codecs` round-trips the tensors crossing the cut; the rest of
the graph runs on the decoded tensors. Measured per (cut, codec): wire bytes, relative L2
error of the boundary tensors and of the model outputs, argmax agreement of the first
float output's last dimension (top-1 for classifiers, next token for language models),
and encode/decode seconds on the compiling host.

`offer_codecs` turns the measurements into the codec columns of the CostTables: a codec
is allowed at a cut when its output error is within `max_error` (and its agreement at
least `min_agreement`, if given) and no other allowed codec is both smaller on the wire
and at most as slow to encode and to decode. The partition ILP then picks cut and codec
together. Runs after `cost`, before `partition`: the choice needs the measured sizes.

Codec times are measured on the compiling host; a device runs them on one of its own
cores. `codec_time_scale` gives each device the factor host speed / device speed of the
same reference benchmark (`edgeplan.runtime.codec_speed`: the host measures its own, a
device states `codec_gbs` in the fleet file), 1 where a device states none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.fx

from edgeplan.errors import PlanError
from edgeplan.passes.capture import bind_inputs, fetch_attr, signature_of
from edgeplan.passes.units import Unit
from edgeplan.planner.cost import CostTables
from edgeplan.planner.fleet import Fleet
from edgeplan.runtime.codec_speed import best_time
from edgeplan.runtime.codecs import Codec, all_codecs, decode

TIMING_REPEATS = 3


@dataclass(frozen=True)
class CodecMeasurement:
    """One codec at one cut, averaged over the calibration batches (per microbatch)."""

    codec: str
    wire_bytes: int
    raw_bytes: int
    boundary_error: float
    output_error: float
    agreement: float | None
    encode_s: float
    decode_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 1.0


@dataclass(frozen=True)
class CutMeasurements:
    cut: int  # the cut after unit `cut`
    codecs: tuple[CodecMeasurement, ...]

    def get(self, name: str) -> CodecMeasurement:
        return next(m for m in self.codecs if m.codec == name)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    if not exact.is_floating_point():
        return 0.0 if torch.equal(approx, exact) else 1.0
    exact64, approx64 = exact.double(), approx.double()
    return float(torch.linalg.vector_norm(approx64 - exact64) / max(torch.linalg.vector_norm(exact64), 1e-30))


def _agreement(approx: torch.Tensor, exact: torch.Tensor) -> float | None:
    if not exact.is_floating_point() or exact.ndim == 0 or exact.shape[-1] < 2:
        return None
    return float((approx.argmax(dim=-1) == exact.argmax(dim=-1)).double().mean())


class _Replayer:
    """Runs a captured graph once, then re-runs its tail from any cut with replaced tensors."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.by_name = {node.name: node for node in self.nodes}
        self.values: dict[torch.fx.Node, object] = {}
        with torch.no_grad():
            self._run(self.values, 0, inputs)
        self.outputs = self._outputs(self.values)

    def _run(self, env: dict, start: int, inputs: dict | None = None) -> None:
        for node in self.nodes[start:]:
            if node.op == "placeholder":
                env[node] = inputs[node.name]
            elif node.op == "get_attr":
                env[node] = fetch_attr(self.gm, node.target)
            elif node.op == "call_function":
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                env[node] = node.target(*args, **kwargs)

    def _outputs(self, env: dict) -> list[torch.Tensor]:
        returned = self.nodes[-1].args[0]
        return [env[node] for node in returned]

    def replay(self, after_position: int, replaced: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Outputs when the nodes after `after_position` see `replaced` instead of the originals."""
        env = {node: value for node, value in self.values.items() if self.position[node] <= after_position}
        for node in list(env):
            if node.name in replaced:
                env[node] = replaced[node.name]
        with torch.no_grad():
            self._run(env, after_position + 1)
        return self._outputs(env)


def measure_cuts(gm: torch.fx.GraphModule, units: Sequence[Unit], calibration: Sequence,
                 codecs: Sequence[Codec] | None = None) -> tuple[CutMeasurements, ...]:
    """Measure every codec at every cut on the calibration batches (see module docstring)."""
    signature = signature_of(gm)
    if signature.on_meta:
        raise PlanError(
            "compress: the model's weights are on the meta device, so codec errors cannot be "
            "measured; build it with real weights, or leave --max-error unset to send boundaries raw")
    codecs = tuple(codecs or all_codecs())
    replayers = [_Replayer(gm, bind_inputs(signature, batch)) for batch in calibration]
    node_position = {node.name: i for i, node in enumerate(replayers[0].nodes)}
    results = []
    for unit in units[:-1]:
        cut_position = node_position[unit.nodes[-1]]
        names = [t.name for t in unit.cut_tensors]
        per_codec = []
        errors_by_base: dict[str, tuple[float, float, float | None]] = {}
        for codec in codecs:
            wire = raw = 0
            encode_s = decode_s = 0.0
            boundary_error = output_error = 0.0
            agreements = []
            for replayer in replayers:
                arrays = {n: replayer.values[replayer.by_name[n]].detach().numpy() for n in names}
                encode_time, payloads = best_time(lambda: {n: codec.encode(a) for n, a in arrays.items()},
                                                  TIMING_REPEATS)
                decode_time, decoded = best_time(lambda: {n: decode(p) for n, p in payloads.items()},
                                                 TIMING_REPEATS)
                encode_s += encode_time
                decode_s += decode_time
                wire += sum(len(p) for p in payloads.values())
                raw += sum(a.nbytes for a in arrays.values())
                if codec.base in errors_by_base:  # a lossless stage does not change the values
                    continue
                tensors = {n: torch.from_numpy(np.ascontiguousarray(d)) for n, d in decoded.items()}
                boundary_error = max([boundary_error, *(
                    _relative_error(tensors[n], torch.from_numpy(arrays[n])) for n in names)])
                outputs = replayer.replay(cut_position, tensors)
                output_error = max([output_error, *(
                    _relative_error(o, e) for o, e in zip(outputs, replayer.outputs))])
                agreement = _agreement(outputs[0], replayer.outputs[0])
                if agreement is not None:
                    agreements.append(agreement)
            if codec.base not in errors_by_base:
                errors_by_base[codec.base] = (boundary_error, output_error,
                                              float(np.mean(agreements)) if agreements else None)
            boundary_error, output_error, agreement = errors_by_base[codec.base]
            batches = len(replayers)
            per_codec.append(CodecMeasurement(
                codec=codec.name, wire_bytes=wire // batches, raw_bytes=raw // batches,
                boundary_error=boundary_error, output_error=output_error, agreement=agreement,
                encode_s=encode_s / batches, decode_s=decode_s / batches))
        results.append(CutMeasurements(unit.index, tuple(per_codec)))
    return tuple(results)


def offer_codecs(tables: CostTables, cuts: Sequence[CutMeasurements], max_error: float,
                 min_agreement: float | None = None) -> CostTables:
    """CostTables with one codec column per measured codec, allowed within the budget."""
    if not cuts:
        return tables
    names = tuple(m.codec for m in cuts[0].codecs)
    if names[0] != "raw":
        raise PlanError("compress: the first codec must be raw, the fallback every cut can use")
    wire = np.array([[m.wire_bytes for m in cut.codecs] for cut in cuts], dtype=np.int64)
    encode = np.array([[m.encode_s for m in cut.codecs] for cut in cuts])
    decode_s = np.array([[m.decode_s for m in cut.codecs] for cut in cuts])
    within = np.array([[m.output_error <= max_error
                        and (min_agreement is None or m.agreement is None or m.agreement >= min_agreement)
                        for m in cut.codecs] for cut in cuts])
    within[:, 0] = True
    allowed = within & ~_dominated(wire, encode, decode_s, within)
    return dataclasses.replace(tables, codec_names=names, codec_wire_bytes=wire, codec_encode_s=encode,
                               codec_decode_s=decode_s, codec_allowed=allowed)


def _dominated(wire: np.ndarray, encode: np.ndarray, decode_s: np.ndarray, within: np.ndarray) -> np.ndarray:
    """[cut, codec]: another allowed codec is no larger and no slower (and better somewhere)."""
    dominated = np.zeros_like(within)
    for c in range(wire.shape[1]):
        no_worse = (wire <= wire[:, [c]]) & (encode <= encode[:, [c]]) & (decode_s <= decode_s[:, [c]]) & within
        better = (wire < wire[:, [c]]) | (encode < encode[:, [c]]) | (decode_s < decode_s[:, [c]])
        dominated[:, c] = (no_worse & better).any(axis=1)
    return dominated


def codec_time_scale(fleet: Fleet, device_names: Sequence[str],
                     measure_host_gbs: Callable[[], float]) -> np.ndarray:
    """[device] in `device_names` order: host codec speed / the device's (`codec_gbs`), 1
    where the fleet gives none; the host is measured only if some device states a figure."""
    speeds = [fleet.device(name).codec_gbs for name in device_names]
    if all(speed is None for speed in speeds):
        return np.ones(len(speeds))
    host_gbs = measure_host_gbs()
    return np.array([1.0 if speed is None else host_gbs / speed for speed in speeds])
