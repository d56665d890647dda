"""The driver: deploy a compiled model to `edgeplan worker`s on devices, and run it through them.

    edgeplan deploy out/gpt --fleet fleet.toml --token-file fleet.token [--tls-ca ... --tls-cert ... --tls-key ...]
    edgeplan run out/gpt --remote --inputs x.npz

    from edgeplan.runtime.deploy import connect, deploy
    deploy("out/gpt", "fleet.toml", token_file="fleet.token")
    with connect("out/gpt") as remote:
        outputs = remote.run({"input_ids": ids})        # same outputs as the local Pipeline

Deploy: every stage's device needs `address = "host:port"` in the fleet. The driver checks
each worker's health and versions (same edgeplan version and protocol), uploads each
device's artifacts (the worker checks size and sha256), configures the workers from the
last stage back to the first (each checks it can reach its next hop and that the hop runs
the next stage), checks health again (manifest sha256 and stages), and writes
DIR/deployment.json (workers, manifest sha256, token file path, TLS file paths; never the
token). With `tls` (mTLS files), every call is encrypted and both ends are authenticated.

Run: microbatches as in the local pipeline (split_batch / gather_outputs). The driver opens
the run's output stream on the last worker, then sends microbatches to the first worker
with a sequence number each, keeping up to `window` in flight (default twice the number of
stages) so the stages overlap. Each Forward call has a deadline (`timeout_s`, for the whole
chain) and returns once the chain has accepted the microbatch (see runtime/worker.py for
the wiring). Outputs are kept by sequence number: a duplicate (from a retry whose first
attempt got through after all) is dropped, and outputs are concatenated in order. A call
that fails with a transient error (a worker unreachable or past its deadline) is retried
with backoff for up to `retry_for_s` seconds (a restarted worker reloads its deployment, so
the run goes on); after that, or on any other error, the run raises RemoteError naming the
device and address, and returns nothing partial. If the last worker's output stream breaks,
the run fails at once (the outputs in transit on it are gone).
"""

from __future__ import annotations

import heapq
import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import edgeplan
from edgeplan.errors import RemoteError
from edgeplan.runtime.codecs import decode
from edgeplan.runtime.manifest import (
    MANIFEST_FILE,
    Manifest,
    artifact_path,
    read_manifest,
    weights_path,
)
from edgeplan.runtime.pipeline import ModelIO, RunStats, gather_outputs, split_batch
from edgeplan.runtime.wire import (
    PROTOCOL_VERSION,
    Tls,
    WorkerClient,
    grpc,
    pack,
    read_token,
    rpc_failure,
    sha256_bytes,
    tensor_blobs,
    unpack,
)

DEPLOYMENT_FILE = "deployment.json"
_POLL_S = 0.25
_BACKOFF_S = (0.1, 2.0)  # first retry delay, cap (doubling in between)


@dataclass(frozen=True)
class WorkerPlacement:
    device: str
    address: str
    stages: tuple[int, ...]


@dataclass(frozen=True)
class Deployment:
    """What `deploy` set up (DIR/deployment.json): the manifest's sha256 and the workers."""

    deployment: str
    workers: tuple[WorkerPlacement, ...]
    token_file: str
    tls: Tls | None = None


def _addresses(fleet) -> dict[str, str]:
    from edgeplan.planner.fleet import load_fleet  # stdlib only, no torch

    return {device.name: device.address for device in load_fleet(fleet).devices if device.address}


def place(manifest: Manifest, addresses: dict[str, str], fleet_name: str = "the fleet") -> tuple[WorkerPlacement, ...]:
    """One worker per device, in stage order; each device's stages must be contiguous."""
    placements: list[WorkerPlacement] = []
    for stage in manifest.stages:
        address = addresses.get(stage.device)
        if address is None:
            raise RemoteError(
                f"stage {stage.index} runs on device {stage.device!r}, which has no address in "
                f"{fleet_name}; fix: give its [[device]] table address = \"host:port\" (where its "
                f"`edgeplan worker` listens)")
        if placements and placements[-1].device == stage.device:
            last = placements[-1]
            placements[-1] = WorkerPlacement(last.device, last.address, (*last.stages, stage.index))
        elif any(p.device == stage.device for p in placements):
            raise RemoteError(f"device {stage.device!r} runs stages that are not contiguous (stage "
                              f"{stage.index} comes after another device's); one worker serves one range")
        else:
            placements.append(WorkerPlacement(stage.device, address, (stage.index,)))
    shared = {p.address for p in placements if sum(q.address == p.address for q in placements) > 1}
    if shared:
        raise RemoteError(f"devices share the address(es) {sorted(shared)}; one worker serves one "
                          f"device: give each device its own port")
    return tuple(placements)


def _check_versions(status: dict, client: WorkerClient) -> None:
    if status.get("protocol") != PROTOCOL_VERSION or status.get("edgeplan") != edgeplan.__version__:
        raise RemoteError(
            f"device {client.device!r} at {client.address} runs edgeplan {status.get('edgeplan')} "
            f"(protocol {status.get('protocol')}), this driver edgeplan {edgeplan.__version__} "
            f"(protocol {PROTOCOL_VERSION}); install the same edgeplan version on both")


