"""Wire formats for boundary tensors: the activations that cross a slow link between devices.

    payload = encode(activation, "int8+zstd")     # bytes, self-describing
    activation_hat = decode(payload)              # no codec argument needed

A codec is a *base* (how values are represented) plus an optional *lossless* stage:

    base          bytes/value  round trip of a float tensor x (r = max - min)
    raw           itemsize     bit-exact, any dtype and shape
    fp16          2            |err| <= 2^-11 |x| for |x| in fp16's normal range
                               [2^-14, 65504], <= 2^-25 below it (numpy's rounding, bit
                               for bit); |x| >= 65520 raises InputError
    bf16          2            |err| <= 2^-8 |x| (upper 16 bits of float32, rounded to
                               nearest even); |x| beyond bf16's max raises InputError
    int8          1            |err| <= scale/2, scale = r/255 (per tensor)
    int8-channel  1            |err| <= scale_c/2, scale_c = r_c/255 per channel: axis 1 of
                               a 4-D (NCHW) tensor, else the last axis (0-d: per tensor)
    int8-row      1            |err| <= s_r/2, s_r = max|x_r|/127 per row (a row is one
                               vector along the last axis: a token's hidden state), symmetric
    int4          1/2          |err| <= scale/2, scale = r/15, two codes per byte
    int2          1/4          |err| <= scale/2, scale = r/3, four codes per byte

The affine codes (int8, int8-channel, int4, int2) are q = rint((x - min) / scale) in
[0, levels], decoded as q * scale + min; float rounding adds at most 4 eps * max(|min|, |max|) and the original
dtype's smallest subnormal step (eps of float32 for float16/float32 input, of float64 for
float64). Constant tensors and constant channels round-trip exactly (scale 0).

int8-row is what activation quantization in LLM serving uses: a token whose hidden state
is small keeps its own resolution instead of sharing the range of the largest token. Its
codes are signed, q = rint(x / s_r) in [-127, 127], decoded as q * s_r. The scales are
stored as float16, rounded up (so |x / s_r| <= 127 needs no clip; rounding adds at most
2^-10 relative plus fp16's subnormal step 2^-24 to s_r), which keeps int8-row at 3.9x or
better from a 128-wide last axis on; as float32 where a scale exceeds float16's range, as
float64 for float64 input. All-zero rows are exact.

Lossy codecs need float16/float32/float64 input with finite values: NaN or inf raises
InputError (send such tensors with "raw"). Bool and integer tensors (attention masks,
position ids, ...) are sent exactly by every codec but "raw": the base "pack" stores the
minimum and each value minus it in the fewest of 0, 1, 2, 4, 8, 16, 32 or 64 bits that hold
the range (a causal mask takes 1 bit a value, a constant tensor none), packed low bits
first; the lossless stage is kept and the header says pack. Other dtypes (strings,
datetimes, complex) go raw. `decode` returns a new, writable array with the original dtype
and shape.

Wire format (all integers little-endian):

    b"EPC1" | uint32 header length | header: compact JSON | body

The header holds codec (the base actually used), lossless, dtype (numpy name of the
original dtype; its byte-order string such as ">f4" where the name would not rebuild it),
shape, axis (int8-channel's channel axis, else null), nscale (entries per parameter
array), sdtype (the parameters' dtype: float32, or float64 for float64 tensors so that
their constants stay exact), nbytes (stored body length) and rawbytes (body length before
the lossless stage). The body is nscale scales, nscale zero points, then the data: raw
bytes, float16 / bf16 bits as uint16, or uint8 codes (int4/int2 packed low bits first,
padded with zero codes to a whole byte); pack's body is uint8 bits | the minimum in the
tensor's dtype (little-endian) | the packed values. The lossless stage "zstd" (zstd's fast
strategy, with the frame checksum) replaces the body. Float words are split into byte
planes first, as blosc does: only the most significant byte (sign and exponent, where the
redundancy of activations is) is entropy-coded, and the mantissa bytes, which zstd cannot
shrink, follow as they are, which makes the stage both faster and smaller than compressing
every byte. Stored body for 4-byte words (raw float32): uint32 length of the frame | frame
of byte 3 of every word | the words' low halves as uint16, then byte 2 of every word; for
2-byte words (fp16 and bf16 codes, raw float16): uint32 length | frame of byte 1 | byte 0 of
every word. Every other body (int codes, scales, pack, other dtypes) is one frame.

`decode` checks the magic, the header and every length against each other, and raises
ArtifactError ("truncated/corrupt boundary payload") when they do not add up; zstd's
checksum also catches flipped bits in a compressed frame. Elsewhere (raw bodies, the
mantissa planes after a frame) flipped bits decode to wrong values: the transport is
trusted with the bytes themselves, as it is for raw.

Only numpy, the stdlib and (for "+zstd") zstandard: devices import this without torch.
Everything is vectorized numpy over chunks of 64K values, so the intermediates of a
multi-step transform stay in L2 instead of streaming through memory, and each thread keeps
its body and byte-plane buffers for the next call (at most twice the largest boundary it
sent; the payload is a copy). On a 2.8 GHz Xeon core a 16 MB float32 activation encodes at
about 1.4 (fp16) to 4 (int4) GB/s and decodes at 3 to 7 GB/s; "+zstd" brings float bases
to about 0.85 (fp16) to 1.15 (raw) GB/s (bench/compress.py).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from edgeplan.errors import ArtifactError, InputError

try:  # optional at import time: only the "+zstd" codecs need it
    import zstandard as _zstd
except ImportError:  # pragma: no cover - zstandard is a declared dependency
    _zstd = None

__all__ = ["CODECS", "LOSSLESS", "Codec", "all_codecs", "decode", "encode", "parse_codec"]

CODECS: tuple[str, ...] = ("raw", "fp16", "bf16", "int8", "int8-channel", "int8-row", "int4",
                           "int2")
LOSSLESS: tuple[str, ...] = ("zstd",)

MAGIC = b"EPC1"
ZSTD_LEVEL = 1

_PREFIX = struct.Struct("<4sI")
_MAX_HEADER = 1 << 16
_MAX_DIMS = 64
_CHUNK = 1 << 16  # values per chunk: a float32 chunk is 256 KiB, well inside L2
_LEVELS = {"int8": 255, "int8-channel": 255, "int4": 15, "int2": 3}
_PER_BYTE = {"int8": 1, "int8-channel": 1, "int4": 2, "int2": 4}
_ROW_LEVELS = 127
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_FP16_OVERFLOW = 65520.0  # fp16 max is 65504; from here on values round to inf
# bf16 max is 0x7F7F0000; float32 values from 0x7F7F8000 up round (to even) to inf
_BF16_OVERFLOW = float(np.array(0x7F7F8000, np.uint32).view(np.float32))
_F32_MAX = float(np.finfo(np.float32).max)
# dtypes the exact "pack" base narrows (bool, signed and unsigned integers) and its widths
_PACKED_KINDS = "biu"
_PACK_BITS = (0, 1, 2, 4, 8, 16, 32, 64)
_HEADER_KEYS = ("codec", "lossless", "dtype", "shape", "axis", "nscale", "sdtype",
                "nbytes", "rawbytes")


# --------------------------------------------------------------------------- codec names


@dataclass(frozen=True)
class Codec:
    """A boundary-tensor wire format: a base representation plus an optional lossless stage."""

    base: str
    lossless: str | None = None

    def __post_init__(self):
        if self.base not in CODECS or (self.lossless is not None and self.lossless not in LOSSLESS):
            raise ArtifactError(
                f"unknown boundary codec base={self.base!r} lossless={self.lossless!r}: "
                f"base must be one of {', '.join(CODECS)} and lossless None or "
                f"{', '.join(repr(x) for x in LOSSLESS)}")

    @property
    def name(self) -> str:
        """"int8", "int8+zstd", "raw+zstd", ... (what `parse_codec` reads back)."""
        return self.base if self.lossless is None else f"{self.base}+{self.lossless}"

    @property
    def exact(self) -> bool:
        """True when every array round-trips bit-exactly (raw, raw+zstd)."""
        return self.base == "raw"

    def encode(self, array: np.ndarray) -> bytes:
        return encode(array, self)

    def wire_bytes(self, array: np.ndarray) -> int:
        """Bytes this codec puts on the link for `array`, header included."""
        return len(encode(array, self))

    def __str__(self) -> str:
        return self.name


def all_codecs() -> tuple[Codec, ...]:
    """Every codec: each base without and with each lossless stage."""
    return tuple(Codec(base, lossless) for base in CODECS for lossless in (None, *LOSSLESS))


def _valid_names() -> str:
    return ", ".join(c.name for c in all_codecs())


def parse_codec(name: str) -> Codec:
    """"int4+zstd" -> Codec("int4", "zstd"); an unknown name raises ArtifactError."""
    if isinstance(name, Codec):
        return name
    if isinstance(name, str):
        base, plus, lossless = name.strip().lower().partition("+")
        if base in CODECS and (not plus or lossless in LOSSLESS):
            return Codec(base, lossless if plus else None)
    raise ArtifactError(
        f"unknown boundary codec {name!r}: valid codecs are {_valid_names()}; "
        "fix the codec name in the plan or the encode() call")


# --------------------------------------------------------------------------- helpers


def _corrupt(detail: str) -> ArtifactError:
    return ArtifactError(
        f"truncated/corrupt boundary payload: {detail}; a payload must be the unchanged "
        "output of edgeplan.runtime.codecs.encode - re-send the tensor and check the "
        "transport delivers whole messages")


def _parse_dtype(text: str) -> np.dtype:
    with warnings.catch_warnings():  # numpy warns on deprecated aliases; they fail the tag check
        warnings.simplefilter("ignore")
        return np.dtype(text)


def _dtype_tag(dtype: np.dtype) -> str:
    """The numpy name of `dtype` ("float32"), or its byte-order string where the name
    would not rebuild it exactly ("<U5", ">f4", or any multi-byte type on a big-endian host)."""
    try:
        same = _parse_dtype(dtype.name) == dtype
    except (TypeError, ValueError, SyntaxError):
        same = False
    little = sys.byteorder == "little" or dtype.itemsize == 1
    return dtype.name if same and little else dtype.str


class _Local(threading.local):
    cctx = None
    dctx = None
    # Encoders build the body, and the zstd stage its byte planes, in buffers kept for the
    # next call (the payload is a copy): a fresh buffer of a boundary's size costs a page
    # fault per 4 KiB, as much as a codec pass over it.
    body = np.empty(0, np.uint8)
    planes = np.empty(0, np.uint8)


_local = _Local()


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """`nbytes` of this thread's reusable buffer `name` ("body" or "planes"), uint8."""
    buffer = getattr(_local, name)
    if buffer.size < nbytes:
        buffer = np.empty(nbytes, np.uint8)
        setattr(_local, name, buffer)
    return buffer[:nbytes]


