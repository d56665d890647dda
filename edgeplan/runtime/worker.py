"""`edgeplan worker`: a gRPC server that runs the stages of one compiled model on one device.

    edgeplan worker --listen 0.0.0.0:7000 --token-file fleet.token [--dir DIR] [--threads N]
                    [--tls-ca ca.pem --tls-cert node.pem --tls-key node.key]

The driver (runtime/deploy.py) uploads the device's stage artifacts (streamed in 1 MB
chunks, size and sha256 checked, stored under DIR/<manifest sha256>/ by plain file name:
a name with a path in it is refused), then configures the worker: the manifest, which
stages it runs and the address of the worker that runs the next stage. The worker loads
each stage into ONNX Runtime and runs it with the same StageStep as the local pipeline
(decode what arrives, run, keep what later stages need, encode with the boundary codec),
so a remote run computes the same bytes as a local one.

Chain wiring: worker to worker. A `Forward(seq)` call runs this device's stage(s), then
calls `Forward` on the next worker with what remains of its own deadline (minus a margin,
so the failure nearest to the fault is reported first) and returns when the whole rest of
the chain has accepted the microbatch; the worker of the last stage puts the outputs on the
run's `Collect` stream, which the driver opened before sending. Each activation crosses
each link once (driver -> first worker -> ... -> last worker -> driver), and because the
calls nest, a dead or hung worker surfaces as an error on the call into it, which the
worker before it names (device, address) and passes back up to the driver. The driver
keeps several microbatches in flight, so stages overlap as in the local pipeline; one lock
per stage runs one microbatch at a time on it.

State: one deployment at a time. DIR/active.json records it, so a restarted worker (say
after a crash or reboot) reloads it, checking every artifact's sha256, and in-flight
microbatches the driver retries go through. Errors raised here carry the trailing metadata
`edgeplan-origin` (see runtime/wire.py). The worker imports numpy, onnxruntime, grpc and
edgeplan.runtime only (no torch).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import edgeplan
from edgeplan.errors import EdgeplanError, RemoteError
from edgeplan.runtime.manifest import MANIFEST_FILE, Manifest, read_manifest
from edgeplan.runtime.pipeline import StageStep
from edgeplan.runtime.session import open_session
from edgeplan.runtime.weights import WeightStore
from edgeplan.runtime.wire import (
    CHANNEL_OPTIONS,
    HEALTH_TIMEOUT_S,
    ORIGIN_KEY,
    PROTOCOL_VERSION,
    SERVICE,
    TOKEN_KEY,
    Tls,
    WorkerClient,
    grpc,
    pack,
    rpc_failure,
    sha256_bytes,
    tensor_blobs,
    unpack,
)

log = logging.getLogger("edgeplan.worker")

ACTIVE_FILE = "active.json"
DEFAULT_DEADLINE_S = 30.0
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_POLL_S = 0.25


class _Refused(Exception):
    """Abort the current call with this status code and message."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code


def _hop_budget(context) -> float:
    """Seconds to give the next hop: what is left of this call, minus a margin."""
    remaining = context.time_remaining()
    remaining = DEFAULT_DEADLINE_S if remaining is None else remaining
    return remaining - max(0.1 * remaining, 0.2)


@dataclass
class _Deployment:
    id: str  # the manifest's sha256
    manifest: Manifest
    device: str
    steps: dict[int, StageStep]
    hops: dict[int, WorkerClient]  # stage k -> the worker of stage k + 1 (when not here)
    locks: dict[int, threading.Lock]  # one microbatch at a time per stage

    @property
    def last_stage(self) -> int:
        return len(self.manifest.stages) - 1


