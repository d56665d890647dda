"""The worker protocol: message framing, the gRPC methods, the client, and error naming.

Service `edgeplan.Worker` (gRPC generic handlers, no protoc; every message is bytes):

    method     kind            request                        response
    Health     unary-unary     {}                             {edgeplan, protocol, deployment, device, stages, pid}
    Upload     stream-unary    {deployment, name, sha256,     {name, nbytes}
                               nbytes}, then raw chunks
    Configure  unary-unary     {deployment, device, stages,   {stages, providers}
                               hops} + blob manifest.json
    Forward    unary-unary     {deployment, run, seq, stage}  {busy: {stage: seconds}}
                               + one blob per tensor
    Collect    unary-stream    {deployment, run}              {ready}, then {seq} + blobs per output

Framing of one message (integers little-endian):

    b"EPW1" | uint32 header length | header: compact JSON | blob 0 | blob 1 | ...
    header = {"meta": {...}, "blobs": [[name, nbytes], ...]}

Tensors travel as blobs holding runtime/codecs.py payloads (EPC1): a boundary's codec
output as the stage step produced it, and arrays in codec "raw" (bit-exact, any dtype).
Upload chunks after the first message are raw bytes, not framed.

Auth: every call carries `authorization: Bearer <token>` (the fleet's shared token, read
from a file); a worker refuses any call without it. With `Tls` files (mTLS), the traffic is
also encrypted, a worker accepts only clients with a certificate signed by the fleet's CA,
and clients check the worker's certificate against the CA and the address's host. Errors a worker raises itself carry
the trailing metadata key `edgeplan-origin` (the device that failed), so a caller can tell
"the worker I called reported this" (relay the message) from "I could not reach the worker"
(name it). UNAVAILABLE and DEADLINE_EXCEEDED are transient (retried by the driver); every
other code is final.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeplan.errors import RemoteError
from edgeplan.runtime.codecs import encode

SERVICE = "edgeplan.Worker"
PROTOCOL_VERSION = 1
TOKEN_KEY = "authorization"
ORIGIN_KEY = "edgeplan-origin"
MIN_TOKEN_CHARS = 16
CHUNK_BYTES = 1 << 20
MAGIC = b"EPW1"
_PREFIX = struct.Struct("<4sI")
# Activations can be large; gRPC's 4 MB default would refuse them.
MAX_MESSAGE_BYTES = (1 << 31) - 1
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted worker is reachable again within a second, not after gRPC's 2-minute cap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A new client connects afresh instead of sharing a connection stuck in backoff with an
    # older client of the same address (gRPC's process-wide subchannel pool).
    ("grpc.use_local_subchannel_pool", 1),
)
HEALTH_TIMEOUT_S = 5.0


def import_grpc():
    """The grpc module, or a RemoteError that says how to install it."""
    try:
        import grpc
    except ImportError:
        raise RemoteError("grpcio is not installed; remote runs need it: pip install 'edgeplan[remote]' "
                          "(or pip install grpcio)") from None
    return grpc


grpc = import_grpc()
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def pack(meta: Mapping, blobs: Mapping[str, bytes] | None = None) -> bytes:
    """One framed message: JSON `meta` plus named byte blobs."""
    blobs = blobs or {}
    header = json.dumps({"meta": meta, "blobs": [[name, len(blob)] for name, blob in blobs.items()]},
                        separators=(",", ":")).encode()
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *blobs.values()])


def unpack(data: bytes) -> tuple[dict, dict[str, memoryview]]:
    """(meta, blobs) of a framed message; blobs are views into `data` (no copies)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise RemoteError(f"corrupt message: {len(view)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, header_length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise RemoteError(f"corrupt message: magic {bytes(magic)!r}, expected {MAGIC!r} (not an edgeplan peer?)")
    start = _PREFIX.size + header_length
    try:
        header = json.loads(bytes(view[_PREFIX.size:start]))
        meta, layout = header["meta"], header["blobs"]
        sizes = [int(size) for _, size in layout]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"corrupt message header ({exc.__class__.__name__}: {exc})") from None
    if start + sum(sizes) != len(view) or min(sizes, default=0) < 0:
        raise RemoteError(f"corrupt message: header announces {start + sum(sizes)} bytes, got {len(view)}")
    blobs = {}
    for (name, _), size in zip(layout, sizes):
        blobs[name] = view[start:start + size]
        start += size
    return meta, blobs


def tensor_blobs(tensors: Mapping[str, np.ndarray | bytes]) -> dict[str, bytes]:
    """Blobs for a tensor dict: encoded payloads pass through, arrays go as codec "raw"."""
    return {name: value if isinstance(value, bytes) else encode(value, "raw")
            for name, value in tensors.items()}