def _need_zstd(what: str):
    if _zstd is None:
        raise ArtifactError(
            f"{what} needs the zstandard package, which is not installed; "
            "install it with `pip install 'zstandard>=0.22'` or use a codec without '+zstd'")
    return _zstd


def _compress(body) -> bytes:
    """A zstd frame with checksum."""
    zstd = _need_zstd("the '+zstd' boundary codecs")
    if _local.cctx is None:  # contexts are not thread-safe: one per thread
        # The fast strategy with a tiny hash table: activations have few long matches, and
        # their redundancy is in the symbol statistics that the literal coder sees anyway.
        _local.cctx = zstd.ZstdCompressor(compression_params=zstd.ZstdCompressionParameters(
            compression_level=ZSTD_LEVEL, strategy=zstd.STRATEGY_FAST, hash_log=6, min_match=7,
            window_log=17, write_checksum=True))
    return _local.cctx.compress(body)


def _plane_width(base: str, dtype: np.dtype) -> int:
    """Bytes per word the lossless stage splits into planes (1: no split)."""
    if base in ("fp16", "bf16"):
        return 2
    if base == "raw" and dtype.str in ("<f4", "<f2"):
        return dtype.itemsize
    return 1


def _pack_lossless(body, width: int) -> tuple:
    """The zstd stage's parts: one frame, or (width 2, 4) the byte planes (module doc)."""
    if width == 1:
        return (_compress(body),)
    words = np.frombuffer(body, np.uint8)
    n = words.size // width
    planes = _scratch("planes", words.size)
    top, low = planes[:n], planes[n:]
    top[:] = words[width - 1::width]
    top = _compress(top)
    if width == 4:
        low[:2 * n].view("<u2")[:] = words.view("<u2")[0::2]
        low[2 * n:] = words[2::4]
    else:
        low[:] = words[0::2]
    return struct.pack("<I", len(top)), top, low