class Worker:
    """The worker's state and its RPC methods (see runtime/wire.py for the messages)."""

    def __init__(self, directory: str | Path, token: str, threads: int = 0, tls: Tls | None = None):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.threads = threads
        self.tls = tls
        self._deployment: _Deployment | None = None
        self._configure_lock = threading.Lock()
        self._collectors: dict[str, queue.Queue] = {}
        self._collectors_lock = threading.Lock()
        self._restore()

    # --- plumbing --------------------------------------------------------------------------

    def _device(self) -> str:
        return self._deployment.device if self._deployment else "(unconfigured)"

    def _method(self, function, request_streaming: bool = False, response_streaming: bool = False):
        """An RPC handler: token check first, `_Refused`/EdgeplanError -> status + origin."""

        def refuse(context, code, message: str):
            context.set_trailing_metadata(((ORIGIN_KEY, self._device()),))
            context.abort(code, message)

        def authorized(context) -> bool:
            metadata = dict(context.invocation_metadata())
            given = metadata.get(TOKEN_KEY, "").removeprefix("Bearer ").encode()
            if hmac.compare_digest(given, self.token.encode()):
                return True
            log.warning("refused a call from %s: missing or wrong token", context.peer())
            refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                   f"worker of device {self._device()!r} refused the call: missing or wrong token; "
                   f"give the driver and every worker the same --token-file")
            return False

        def report(context, exc: Exception):
            if isinstance(exc, _Refused):
                refuse(context, exc.code, str(exc))
            elif isinstance(exc, EdgeplanError):
                refuse(context, grpc.StatusCode.INTERNAL, f"device {self._device()!r}: {exc}")
            else:  # a request that does not follow runtime/wire.py
                refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"device {self._device()!r}: malformed request ({exc.__class__.__name__}: {exc})")

        def handle(request, context):
            if not authorized(context):
                return None
            try:
                return function(request, context)
            except (_Refused, EdgeplanError, KeyError, ValueError, TypeError, StopIteration) as exc:
                report(context, exc)

        def handle_stream(request, context):
            if not authorized(context):
                return
            try:
                yield from function(request, context)
            except (_Refused, EdgeplanError, KeyError, ValueError, TypeError) as exc:
                report(context, exc)

        if response_streaming:
            return grpc.unary_stream_rpc_method_handler(handle_stream)
        if request_streaming:
            return grpc.stream_unary_rpc_method_handler(handle)
        return grpc.unary_unary_rpc_method_handler(handle)

    def handler(self):
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Health": self._method(self.health),
            "Upload": self._method(self.upload, request_streaming=True),
            "Configure": self._method(self.configure),
            "Forward": self._method(self.forward),
            "Collect": self._method(self.collect, response_streaming=True),
        })

    def _active(self, deployment: str) -> _Deployment:
        active = self._deployment
        if active is None or active.id != deployment:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"worker of device {self._device()!r} does not run deployment {deployment[:12]}... "
                           f"(it runs {active.id[:12] + '...' if active else 'nothing'}; restarted "
                           f"without its --dir, or deployed over?); run `edgeplan deploy` again")
        return active

    # --- methods ---------------------------------------------------------------------------

    def health(self, request: bytes, context) -> bytes:
        active = self._deployment
        return pack({"edgeplan": edgeplan.__version__, "protocol": PROTOCOL_VERSION,
                     "deployment": active.id if active else None,
                     "device": active.device if active else None,
                     "stages": sorted(active.steps) if active else [], "pid": os.getpid()})

    def upload(self, chunks, context) -> bytes:
        meta, _ = unpack(next(chunks))
        deployment, name = str(meta.get("deployment")), str(meta.get("name"))
        expected_sha, expected_bytes = meta.get("sha256"), int(meta.get("nbytes", -1))
        if not _SHA256.match(deployment) or not _PLAIN_NAME.match(name) or ".." in name:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"upload refused: {name!r} in deployment {deployment!r} is not a plain file "
                           f"name (no '/' or '..'; path traversal is refused)")
        folder = self.directory / deployment
        folder.mkdir(exist_ok=True)
        partial = folder / (name + ".part")
        digest, received = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as handle:
                for chunk in chunks:
                    received += len(chunk)
                    if received > expected_bytes:
                        raise _Refused(grpc.StatusCode.DATA_LOSS,
                                       f"upload of {name}: more than the announced {expected_bytes} bytes")
                    digest.update(chunk)
                    handle.write(chunk)
            if received != expected_bytes:
                raise _Refused(grpc.StatusCode.DATA_LOSS, f"upload of {name}: {expected_bytes - received} "
                                                          f"bytes short of the announced {expected_bytes}")
            if digest.hexdigest() != expected_sha:
                raise _Refused(grpc.StatusCode.DATA_LOSS,
                               f"upload of {name} to device {self._device()!r} is corrupt: sha256 "
                               f"{digest.hexdigest()[:12]}... but the manifest says {str(expected_sha)[:12]}...; "
                               f"recompile or copy the compile output again, then deploy")
            partial.replace(folder / name)
        finally:
            partial.unlink(missing_ok=True)
        log.info("stored %s (%d bytes) for deployment %s", name, received, deployment[:12])
        return pack({"name": name, "nbytes": received})

    def configure(self, request: bytes, context) -> bytes:
        meta, blobs = unpack(request)
        manifest_bytes = bytes(blobs["manifest"])
        deployment = sha256_bytes(manifest_bytes)
        if meta.get("deployment") != deployment:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"configure: manifest sha256 {deployment[:12]}... does not match the "
                           f"announced deployment {str(meta.get('deployment'))[:12]}...")
        folder = self.directory / deployment
        folder.mkdir(exist_ok=True)
        (folder / MANIFEST_FILE).write_bytes(manifest_bytes)
        config = {"deployment": deployment, "device": str(meta["device"]),
                  "stages": [int(k) for k in meta["stages"]], "hops": meta.get("hops", {})}
        with self._configure_lock:
            loaded = self._load(config, check_hops=True)
            (self.directory / ACTIVE_FILE).write_text(json.dumps(config))
            previous, self._deployment = self._deployment, loaded
            for other in self.directory.iterdir():
                if other.is_dir() and other.name != deployment and _SHA256.match(other.name):
                    shutil.rmtree(other, ignore_errors=True)
        if previous is not None:
            for client in previous.hops.values():
                client.close()
        log.info("configured deployment %s: device %s, stages %s", deployment[:12], loaded.device,
                 sorted(loaded.steps))
        return pack({"stages": sorted(loaded.steps),
                     "providers": {k: list(s.session.providers) for k, s in loaded.steps.items()}})

    def _load(self, config: dict, check_hops: bool) -> _Deployment:
        folder = self.directory / config["deployment"]
        manifest = read_manifest(folder, verify=False)
        count = len(manifest.stages)
        stages = sorted(set(config["stages"]))
        if not stages or not all(0 <= k < count for k in stages):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"configure: stages {stages} are not all in the manifest's 0..{count - 1}")
        steps = {}
        weights = WeightStore()  # this device's stages hold each distinct weight once
        weights.expect(folder, [manifest.stages[k] for k in stages])
        for k in stages:
            entry = manifest.stages[k]
            files = [entry.artifact.path] + ([entry.artifact.weights.path] if entry.artifact.weights else [])
            for name in files:
                if not _PLAIN_NAME.match(name):
                    raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"stage {k}: artifact path {name!r} is not a plain file name")
            steps[k] = StageStep(open_session(folder, entry, self.threads, weights), last=k == count - 1)
        hops = {}
        try:
            for k in stages:
                if k + 1 < count and k + 1 not in steps:
                    hop = config["hops"].get(str(k))
                    if not hop:
                        raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"configure: no address for the worker of stage {k + 1}")
                    hops[k] = WorkerClient(hop["address"], self.token, hop["device"], self.tls)
                    if check_hops:
                        self._check_hop(hops[k], config["deployment"], k + 1)
        except BaseException:
            for client in hops.values():
                client.close()
            raise
        return _Deployment(config["deployment"], manifest, config["device"], steps, hops,
                           {k: threading.Lock() for k in steps})

    @staticmethod
    def _check_hop(client: WorkerClient, deployment: str, stage: int) -> None:
        try:
            status = client.health(HEALTH_TIMEOUT_S)
        except RemoteError as exc:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the next hop (stage {stage}) cannot be reached from here: {exc}") from None
        if status["deployment"] != deployment or stage not in status["stages"]:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the next hop, device {client.device!r} at {client.address}, does not run "
                           f"stage {stage} of this deployment; configure the workers from the last stage back")

    def _restore(self) -> None:
        """Reload the deployment recorded in DIR/active.json (artifacts re-verified)."""
        path = self.directory / ACTIVE_FILE
        if not path.is_file():
            return
        try:
            self._deployment = self._load(json.loads(path.read_text()), check_hops=False)
        except (EdgeplanError, _Refused, ValueError, KeyError) as exc:
            log.warning("not restoring the deployment in %s: %s", path, exc)
            return
        log.info("restored deployment %s: device %s, stages %s", self._deployment.id[:12],
                 self._deployment.device, sorted(self._deployment.steps))

    def forward(self, request: bytes, context) -> bytes:
        meta, blobs = unpack(request)
        active = self._active(str(meta.get("deployment")))
        stage, busy = int(meta["stage"]), {}
        tensors = {name: bytes(blob) for name, blob in blobs.items()}
        while True:  # run consecutive stages hosted here without a network hop
            step = active.steps.get(stage)
            if step is None:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"device {active.device!r} does not run stage {stage}; deploy again")
            with active.locks[stage]:
                tick = time.perf_counter()
                tensors = step(tensors)
                busy[stage] = time.perf_counter() - tick
            if stage + 1 not in active.steps:
                break
            stage += 1
        message = pack({"deployment": active.id, "run": meta["run"], "seq": meta["seq"], "stage": stage + 1},
                       tensor_blobs(tensors))
        if stage == active.last_stage:
            with self._collectors_lock:
                outbox = self._collectors.get(meta["run"])
            if outbox is None:
                raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                               f"device {active.device!r}: no Collect stream is open for run {meta['run']}")
            outbox.put(message)
            return pack({"busy": busy})
        hop = active.hops[stage]
        budget = _hop_budget(context)
        if budget <= 0:
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"device {active.device!r}: no time left in the deadline to reach stage {stage + 1}")
        try:
            reply, _ = unpack(hop.forward(message, budget))
        except grpc.RpcError as exc:
            text, _ = rpc_failure(exc, hop.device, hop.address)
            if ORIGIN_KEY not in dict(exc.trailing_metadata() or ()):
                text = f"stage {stage + 1}: {text}"  # the hop itself failed: name it here
            context.set_trailing_metadata(((ORIGIN_KEY, hop.device),))
            context.abort(exc.code(), text)
        return pack({"busy": {**busy, **reply["busy"]}})

    def collect(self, request: bytes, context):
        meta, _ = unpack(request)
        active = self._active(str(meta.get("deployment")))
        if active.last_stage not in active.steps:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"device {active.device!r} does not run the last stage; collect from its worker")
        run, outbox = str(meta["run"]), queue.Queue()
        with self._collectors_lock:
            self._collectors[run] = outbox
        try:
            yield pack({"ready": True})
            while context.is_active():
                try:
                    yield outbox.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
        finally:
            with self._collectors_lock:
                self._collectors.pop(run, None)


def serve(listen: str, token: str, directory: str | Path, threads: int = 0, tls: Tls | None = None,
          max_workers: int = 32) -> tuple[object, int]:
    """Start a worker on `listen` (HOST:PORT; port 0 picks a free one): (server, port).

    With `tls`, only mTLS clients with a certificate signed by the fleet's CA get in.
    """
    worker = Worker(directory, token, threads, tls)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         handlers=[worker.handler()],
                         options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    try:
        port = (server.add_secure_port(listen, tls.server_credentials()) if tls
                else server.add_insecure_port(listen))
    except RuntimeError:
        raise RemoteError(f"cannot listen on {listen}: address in use or not on this host; "
                          f"pick another --listen HOST:PORT") from None
    server.start()
    return server, port