def read_token(path: str | Path) -> str:
    """The shared fleet token from `path` (surrounding whitespace ignored)."""
    path = Path(path)
    fix = (f"write a random token into it, e.g. python -c \"import secrets; print(secrets.token_hex(32))\" "
           f"> {path}, and give the same file to every worker and to the driver")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise RemoteError(f"token file {path}: cannot read it ({exc.strerror}); {fix}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise RemoteError(f"token file {path}: the token has {len(token)} characters, at least "
                          f"{MIN_TOKEN_CHARS} are needed; {fix}")
    return token


@dataclass(frozen=True)
class Tls:
    """mTLS files (PEM): the fleet's CA certificate, and this node's certificate and key.

    Node certificates are signed by the CA and name the host a worker is reached at in
    subjectAltName (IP:10.0.0.5 or DNS:pi-a.local). Workers and the driver use the same
    kind of files; a worker also presents its own when it calls the next worker.
    """

    ca: str
    cert: str
    key: str

    @classmethod
    def from_paths(cls, ca=None, cert=None, key=None) -> "Tls | None":
        """None when no file is given; all three or none."""
        given = {"ca": ca, "cert": cert, "key": key}
        if not any(given.values()):
            return None
        missing = [f"--tls-{name}" for name, value in given.items() if not value]
        if missing:
            raise RemoteError(f"mTLS needs --tls-ca, --tls-cert and --tls-key together; missing {', '.join(missing)}")
        return cls(*(str(Path(value).resolve()) for value in given.values()))

    def _read(self) -> tuple[bytes, bytes, bytes]:
        contents = []
        for name in ("ca", "cert", "key"):
            path = Path(getattr(self, name))
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise RemoteError(f"TLS {name} file {path}: cannot read it ({exc.strerror})") from None
            if b"-----BEGIN" not in data:
                raise RemoteError(f"TLS {name} file {path}: not a PEM file (no -----BEGIN line)")
            contents.append(data)
        return tuple(contents)

    def channel_credentials(self):
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def server_credentials(self):
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rpc_failure(exc: grpc.RpcError, device: str, address: str) -> tuple[str, bool]:
    """(message naming who failed, transient?) for an error from a call to `device`."""
    code, details = exc.code(), (exc.details() or "").strip()
    if any(key == ORIGIN_KEY for key, _ in (exc.trailing_metadata() or ())):
        return details, code in TRANSIENT  # the worker (or one after it) said what went wrong
    where = f"device {device!r} at {address}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"{where} is unreachable ({details.splitlines()[0] if details else 'no detail'}); "
                f"is `edgeplan worker` running there, with the same --tls-* setting (files or none)?"), True
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{where} did not answer before the deadline (hung or overloaded?)", True
    return f"{where}: {code.name}: {details}", False


class WorkerClient:
    """Calls to one worker, with the token and a deadline on every call (over mTLS with `tls`)."""

    def __init__(self, address: str, token: str, device: str, tls: Tls | None = None):
        self.address, self.device = address, device
        self._metadata = ((TOKEN_KEY, f"Bearer {token}"),)
        self._channel = (grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
                         if tls else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        method = f"/{SERVICE}/"
        self._health = self._channel.unary_unary(method + "Health")
        self._upload = self._channel.stream_unary(method + "Upload")
        self._configure = self._channel.unary_unary(method + "Configure")
        self._forward = self._channel.unary_unary(method + "Forward")
        self._collect = self._channel.unary_stream(method + "Collect")

    def _call(self, what: str, stub, request, timeout: float) -> tuple[dict, dict]:
        try:
            return unpack(stub(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as exc:
            message, _ = rpc_failure(exc, self.device, self.address)
            raise RemoteError(f"{what}: {message}") from None

    def health(self, timeout: float = HEALTH_TIMEOUT_S) -> dict:
        return self._call("health check", self._health, pack({}), timeout)[0]

    def upload(self, deployment: str, name: str, sha256: str, path: Path, timeout: float) -> dict:
        """Stream the file at `path` as `name`; the worker checks its size and `sha256`."""
        nbytes = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            yield pack({"deployment": deployment, "name": name, "sha256": sha256, "nbytes": nbytes})
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    yield chunk

        return self._call(f"upload of {name}", self._upload, chunks(), timeout)[0]

    def configure(self, meta: dict, manifest_bytes: bytes, timeout: float) -> dict:
        return self._call("configure", self._configure, pack(meta, {"manifest": manifest_bytes}), timeout)[0]

    def forward(self, request: bytes, timeout: float):
        """Forward a framed microbatch; raises grpc.RpcError (callers name the hop)."""
        return self._forward(request, timeout=timeout, metadata=self._metadata)

    def forward_future(self, request: bytes, timeout: float):
        return self._forward.future(request, timeout=timeout, metadata=self._metadata)

    def collect(self, deployment: str, run: str, timeout: float):
        """The stream of a run's outputs (a call object: iterate it, cancel() it)."""
        return self._collect(pack({"deployment": deployment, "run": run}), timeout=timeout,
                             metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()
