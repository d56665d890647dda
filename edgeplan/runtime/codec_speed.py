"""How fast one core of this machine runs the boundary codecs: the figure that moves codec
times measured on the compiling host to the devices of a fleet.

The compress pass times every codec on the host. A device encodes and decodes on one of
its own cores (numpy runs the codecs single-threaded), so the planner scales those times
by host speed / device speed, both measured by the same reference benchmark:

    reference_gbs()   GB/s of float32 activation through int8 encode + decode on one core
                      (16 MB, normal(0, 1), [8, 512, 1024]; best of `repeats`): 1 / (1/enc + 1/dec)

A device states its figure as `codec_gbs` in the fleet file; `edgeplan codecs`, run on the
device (numpy and zstandard only, no torch), prints it along with every codec's speed.

Only numpy and the stdlib (and zstandard through the codecs): devices import this without torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from edgeplan.runtime.codecs import Codec, all_codecs, decode, encode

T = TypeVar("T")

REFERENCE_CODEC = "int8"
ACTIVATION_SHAPE = (8, 512, 1024)  # 16 MB of float32: a transformer's hidden states


@dataclass(frozen=True)
class CodecSpeed:
    """One codec on the reference activation: bytes ratio and one core's encode/decode GB/s."""

    codec: str
    ratio: float
    encode_gbs: float
    decode_gbs: float


def reference_activation() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(ACTIVATION_SHAPE, dtype=np.float32)


def best_time(action: Callable[[], T], repeats: int) -> tuple[float, T]:
    """(fastest of `repeats` calls in seconds, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = action()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure_codec(codec: Codec | str, activation: np.ndarray, repeats: int = 5) -> CodecSpeed:
    """Bytes ratio and best-of-`repeats` encode and decode GB/s of `codec` on `activation`."""
    payload = encode(activation, codec)
    encode_s, _ = best_time(lambda: encode(activation, codec), repeats)
    decode_s, _ = best_time(lambda: decode(payload), repeats)
    name = codec if isinstance(codec, str) else codec.name
    return CodecSpeed(name, activation.nbytes / len(payload), activation.nbytes / encode_s / 1e9,
                      activation.nbytes / decode_s / 1e9)


def codec_speeds(repeats: int = 5) -> tuple[CodecSpeed, ...]:
    """Every codec on the reference activation, in `all_codecs()` order."""
    activation = reference_activation()
    return tuple(measure_codec(codec, activation, repeats) for codec in all_codecs())


def reference_gbs(repeats: int = 5, activation: np.ndarray | None = None) -> float:
    """This core's codec speed figure (module docstring): int8 encode + decode, GB/s."""
    speed = measure_codec(REFERENCE_CODEC, reference_activation() if activation is None else activation,
                          repeats)
    return 1.0 / (1.0 / speed.encode_gbs + 1.0 / speed.decode_gbs)