def _check_deployed(status: dict, client: WorkerClient, deployment: str, stages: tuple[int, ...]) -> None:
    if status.get("deployment") != deployment or tuple(status.get("stages", ())) != stages:
        raise RemoteError(
            f"device {client.device!r} at {client.address} runs deployment "
            f"{str(status.get('deployment'))[:12]}... stages {status.get('stages')}, expected "
            f"{deployment[:12]}... stages {list(stages)} (restarted without its --dir, or deployed "
            f"over?); run `edgeplan deploy` again")


def deploy(directory: str | Path, fleet, token_file: str | Path, timeout_s: float = 120.0,
           tls: Tls | None = None) -> Deployment:
    """Upload and configure every stage of the compile output `directory` on its device's worker.

    `fleet`: a Fleet, a preset name or a fleet .toml path whose devices carry `address`;
    `tls`: mTLS files when the workers run with them.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)  # also verifies the local artifacts' sha256
    manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
    deployment = sha256_bytes(manifest_bytes)
    token = read_token(token_file)
    placements = place(manifest, _addresses(fleet), str(fleet))
    clients = [WorkerClient(p.address, token, p.device, tls) for p in placements]
    try:
        for client in clients:
            _check_versions(client.health(), client)
        for placement, client in zip(placements, clients):
            for k in placement.stages:
                stage = manifest.stages[k]
                client.upload(deployment, stage.artifact.path, stage.artifact.sha256,
                              artifact_path(directory, stage), timeout_s)
                if stage.artifact.weights is not None:
                    client.upload(deployment, stage.artifact.weights.path, stage.artifact.weights.sha256,
                                  weights_path(directory, stage), timeout_s)
        owner = {k: p for p in placements for k in p.stages}
        for placement, client in reversed(list(zip(placements, clients))):
            hops = {str(k): {"device": owner[k + 1].device, "address": owner[k + 1].address}
                    for k in placement.stages if k + 1 in owner and owner[k + 1] is not placement}
            client.configure({"deployment": deployment, "device": placement.device,
                              "stages": list(placement.stages), "hops": hops}, manifest_bytes, timeout_s)
        for placement, client in zip(placements, clients):
            _check_deployed(client.health(), client, deployment, placement.stages)
    finally:
        for client in clients:
            client.close()
    record = Deployment(deployment, placements, str(Path(token_file).resolve()), tls)
    (directory / DEPLOYMENT_FILE).write_text(json.dumps(asdict(record), indent=1))
    return record


def read_deployment(directory: str | Path) -> Deployment:
    path = Path(directory) / DEPLOYMENT_FILE
    if not path.is_file():
        raise RemoteError(f"{path}: not deployed; run `edgeplan deploy {directory} --fleet FLEET "
                          f"--token-file FILE` first")
    try:
        data = json.loads(path.read_text())
        return Deployment(data["deployment"],
                          tuple(WorkerPlacement(w["device"], w["address"], tuple(w["stages"]))
                                for w in data["workers"]), data["token_file"],
                          Tls(**data["tls"]) if data.get("tls") else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"{path}: malformed ({exc.__class__.__name__}: {exc}); deploy again") from None


class RemotePipeline(ModelIO):
    """A deployed model: `run(inputs) -> outputs`, like the local Pipeline, through the workers.

    token_file / tls: default to what `deploy` recorded; timeout_s: deadline of one
    microbatch through the whole chain; window: microbatches in flight (default 2 x stages);
    retry_for_s: how long a microbatch whose call failed transiently is retried.
    """

    def __init__(self, directory: str | Path, token_file: str | Path | None = None,
                 timeout_s: float = 30.0, window: int | None = None, retry_for_s: float = 10.0,
                 tls: Tls | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory, verify=False)
        record = read_deployment(self.directory)
        if record.deployment != sha256_bytes((self.directory / MANIFEST_FILE).read_bytes()):
            raise RemoteError(f"{self.directory}: the manifest changed since it was deployed "
                              f"(recompiled?); run `edgeplan deploy` again")
        self.deployment = record.deployment
        token = read_token(token_file or record.token_file)
        self.timeout_s, self.retry_for_s = timeout_s, retry_for_s
        self.window = window or 2 * len(self.manifest.stages)
        tls = tls or record.tls
        self.workers = [WorkerClient(p.address, token, p.device, tls) for p in record.workers]
        try:
            for placement, client in zip(record.workers, self.workers):
                status = client.health()
                _check_versions(status, client)
                _check_deployed(status, client, self.deployment, placement.stages)
        except BaseException:
            self.close()
            raise
        self.last_stats: RunStats | None = None
        self.retried = 0  # calls retried in the last run
        self.duplicates_dropped = 0  # outputs that arrived twice in the last run (dropped)

    def close(self) -> None:
        for client in self.workers:
            client.close()

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(self, inputs: dict, progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
        """Run a batch through the workers; `progress(done, total)` after each microbatch's output."""
        microbatches = split_batch(self.manifest, inputs)
        count, stages = len(microbatches), len(self.manifest.stages)
        first, last = self.workers[0], self.workers[-1]
        run_id = uuid.uuid4().hex
        events: queue.Queue = queue.Queue()
        started = time.perf_counter()
        stream = last.collect(self.deployment, run_id, timeout=self.timeout_s * (count + 1) + self.retry_for_s)
        try:
            next(stream)  # the worker registered the run: outputs have somewhere to go
        except grpc.RpcError as exc:
            raise RemoteError(f"opening the output stream: {rpc_failure(exc, last.device, last.address)[0]}") from None
        reader = threading.Thread(target=_read_outputs, args=(stream, events), daemon=True)
        reader.start()

        results: dict[int, dict[str, np.ndarray]] = {}
        requests: dict[int, bytes] = {}
        calls: dict[int, object] = {}
        retries: list[tuple[float, int]] = []  # (when, seq) heap
        failing_since: dict[int, float] = {}
        attempts: dict[int, int] = {}
        outstanding: set[int] = set()  # sent (or waiting to be retried), output not yet here
        busy, acked = [0.0] * stages, set()
        self.retried = self.duplicates_dropped = 0
        next_seq = 0

        def send(seq: int) -> None:
            future = first.forward_future(requests[seq], self.timeout_s)
            calls[seq] = future
            future.add_done_callback(lambda done, seq=seq: events.put(("reply", seq, done)))

        try:
            while len(results) < count:
                now = time.monotonic()
                while retries and retries[0][0] <= now:
                    seq = heapq.heappop(retries)[1]
                    if seq not in results:
                        send(seq)
                while len(outstanding) < self.window and next_seq < count:
                    requests[next_seq] = pack({"deployment": self.deployment, "run": run_id, "seq": next_seq,
                                               "stage": 0}, tensor_blobs(microbatches[next_seq]))
                    outstanding.add(next_seq)
                    send(next_seq)
                    next_seq += 1
                wait = min(_POLL_S, retries[0][0] - now) if retries else _POLL_S
                try:
                    event = events.get(timeout=max(wait, 0.0))
                except queue.Empty:
                    continue
                kind = event[0]
                if kind == "reply":
                    _, seq, done = event
                    error = done.exception()
                    if error is None:
                        if seq not in acked:
                            acked.add(seq)
                            for k, seconds in unpack(done.result())[0]["busy"].items():
                                busy[int(k)] += seconds
                        continue
                    if seq in results:
                        continue  # the output arrived anyway
                    message, transient = rpc_failure(error, first.device, first.address)
                    since = failing_since.setdefault(seq, now)
                    if not transient or now - since >= self.retry_for_s:
                        tried = (f" (tried {attempts.get(seq, 0) + 1} times over {now - since:.1f} s)"
                                 if transient else "")
                        raise RemoteError(f"remote run failed at microbatch {seq} of {count}: {message}{tried}")
                    attempts[seq] = attempts.get(seq, 0) + 1
                    self.retried += 1
                    delay = min(_BACKOFF_S[0] * 2 ** (attempts[seq] - 1), _BACKOFF_S[1])
                    heapq.heappush(retries, (now + delay, seq))
                elif kind == "output":
                    _, seq, blobs = event
                    if seq in results or not 0 <= seq < count:
                        self.duplicates_dropped += 1
                        continue
                    results[seq] = {name: decode(blob) for name, blob in blobs.items()}
                    outstanding.discard(seq)
                    requests.pop(seq, None)
                    if progress is not None:
                        progress(len(results), count)
                elif kind == "stream_error":
                    message, _ = rpc_failure(event[1], last.device, last.address)
                    raise RemoteError(f"remote run failed: the output stream from the last stage broke "
                                      f"after {len(results)} of {count} outputs: {message}")
                else:  # "stream_end" or "corrupt"
                    raise RemoteError(f"remote run failed: the output stream from device {last.device!r} "
                                      f"at {last.address} ended after {len(results)} of {count} outputs"
                                      + (f" ({event[1]})" if kind == "corrupt" else ""))
        finally:
            stream.cancel()
            for future in calls.values():
                future.cancel()
            reader.join(timeout=5)
        self.last_stats = RunStats(count, time.perf_counter() - started, tuple(b / count for b in busy))
        return gather_outputs(self.manifest, [results[seq] for seq in range(count)])


def _read_outputs(stream, events: queue.Queue) -> None:
    """Reader thread: the run's output stream -> ("output", seq, blobs) events."""
    try:
        for message in stream:
            meta, blobs = unpack(message)
            events.put(("output", int(meta["seq"]), blobs))
        events.put(("stream_end",))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:  # CANCELLED: the driver closed it when done
            events.put(("stream_error", exc))
    except RemoteError as exc:
        events.put(("corrupt", exc))


def connect(directory: str | Path, **options) -> RemotePipeline:
    """The deployed model in `directory` (see RemotePipeline for options)."""
    return RemotePipeline(directory, **options)