def _unpack_lossless(stored, out: np.ndarray, width: int) -> None:
    """Undo `_pack_lossless` into `out` (uint8, exactly the header's rawbytes long)."""
    if width == 1:
        _decompress_into(stored, out)
        return
    n = out.size // width
    if len(stored) < 4:
        raise _corrupt(f"{len(stored)} stored bytes cannot hold the byte-plane length")
    (frame_len,) = struct.unpack_from("<I", stored)
    if 4 + frame_len + out.size - n != len(stored):
        raise _corrupt(f"byte planes: a {frame_len}-byte frame and {out.size - n} stored bytes "
                       f"do not add up to the {len(stored)} bytes of the body")
    top = np.empty(n, np.uint8)
    _decompress_into(stored[4:4 + frame_len], top)
    low = np.frombuffer(stored, np.uint8, offset=4 + frame_len)
    out[width - 1::width] = top
    if width == 4:
        out.view("<u2")[0::2] = low[:2 * n].view("<u2")
        out[2::4] = low[2 * n:]
    else:
        out[0::2] = low


def _decompress_into(data, out: np.ndarray) -> None:
    """Undo the zstd stage straight into `out` (uint8, exactly the header's rawbytes long)."""
    zstd = _need_zstd("decoding a '+zstd' boundary payload")
    if _local.dctx is None:
        _local.dctx = zstd.ZstdDecompressor()
    try:
        declared = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise _corrupt(f"bad zstd frame ({exc})") from None
    if declared != out.size:  # checked before any work: a bad frame allocates nothing
        raise _corrupt(f"zstd frame holds {declared} bytes, the header says {out.size}")
    view, filled = memoryview(out), 0
    try:
        with _local.dctx.stream_reader(data) as reader:
            while filled < out.size:
                got = reader.readinto(view[filled:])
                if not got:
                    break
                filled += got
            extra = reader.read(1)  # reads to the frame's end: checks its checksum
    except zstd.ZstdError as exc:
        raise _corrupt(f"zstd stage failed ({exc})") from None
    if filled != out.size or extra:
        raise _corrupt(f"zstd stage gave {filled}{'+' if extra else ''} bytes, "
                       f"the header says {out.size}")


def _blocks(rows: int, cols: int):
    """(r0, r1, c0, c1) blocks of about _CHUNK values covering a (rows, cols) array in order."""
    if rows == 0 or cols == 0:
        return
    if cols <= _CHUNK:
        step = _CHUNK // cols
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step), 0, cols
    else:
        for r in range(rows):
            for c0 in range(0, cols, _CHUNK):
                yield r, r + 1, c0, min(cols, c0 + _CHUNK)


def _channel_layout(shape: tuple[int, ...], base: str):
    """How an affine codec sees a tensor: (axis, rows, cols, mode, nchannels).

    The tensor is viewed as a 2-D (rows, cols) array; its parameters are one scalar
    (mode "tensor"), one per row (4-D NCHW: rows = N*C, the channel repeats every C rows)
    or one per column (channel = last axis: cols = channels).
    """
    n = math.prod(shape)
    if base != "int8-channel" or len(shape) == 0:
        return None, 1, n, "tensor", 1
    if len(shape) == 4:
        nb, c, h, w = shape
        return 1, nb * c, h * w, "row", c
    c = shape[-1]
    return len(shape) - 1, (n // c if c else 0), c, "col", c


def _param_view(params: np.ndarray, mode: str, r0, r1, c0, c1):
    """The slice of the per-tensor / per-channel parameters that block (r0:r1, c0:c1) uses."""
    if mode == "tensor":
        return params[0]
    if mode == "col":
        return params[c0:c1]
    return params[r0:r1, None]


# --------------------------------------------------------------------------- encode


def _as_array(array) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.itemsize == 0:
        raise InputError(
            f"cannot send a boundary tensor of dtype {arr.dtype}: only plain numeric, bool, "
            "string or datetime arrays have a wire format; convert it to a numeric array "
            "(structured arrays: send each field as its own tensor)")
    return arr


def _header(codec: str, lossless, arr: np.ndarray, axis, nscale: int, sdtype,
            nbytes: int, rawbytes: int) -> bytes:
    header = json.dumps(
        {"codec": codec, "lossless": lossless, "dtype": _dtype_tag(arr.dtype),
         "shape": list(arr.shape), "axis": axis, "nscale": nscale, "sdtype": sdtype,
         "nbytes": nbytes, "rawbytes": rawbytes},
        separators=(",", ":")).encode("ascii")
    return _PREFIX.pack(MAGIC, len(header)) + header


def _finish(codec: str, lossless, arr, axis, nscale, sdtype, body) -> bytes:
    """Header + body, the body through the lossless stage if one is asked for."""
    rawbytes = len(body) if isinstance(body, (bytes, bytearray)) else body.nbytes
    parts = _pack_lossless(body, _plane_width(codec, arr.dtype)) if lossless == "zstd" else (body,)
    nbytes = sum(len(part) if isinstance(part, bytes) else part.nbytes for part in parts)
    # one join: every extra copy of a large payload costs as much as a codec pass
    return b"".join((_header(codec, lossless, arr, axis, nscale, sdtype, nbytes, rawbytes), *parts))


def _raw_body(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


_FP16_FIX = "use 'bf16', an int codec, or 'raw'"


def _check_range(lo, hi, codec: Codec, limit: float | None = None, fix: str = "") -> None:
    """InputError unless every value in [lo, hi] is finite (and below `limit` in magnitude)."""
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise InputError(
            f"boundary tensor has NaN or inf values, which the lossy codec {codec.name!r} "
            "cannot represent; send it with codec 'raw' (or 'raw+zstd'), or make the "
            "activations finite first")
    peak = max(-float(np.min(lo)), float(np.max(hi)))
    if limit is not None and peak >= limit:
        raise InputError(f"boundary tensor has values up to {peak:g} in magnitude, beyond "
                         f"the range of codec {codec.name!r}; {fix}")


def _f32_to_f16_bits(x: np.ndarray, out16: np.ndarray, m, f, s) -> float:
    """float16 bits of float32 `x` into `out16`, rounded to nearest even: the same bits as
    x.astype(np.float16) for finite |x| < 65520, about twice as fast. m, f, s: uint32 /
    float32 / uint32 scratch. Returns 4 * max|x| (NaN if x has NaN) for the range check.

    Branch-free (after Maratyszcza's FP16 library): adding |x| * 4 to the power of two
    2^(e+15) (e: x's exponent, at least fp16's -14) makes the float adder round |x| at fp16's
    last mantissa bit, subnormals included. The sum's mantissa is then fp16's 1.mmm bits
    and its exponent's low 5 bits count from fp16's exponent - 1, so sum + (sum >> 13)
    holds the fp16 magnitude in its low 16 bits; the cast to uint16 drops the rest.
    """
    u = x.view(np.uint32)
    np.bitwise_and(u, 0x7F800000, out=m)
    np.maximum(m, 0x38800000, out=m)  # fp16 subnormals all round at 2^-24
    np.add(m, 0x07800000, out=m)
    np.abs(x, out=f)
    np.multiply(f, np.float32(4.0), out=f)
    top = f.max()
    np.add(f, m.view(np.float32), out=f)
    fu = f.view(np.uint32)
    np.right_shift(fu, 13, out=m)
    np.add(fu, m, out=fu)
    np.right_shift(u, 16, out=s)
    np.bitwise_and(s, 0x8000, out=s)
    np.bitwise_or(fu, s, out=fu)
    out16[...] = fu
    return top


def _f16_bits_to_f32(h16: np.ndarray, out: np.ndarray, s) -> None:
    """float32 values of float16 bits `h16` (finite) into `out`; s: uint32 scratch.

    The fp16 exponent/mantissa bits moved to float32's positions make a float32 2^112 times
    too small (fp16 subnormals become float32 subnormals), so one multiply finishes it.
    """
    t = out.view(np.uint32)
    t[...] = h16
    np.bitwise_and(t, 0x8000, out=s)
    np.bitwise_xor(t, s, out=t)
    np.left_shift(t, 13, out=t)
    np.left_shift(s, 16, out=s)
    np.bitwise_or(t, s, out=t)
    np.multiply(out, np.float32(2.0 ** 112), out=out)


def _encode_fp16(x: np.ndarray, codec: Codec) -> np.ndarray:
    flat = x.reshape(-1)
    n = flat.size
    out = _scratch("body", 2 * n).view("<u2")
    if x.dtype != np.float32 or sys.byteorder != "little":
        _check_range(x.min(), x.max(), codec, _FP16_OVERFLOW, _FP16_FIX)
        out.view("<f2")[...] = flat  # numpy's own cast (float64: one rounding, not two)
        return out.view(np.uint8)
    k = min(n, _CHUNK)
    m, f, s = np.empty(k, np.uint32), np.empty(k, np.float32), np.empty(k, np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range input raises below
        for _, _, c0, c1 in _blocks(1, n):
            j = c1 - c0
            top = _f32_to_f16_bits(flat[c0:c1], out[c0:c1], m[:j], f[:j], s[:j])
            if not top < 4 * _FP16_OVERFLOW:  # NaN compares False too
                _check_range(x.min(), x.max(), codec, _FP16_OVERFLOW, _FP16_FIX)
    return out.view(np.uint8)


def _encode_bf16(x: np.ndarray, codec: Codec) -> np.ndarray:
    _check_range(x.min(), x.max(), codec, _BF16_OVERFLOW, "use 'raw'")
    flat = x.reshape(-1)
    n = flat.size
    out = _scratch("body", 2 * n).view("<u2")
    t = np.empty(min(n, _CHUNK), np.uint32)
    f32 = np.empty(min(n, _CHUNK), np.float32) if x.dtype != np.float32 else None
    for _, _, s, e in _blocks(1, n):
        m = e - s
        if f32 is None:
            u = flat[s:e].view(np.uint32)
        else:
            f32[:m] = flat[s:e]
            u = f32[:m].view(np.uint32)
        tb = t[:m]
        # round to nearest even on the upper 16 bits: add 0x7FFF + (bit 16), keep the top
        np.right_shift(u, 16, out=tb)
        np.bitwise_and(tb, 1, out=tb)
        np.add(tb, 0x7FFF, out=tb)
        np.add(tb, u, out=tb)
        np.right_shift(tb, 16, out=tb)
        out[s:e] = tb
    return out.view(np.uint8)


def _affine_params(x: np.ndarray, base: str, codec: Codec, layout):
    """(lo, scale, inv, sdtype, work dtype) per parameter entry, as 1-D arrays."""
    _, rows, cols, mode, nch = layout
    if mode == "tensor":
        lo, hi = x.min(keepdims=True).reshape(1), x.max(keepdims=True).reshape(1)
    elif mode == "col":
        x2 = x.reshape(rows, cols)
        lo, hi = x2.min(axis=0), x2.max(axis=0)
    else:
        x3 = x.reshape(rows // nch, nch, cols)
        lo, hi = x3.min(axis=(0, 2)), x3.max(axis=(0, 2))
    _check_range(lo, hi, codec)
    sdtype = np.dtype(np.float64 if x.dtype == np.float64 else np.float32)
    with np.errstate(over="ignore"):
        span = hi.astype(np.float64) - lo.astype(np.float64)
    if not np.isfinite(span).all():
        raise InputError(
            f"boundary tensor's value range ({float(lo.min()):g} .. {float(hi.max()):g}) "
            f"overflows float64, so codec {codec.name!r} cannot scale it; send it with 'raw'")
    levels = _LEVELS[base]
    scale = (span / levels).astype(sdtype)
    # round the stored scale up, never down: then (x - lo) / scale <= levels, so the codes
    # stay in [0, levels] without a clip (also where scale is a subnormal with few bits)
    short = scale.astype(np.float64) * levels < span
    if short.any():
        scale = np.where(short, np.nextafter(scale, sdtype.type(np.inf)), scale)
    scale64 = scale.astype(np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(scale64 > 0, 1.0 / np.where(scale64 > 0, scale64, 1.0), 0.0)
    if not np.isfinite(inv).all():  # float64 range below ~1e-306: send the minimum
        scale = np.where(np.isfinite(inv), scale, 0).astype(sdtype)
        inv = np.where(np.isfinite(inv), inv, 0.0)
    # float32 arithmetic unless the range or 1/scale would overflow it
    work = sdtype
    if work == np.float32 and (span.max() > _F32_MAX or inv.max() > _F32_MAX):
        work = np.dtype(np.float64)
    return lo.astype(sdtype), scale, inv.astype(work), sdtype, work


def _encode_affine(x: np.ndarray, base: str, codec: Codec):
    """Quantize to uint8 codes in [0, levels], int4/int2 packed: (body, axis, nscale, sdtype)."""
    layout = _channel_layout(x.shape, base)
    axis, rows, cols, mode, nch = layout
    n = x.size
    per_byte = _PER_BYTE[base]
    if n == 0:
        return np.empty(0, np.uint8), axis, 0, None
    lo, scale, inv, sdtype, work = _affine_params(x, base, codec, layout)
    nscale = lo.size
    pbytes = 2 * nscale * sdtype.itemsize
    body = _scratch("body", pbytes + -(-n // per_byte))
    body[:pbytes // 2] = scale.astype(sdtype.newbyteorder("<")).view(np.uint8)
    body[pbytes // 2:pbytes] = lo.astype(sdtype.newbyteorder("<")).view(np.uint8)
    data = body[pbytes:]

    lo_w, inv_w = lo.astype(work), inv
    if mode == "row":  # one entry per (n, c) row
        nbatch = rows // nch
        lo_w, inv_w = np.tile(lo_w, nbatch), np.tile(inv_w, nbatch)
    x2 = x.reshape(rows, cols)
    q2 = data.reshape(rows, cols) if per_byte == 1 else None
    buf = np.empty(min(n, _CHUNK) if cols <= _CHUNK else _CHUNK, work)
    if per_byte > 1:
        qbuf = np.zeros(_CHUNK, np.uint8)  # _CHUNK is a multiple of 4: chunks pack whole bytes
        t16 = np.empty(_CHUNK // 2, "<u2")
        t32, w32 = np.empty(_CHUNK // 4, "<u4"), np.empty(_CHUNK // 4, "<u4")
    for r0, r1, c0, c1 in _blocks(rows, cols):
        xb = x2[r0:r1, c0:c1]
        b = buf[:xb.size].reshape(xb.shape)
        np.subtract(xb, _param_view(lo_w, mode, r0, r1, c0, c1), out=b)
        np.multiply(b, _param_view(inv_w, mode, r0, r1, c0, c1), out=b)
        # x in [lo, hi] gives b in [0, levels * (1 + 4 eps)]: rint stays in [0, levels]
        np.rint(b, out=b)
        if per_byte == 1:
            q2[r0:r1, c0:c1] = b
            continue
        m = c1 - c0  # per-tensor: rows == 1, the block is the flat range c0:c1
        q = qbuf[:-(-m // per_byte) * per_byte]
        q[:m] = b.reshape(-1)
        q[m:] = 0
        if per_byte == 2:  # bytes (lo, hi) as one <u2 word: lo | hi << 4 in the low byte
            v = q.view("<u2")
            t = t16[:v.size]
            np.right_shift(v, 4, out=t)
            np.bitwise_or(t, v, out=t)
        else:  # four codes a, b, c, d in one <u4 word -> a | b << 2 | c << 4 | d << 6
            v = q.view("<u4")
            t, w = t32[:v.size], w32[:v.size]
            np.right_shift(v, 6, out=t)
            np.bitwise_or(t, v, out=t)
            np.right_shift(t, 12, out=w)
            np.bitwise_or(t, w, out=t)
        data[c0 // per_byte:c0 // per_byte + t.size] = t  # keeps the low byte of each word
    return body, axis, nscale, sdtype.name


def _row_layout(shape: tuple[int, ...]) -> tuple[int | None, int, int]:
    """int8-row's view of a tensor: (axis, rows, cols), one scale per row of the last axis."""
    if len(shape) == 0:
        return None, 1, 1
    cols = shape[-1]
    return len(shape) - 1, (math.prod(shape) // cols if cols else 0), cols


def _row_scales(x2: np.ndarray, codec: Codec, buf: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """Per-row scales max|x_r| / 127, rounded up into the narrowest dtype that holds them."""
    amax = np.zeros(x2.shape[0], buf.dtype)
    for r0, r1, c0, c1 in _blocks(*x2.shape):  # |x| through an L2-sized buffer, one pass
        b = buf[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        np.abs(x2[r0:r1, c0:c1], out=b)
        np.maximum(amax[r0:r1], b.max(axis=1), out=amax[r0:r1])
    _check_range(amax, amax, codec)  # NaN propagates through max; inf stays inf
    wanted = amax.astype(np.float64) / _ROW_LEVELS
    if x2.dtype == np.float64:
        sdtype = np.dtype(np.float64)
    else:
        sdtype = np.dtype(np.float16 if wanted.max(initial=0.0) <= 65504.0 else np.float32)
    scale = wanted.astype(sdtype)
    short = scale.astype(np.float64) < wanted  # round up: codes then need no clip
    if short.any():
        scale = np.where(short, np.nextafter(scale, sdtype.type(np.inf)), scale)
    return scale, sdtype


def _encode_row(x: np.ndarray, codec: Codec):
    """Symmetric int8 codes with one scale per last-axis row: (body, axis, nscale, sdtype)."""
    axis, rows, cols = _row_layout(x.shape)
    x2 = x.reshape(rows, cols)
    work = np.dtype(np.float64 if x.dtype == np.float64 else np.float32)
    buf = np.empty(min(x.size, _CHUNK) if cols <= _CHUNK else _CHUNK, work)
    scale, sdtype = _row_scales(x2, codec, buf)
    scale64 = scale.astype(np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(scale64 > 0, 1.0 / np.where(scale64 > 0, scale64, 1.0), 0.0)
    if not np.isfinite(inv.astype(work)).all():  # a float64 scale below ~1e-308: send zeros
        scale, inv = np.where(np.isfinite(inv), scale, 0).astype(sdtype), np.nan_to_num(inv, posinf=0.0)
    inv = inv.astype(work)
    pbytes = rows * sdtype.itemsize
    body = _scratch("body", pbytes + x.size)
    body[:pbytes] = scale.astype(sdtype.newbyteorder("<")).view(np.uint8)
    q2 = body[pbytes:].view(np.int8).reshape(rows, cols)
    for r0, r1, c0, c1 in _blocks(rows, cols):
        xb = x2[r0:r1, c0:c1]
        b = buf[:xb.size].reshape(xb.shape)
        np.multiply(xb, inv[r0:r1, None], out=b)
        np.rint(b, out=b)  # |x| <= 127 s: b in [-127 (1 + eps), 127 (1 + eps)], rint stays inside
        q2[r0:r1, c0:c1] = b
    return body, axis, rows, sdtype.name


def _decode_row(body, dtype, shape, sdtype):
    _, rows, cols = _row_layout(shape)
    scale = np.frombuffer(body, sdtype, rows, 0)
    codes = np.frombuffer(body, np.int8, rows * cols, rows * sdtype.itemsize).reshape(rows, cols)
    if not np.isfinite(scale).all():
        raise _corrupt("non-finite scale")
    work = np.dtype(np.float64 if sdtype == np.float64 else np.float32)
    scale = scale.astype(work)
    out = np.empty(shape, dtype)
    out2 = out.reshape(rows, cols)
    direct = dtype == work
    buf = None if direct else np.empty(min(rows * cols, _CHUNK) if cols <= _CHUNK else _CHUNK, work)
    for r0, r1, c0, c1 in _blocks(rows, cols):
        ob = out2[r0:r1, c0:c1]
        b = ob if direct else buf[:ob.size].reshape(ob.shape)
        np.multiply(codes[r0:r1, c0:c1], scale[r0:r1, None], out=b)
        if not direct:
            ob[...] = b
    return out


def _unsigned(dtype: np.dtype) -> np.dtype:
    """The unsigned integer type of `dtype`'s width, little-endian (bool: uint8)."""
    return np.dtype(f"<u{dtype.itemsize}")


def _encode_pack(arr: np.ndarray) -> np.ndarray:
    """Exact bit-packing of an int/bool tensor: [bits][min][(x - min) in `bits` bits each]."""
    x = np.ascontiguousarray(arr).reshape(-1)
    x = x.astype(x.dtype.newbyteorder("<"), copy=False)
    lo = x.min() if x.size else x.dtype.type(0)
    span = int(x.max()) - int(lo) if x.size else 0
    bits = next(b for b in _PACK_BITS if span < 1 << b)
    head = np.empty(1 + x.dtype.itemsize, np.uint8)
    head[0] = bits
    head[1:] = np.array(lo, x.dtype).reshape(1).view(np.uint8)
    if bits == 0:
        return head
    # x - min in the unsigned type of x's width: exact, because 0 <= x - min < 2^bits
    codes = x.view(_unsigned(x.dtype)) - np.array(lo, x.dtype).view(_unsigned(x.dtype))
    if bits >= 8:
        data = codes.astype(f"<u{bits // 8}").view(np.uint8)
    else:  # low bits first, as int4/int2 pack their codes
        planes = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")
        data = np.packbits(planes[:, :bits], bitorder="little")
    return np.concatenate([head, data])


def _decode_pack(body, dtype: np.dtype, shape: tuple[int, ...], n: int) -> np.ndarray:
    """Undo `_encode_pack`; lengths and bool values checked (ArtifactError)."""
    size = 1 + dtype.itemsize
    if len(body) < size or body[0] not in _PACK_BITS or body[0] > 8 * dtype.itemsize:
        raise _corrupt("pack: bad bit width")
    bits = int(body[0])
    if len(body) != size + -(-n * bits // 8):
        raise _corrupt(f"pack: {len(body)} body bytes, {n} values of {bits} bits need "
                       f"{size + -(-n * bits // 8)}")
    native = dtype.newbyteorder("<")
    lo = np.frombuffer(body, native, 1, 1).view(_unsigned(dtype))
    if bits == 0:
        codes = np.zeros(n, np.uint8)
    elif bits >= 8:
        codes = np.frombuffer(body, f"<u{bits // 8}", n, size)
    else:
        planes = np.unpackbits(np.frombuffer(body, np.uint8, offset=size), bitorder="little",
                               count=n * bits).reshape(n, bits)
        codes = np.packbits(planes, axis=1, bitorder="little").reshape(n)
    out = (codes.astype(_unsigned(dtype)) + lo).view(native)
    if dtype.kind == "b" and n and out.view(np.uint8).max() > 1:
        raise _corrupt("pack: a bool value other than 0 or 1")
    return out.astype(dtype, copy=False).reshape(shape)


def encode(array: np.ndarray, codec: str | Codec) -> bytes:
    """`array` in the wire format of `codec` (a name like "int8+zstd", or a Codec).

    Lossy codecs need a float16/32/64 array with finite values (else InputError); other
    dtypes are sent raw. See the module docstring for the format and the error bounds.
    """
    codec = parse_codec(codec)
    arr = _as_array(array)
    base = codec.base
    if base != "raw" and arr.dtype.newbyteorder("=") not in _FLOATS:
        # ids, masks, ...: exact is the only sensible wire format, as few bits as they need
        base = "pack" if arr.dtype.kind in _PACKED_KINDS else "raw"
    if base == "raw":
        return _finish("raw", codec.lossless, arr, None, 0, None, _raw_body(arr))
    if base == "pack":
        return _finish("pack", codec.lossless, arr, None, 0, None, _encode_pack(arr))
    x = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
    x = np.ascontiguousarray(x).reshape(arr.shape)  # (ascontiguousarray makes 0-d 1-d)
    if x.size == 0:
        body, axis, nscale, sdtype = np.empty(0, np.uint8), None, 0, None
        if base == "int8-channel":
            axis = _channel_layout(x.shape, base)[0]
        elif base == "int8-row":
            axis = _row_layout(x.shape)[0]
    elif base == "int8-row":
        body, axis, nscale, sdtype = _encode_row(x, codec)
    elif base == "fp16":
        body, axis, nscale, sdtype = _encode_fp16(x, codec), None, 0, None
    elif base == "bf16":
        body, axis, nscale, sdtype = _encode_bf16(x, codec), None, 0, None
    else:
        body, axis, nscale, sdtype = _encode_affine(x, base, codec)
    return _finish(base, codec.lossless, arr, axis, nscale, sdtype, body)


# --------------------------------------------------------------------------- decode


def _read_header(mv: memoryview) -> tuple[dict, int]:
    if len(mv) < _PREFIX.size:
        raise _corrupt(f"{len(mv)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, hlen = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        raise _corrupt(f"magic is {bytes(magic)!r}, expected {MAGIC!r}")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(mv):
        raise _corrupt(f"header length {hlen} does not fit the {len(mv)}-byte payload")
    try:
        header = json.loads(bytes(mv[_PREFIX.size:_PREFIX.size + hlen]).decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _corrupt("header is not valid JSON") from None
    if not isinstance(header, dict) or set(header) != set(_HEADER_KEYS):
        raise _corrupt(f"header keys are not {', '.join(_HEADER_KEYS)}")
    return header, _PREFIX.size + hlen


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(h: dict, stored: int):
    """Validate every field against the others; returns (dtype, shape, n, sdtype)."""
    base = h["codec"]
    if base not in CODECS and base != "pack":
        raise _corrupt(f"unknown codec {base!r} in the header")
    if h["lossless"] is not None and h["lossless"] not in LOSSLESS:
        raise _corrupt(f"unknown lossless stage {h['lossless']!r} in the header")
    shape = h["shape"]
    if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise _corrupt(f"bad shape {shape!r} in the header")
    shape = tuple(shape)
    try:
        if not isinstance(h["dtype"], str):
            raise TypeError
        dtype = _parse_dtype(h["dtype"])
    except (TypeError, ValueError, SyntaxError):  # what numpy's parser raises on garbage
        raise _corrupt(f"bad dtype {h['dtype']!r} in the header") from None
    if (dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None
            or dtype.itemsize == 0 or _dtype_tag(dtype) != h["dtype"]):
        raise _corrupt(f"dtype {h['dtype']!r} is not one encode() writes")
    if base == "pack" and dtype.kind not in _PACKED_KINDS:
        raise _corrupt(f"codec 'pack' with dtype {dtype}, which is not bool or integer")
    if base not in ("raw", "pack") and dtype.newbyteorder("=") not in _FLOATS:
        raise _corrupt(f"codec {base!r} with non-float dtype {dtype}")
    n = math.prod(shape)
    wide = dtype.newbyteorder("=") == np.float64
    if base == "int8-row":
        axis, nscale, _ = _row_layout(shape)
        nscale = nscale if n else 0
        sdtypes = {None} if not nscale else {"float64"} if wide else {"float16", "float32"}
    else:
        axis, _, _, _, nch = _channel_layout(shape, base)
        nscale = 0 if base in ("raw", "pack", "fp16", "bf16") or n == 0 else nch
        sdtypes = {None} if not nscale else {"float64" if wide else "float32"}
    sdtype = h["sdtype"] if isinstance(h["sdtype"], str) else None
    if h["axis"] != axis or h["nscale"] != nscale or h["sdtype"] not in sdtypes:
        raise _corrupt(f"axis/nscale/sdtype {h['axis']!r}/{h['nscale']!r}/{h['sdtype']!r} "
                       f"do not match codec {base!r} for shape {list(shape)}")
    if base == "raw":
        rawbytes = n * dtype.itemsize
    elif base == "pack":  # the bit width is in the body: bounded here, exact in _decode_pack
        rawbytes = h["rawbytes"] if _is_int(h["rawbytes"]) and (
            1 + dtype.itemsize <= h["rawbytes"] <= 1 + dtype.itemsize * (n + 1)) else -1
    elif base in ("fp16", "bf16"):
        rawbytes = 2 * n
    elif base == "int8-row":
        rawbytes = nscale * (np.dtype(sdtype).itemsize if sdtype else 0) + n
    else:
        rawbytes = (2 * nscale * (8 if sdtype == "float64" else 4)
                    + -(-n // _PER_BYTE[base]))
    if h["rawbytes"] != rawbytes:
        raise _corrupt(f"header says {h['rawbytes']!r} body bytes, "
                       f"a {base} {dtype} {list(shape)} tensor needs {rawbytes}")
    if h["nbytes"] != stored or (h["lossless"] is None and stored != rawbytes):
        raise _corrupt(f"header says {h['nbytes']!r} stored bytes, {stored} follow it")
    return dtype, shape, n, (np.dtype(sdtype).newbyteorder("<") if sdtype else None)


def _decode_affine(body, base, dtype, shape, n, sdtype):
    layout = _channel_layout(shape, base)
    _, rows, cols, mode, nch = layout
    per_byte = _PER_BYTE[base]
    nscale = nch
    scale = np.frombuffer(body, sdtype, nscale, 0)
    lo = np.frombuffer(body, sdtype, nscale, nscale * sdtype.itemsize)
    data = np.frombuffer(body, np.uint8, -(-n // per_byte), 2 * nscale * sdtype.itemsize)
    if not (np.isfinite(scale).all() and np.isfinite(lo).all()):
        raise _corrupt("non-finite scale or zero point")
    top = float(scale.max()) * _LEVELS[base] + float(np.abs(lo).max())
    wide = sdtype == np.float64 or top > _F32_MAX
    work = np.dtype(np.float64 if wide else np.float32)  # float64 where float32 would overflow
    scale, lo = scale.astype(work), lo.astype(work)
    if mode == "row":
        scale, lo = np.tile(scale, rows // nch), np.tile(lo, rows // nch)
    out = np.empty(shape, dtype)
    out2 = out.reshape(rows, cols)
    direct = dtype == work
    buf = None if direct else np.empty(min(n, _CHUNK) if cols <= _CHUNK else _CHUNK, work)
    q2 = data.reshape(rows, cols) if per_byte == 1 else None
    if per_byte > 1:
        t16, tmp16 = np.empty(_CHUNK // 2, "<u2"), np.empty(_CHUNK // 2, "<u2")
        t32, tmp = np.empty(_CHUNK // 4, "<u4"), np.empty(_CHUNK // 4, "<u4")
    for r0, r1, c0, c1 in _blocks(rows, cols):
        if per_byte == 1:
            qb = q2[r0:r1, c0:c1]
        else:
            m = c1 - c0
            packed = data[c0 // per_byte:c0 // per_byte + -(-m // per_byte)]
            if per_byte == 2:  # byte hl -> <u2 word 0x0h0l -> bytes (l, h)
                t = t16[:packed.size]
                t[:] = packed
                u = tmp16[:packed.size]
                np.left_shift(t, 4, out=u)
                np.bitwise_or(t, u, out=t)
                np.bitwise_and(t, 0x0F0F, out=t)
            else:  # byte dcba (2 bits each) -> <u4 word 0x0d0c0b0a -> bytes (a, b, c, d)
                t = t32[:packed.size]
                t[:] = packed
                u = tmp[:packed.size]
                np.left_shift(t, 12, out=u)
                np.bitwise_or(t, u, out=t)
                np.left_shift(t, 6, out=u)
                np.bitwise_or(t, u, out=t)
                np.bitwise_and(t, 0x03030303, out=t)
            qb = t.view(np.uint8)[:m].reshape(1, m)
        ob = out2[r0:r1, c0:c1]
        b = ob if direct else buf[:ob.size].reshape(ob.shape)
        np.multiply(qb, _param_view(scale, mode, r0, r1, c0, c1), out=b)
        np.add(b, _param_view(lo, mode, r0, r1, c0, c1), out=b)
        if not direct:
            ob[...] = b
    return out


def decode(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """The array `encode` was given (exactly for raw, within the codec's bound otherwise),
    as a new writable array with the original dtype and shape. Garbage raises ArtifactError."""
    try:
        mv = memoryview(payload).cast("B")
    except TypeError:
        raise InputError(
            f"decode() takes the bytes that encode() produced, got {type(payload).__name__}; "
            "pass the received message as bytes, bytearray or memoryview") from None
    header, start = _read_header(mv)
    dtype, shape, n, sdtype = _check_header(header, len(mv) - start)
    base = header["codec"]
    body = mv[start:]
    if base == "raw":
        if header["lossless"] == "zstd":
            out = np.empty(shape, dtype)
            _unpack_lossless(body, out.reshape(-1).view(np.uint8), _plane_width(base, dtype))
            return out
        return np.frombuffer(body, dtype, n).reshape(shape).copy()
    if header["lossless"] == "zstd":
        plain = np.empty(header["rawbytes"], np.uint8)
        _unpack_lossless(body, plain, _plane_width(base, dtype))
        body = plain
    if base == "pack":
        return _decode_pack(body, dtype, shape, n)
    if n == 0:
        return np.zeros(shape, dtype)
    if base == "fp16":
        out = np.empty(shape, dtype)
        flat = out.reshape(-1)
        if dtype != np.float32 or sys.byteorder != "little":
            flat[...] = np.frombuffer(body, "<f2", n)
            return out
        h16 = np.frombuffer(body, "<u2", n)
        s = np.empty(min(n, _CHUNK), np.uint32)
        for _, _, c0, c1 in _blocks(1, n):
            _f16_bits_to_f32(h16[c0:c1], flat[c0:c1], s[:c1 - c0])
        return out
    if base == "bf16":
        u16 = np.frombuffer(body, "<u2", n)
        out = np.empty(shape, dtype)
        flat = out.reshape(-1)
        if dtype == np.float32 and sys.byteorder == "little":
            np.left_shift(u16, np.uint32(16), out=flat.view(np.uint32))
            return out
        t = np.empty(min(n, _CHUNK), np.uint32)
        for _, _, s, e in _blocks(1, n):
            tb = t[:e - s]
            np.left_shift(u16[s:e], np.uint32(16), out=tb)
            flat[s:e] = tb.view(np.float32)
        return out
    if base == "int8-row":
        return _decode_row(body, dtype, shape, sdtype)
    return _decode_affine(body, base, dtype, shape, n, sdtype)
