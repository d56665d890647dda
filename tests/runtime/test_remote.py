"""Deploy to real `edgeplan worker` processes on 127.0.0.1 and run through them over gRPC.

One compile of examples/gpt.py (3 stages on 3 devices) and three worker processes serve the
whole module; tests that kill or stop a worker bring it back (same port, same --dir) after.
"""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_example

import edgeplan
from edgeplan.cli import main
from edgeplan.errors import RemoteError
from edgeplan.runtime.deploy import DEPLOYMENT_FILE, connect, deploy, read_deployment
from edgeplan.runtime.manifest import read_manifest, write_manifest
from edgeplan.runtime.wire import (
    SERVICE,
    Tls,
    WorkerClient,
    grpc,
    pack,
    sha256_bytes,
    unpack,
)

DEVICES = ("dev-a", "dev-b", "dev-c")
FLEET = 'name = "loop"\n' + "".join(
    f'[[device]]\nname = "{name}"\npreset = "raspberry-pi-5-8gb"\n{{{name}}}\n' for name in DEVICES)
START_TIMEOUT_S = 60


class WorkerProcess:
    """One `edgeplan worker` subprocess; `start()` again reuses its port and directory."""

    def __init__(self, directory: Path, token_file: Path, port: int = 0, extra: tuple[str, ...] = ()):
        self.directory, self.token_file, self.port, self.extra = directory, token_file, port, extra
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "WorkerProcess":
        log = open(self.directory.with_suffix(".log"), "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeplan.cli", "worker", "--listen", f"127.0.0.1:{self.port}",
             "--token-file", str(self.token_file), "--dir", str(self.directory), "--threads", "1", *self.extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        return self

    def wait_ready(self) -> "WorkerProcess":
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        if not line or "listening on" not in line[0]:
            raise AssertionError(f"worker did not start: {line}; log: "
                                 f"{self.directory.with_suffix('.log').read_text()[-2000:]}")
        self.port = int(line[0].split("listening on ")[1].split()[0].rpartition(":")[2])
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "fleet.token"
    path.write_text("a" * 8 + "0123456789abcdef" * 2 + "\n")
    return path


@pytest.fixture(scope="module")
def workers(tmp_path_factory, token_file):
    root = tmp_path_factory.mktemp("workers")
    procs = [WorkerProcess(root / name, token_file).start() for name in DEVICES]  # start all, then wait
    try:
        yield [proc.wait_ready() for proc in procs]
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, workers):
    out = tmp_path_factory.mktemp("gpt")
    fleet = out.parent / "loop.toml"
    fleet.write_text(FLEET.format(**{name: "" for name in DEVICES}))
    model, inputs = load_example("gpt").build(n_layer=4)
    edgeplan.compile(model, inputs, fleet=str(fleet), out_dir=out, num_stages=3, time_limit_s=5)
    return out


@pytest.fixture(scope="module")
def fleet_file(compiled, workers) -> Path:
    path = compiled.parent / "loop-addresses.toml"
    path.write_text(FLEET.format(**{name: f'address = "{w.address}"' for name, w in zip(DEVICES, workers)}))
    return path


def batch(microbatches: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(seed).integers(0, 512, (2 * microbatches, 32), dtype=np.int64)}


def local_outputs(directory: Path, inputs: dict) -> dict[str, np.ndarray]:
    return edgeplan.runtime.load(directory, threads_per_stage=1).run(inputs)


def assert_bitwise_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape
        assert np.array_equal(got[name], expected[name]), name


def test_deploy_and_run_match_the_local_pipeline_bitwise(compiled, fleet_file, token_file, capsys):
    manifest = read_manifest(compiled)
    assert [s.device for s in manifest.stages] == list(DEVICES)
    assert main(["deploy", str(compiled), "--fleet", str(fleet_file), "--token-file", str(token_file)]) == 0
    assert "deployed" in capsys.readouterr().out
    record = read_deployment(compiled)
    assert record.deployment == sha256_bytes((compiled / "manifest.json").read_bytes())
    assert [(w.device, w.stages) for w in record.workers] == [(d, (i,)) for i, d in enumerate(DEVICES)]

    inputs = batch(12)
    expected = local_outputs(compiled, inputs)
    done = []
    with connect(compiled) as remote:
        outputs = remote.run(inputs, progress=lambda k, n: done.append((k, n)))
        stats = remote.last_stats
        assert remote.retried == 0 and remote.duplicates_dropped == 0
    assert_bitwise_equal(outputs, expected)
    assert done == [(k, 12) for k in range(1, 13)]
    assert stats.microbatches == 12 and len(stats.stage_mean_s) == 3
    assert all(0 < t < stats.wall_s for t in stats.stage_mean_s)

    # The CLI path: run --remote writes the same outputs and records a remote run.
    np.savez(compiled / "inputs.npz", **inputs)
    assert main(["run", str(compiled), "--remote", "--inputs", str(compiled / "inputs.npz"),
                 "-o", str(compiled / "remote.npz")]) == 0
    assert "3 remote stage(s)" in capsys.readouterr().out
    with np.load(compiled / "remote.npz") as archive:
        assert_bitwise_equal(dict(archive), expected)
    assert edgeplan.runtime.latest_run(compiled)["remote"] is True


def test_boundary_codecs_are_applied_remotely_as_locally(compiled, fleet_file, token_file, tmp_path):
    out = tmp_path / "coded"
    out.mkdir()
    for path in compiled.glob("stage_*"):  # the .onnx and its .weights
        (out / path.name).write_bytes(path.read_bytes())
    manifest = read_manifest(compiled)
    codecs = ("int8+zstd", "fp16")
    write_manifest(dataclasses.replace(manifest, stages=tuple(
        dataclasses.replace(s, codec=codecs[s.index]) if s.index < 2 else s for s in manifest.stages)), out)
    deploy(out, fleet_file, token_file)
    inputs = batch(5, seed=1)
    with connect(out) as remote:
        outputs = remote.run(inputs)
    assert_bitwise_equal(outputs, local_outputs(out, inputs))
    raw = local_outputs(compiled, inputs)["output"]
    assert 0 < np.abs(outputs["output"] - raw).max() < 0.5 * np.abs(raw).max()  # the codecs did run


def test_wrong_or_missing_token_is_refused(compiled, fleet_file, token_file, workers, tmp_path):
    wrong = tmp_path / "wrong.token"
    wrong.write_text("f" * 40)
    wrong_token = r"health check: worker of device .* refused the call: missing or wrong token"
    with pytest.raises(RemoteError, match=wrong_token):
        WorkerClient(workers[0].address, "f" * 40, "dev-a").health()
    with grpc.insecure_channel(workers[1].address) as channel:  # no token at all
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/Forward")(pack({}), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(RemoteError, match="refused the call"):
        deploy(compiled, fleet_file, wrong)
    short = tmp_path / "short.token"
    short.write_text("abc")
    with pytest.raises(RemoteError, match="3 characters, at least 16"):
        deploy(compiled, fleet_file, short)


def test_corrupted_upload_and_path_traversal_are_refused(compiled, workers, token_file, tmp_path):
    stage = read_manifest(compiled).stages[1]
    corrupt = tmp_path / "stage_1.onnx"
    data = bytearray((compiled / stage.artifact.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    deployment = "ab" * 32
    client = WorkerClient(workers[1].address, token_file.read_text().strip(), "dev-b")
    try:
        with pytest.raises(RemoteError, match=r"upload of stage_1.onnx: upload of stage_1.onnx .* is corrupt: sha256"):
            client.upload(deployment, "stage_1.onnx", stage.artifact.sha256, corrupt, timeout=30)
        assert not list((workers[1].directory / deployment).iterdir())  # neither the file nor a .part
        for name in ("../escape.onnx", "nested/stage.onnx", "/tmp/stage.onnx", ".."):
            with pytest.raises(RemoteError, match="path traversal is refused"):
                client.upload(deployment, name, stage.artifact.sha256, compiled / stage.artifact.path, timeout=30)
        with pytest.raises(RemoteError, match="path traversal is refused"):
            client.upload("../" + "ab" * 31, "stage_1.onnx", stage.artifact.sha256,
                          compiled / stage.artifact.path, timeout=30)
        assert not (workers[1].directory / "escape.onnx").exists()
        assert not (workers[1].directory.parent / "escape.onnx").exists()
        stored = client.upload(deployment, "stage_1.onnx", stage.artifact.sha256, compiled / stage.artifact.path, 30)
        assert stored["nbytes"] == stage.artifact.nbytes
    finally:
        client.close()


def test_deploy_names_devices_without_address_or_worker(compiled, fleet_file, token_file, tmp_path):
    no_address = tmp_path / "no-address.toml"
    no_address.write_text(fleet_file.read_text().replace(f'address = "{_address_of(fleet_file, "dev-b")}"', ""))
    with pytest.raises(RemoteError, match=r"stage 1 runs on device 'dev-b', which has no address"):
        deploy(compiled, no_address, token_file)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{free.getsockname()[1]}"
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(fleet_file.read_text().replace(_address_of(fleet_file, "dev-c"), nobody))
    with pytest.raises(RemoteError, match=rf"device 'dev-c' at {nobody} is unreachable"):
        deploy(compiled, unreachable, token_file)


def _address_of(fleet_file: Path, device: str) -> str:
    text = fleet_file.read_text()
    return text.split(f'name = "{device}"\n')[1].split('address = "')[1].split('"')[0]


def _run_with_fault(compiled, fault, microbatches: int = 40, after: int = 4, **options):
    """Run through the workers and call `fault()` once `after` outputs have arrived."""

    def progress(done: int, total: int) -> None:
        if done == after:
            fault()

    with connect(compiled, **options) as remote:
        return remote.run(batch(microbatches, seed=2), progress=progress), remote


def test_killed_worker_is_named_and_the_run_returns_nothing(compiled, fleet_file, token_file, workers):
    deploy(compiled, fleet_file, token_file)
    victim = workers[1]
    try:
        started = time.monotonic()
        with pytest.raises(RemoteError, match=rf"microbatch \d+ of 40: stage 1: device 'dev-b' at "
                                              rf"{victim.address} is unreachable"):
            _run_with_fault(compiled, victim.process.kill, retry_for_s=1.0)
        assert time.monotonic() - started < 15
    finally:
        victim.stop()
        victim.start().wait_ready()


def test_killed_last_worker_breaks_the_output_stream_and_is_named(compiled, fleet_file, token_file, workers):
    deploy(compiled, fleet_file, token_file)
    victim = workers[2]
    try:
        with pytest.raises(RemoteError, match=rf"device 'dev-c' at {victim.address}"):
            _run_with_fault(compiled, victim.process.kill, retry_for_s=1.0)
    finally:
        victim.stop()
        victim.start().wait_ready()


def test_restarted_worker_resumes_and_outputs_stay_exact(compiled, fleet_file, token_file, workers):
    deploy(compiled, fleet_file, token_file)
    victim = workers[1]
    expected = local_outputs(compiled, batch(40, seed=2))

    def crash_and_restart() -> None:
        victim.process.kill()
        victim.process.wait(10)
        victim.start()  # same port and --dir: it reloads the deployment while the driver retries

    try:
        outputs, remote = _run_with_fault(compiled, crash_and_restart, retry_for_s=45.0)
        assert remote.retried > 0
        assert_bitwise_equal(outputs, expected)  # nothing lost, duplicated or reordered
        victim.wait_ready()
    finally:
        if victim.process.poll() is not None:
            victim.start().wait_ready()


def test_hung_worker_is_named_after_the_deadline(compiled, fleet_file, token_file, workers):
    deploy(compiled, fleet_file, token_file)
    victim = workers[2]
    try:
        with pytest.raises(RemoteError, match=rf"stage 2: device 'dev-c' at {victim.address} did not "
                                              rf"answer before the deadline"):
            _run_with_fault(compiled, lambda: os.kill(victim.process.pid, signal.SIGSTOP),
                            timeout_s=2.0, retry_for_s=0.0)
    finally:
        os.kill(victim.process.pid, signal.SIGCONT)
    with connect(compiled) as remote:  # it answers again once resumed
        assert remote.run(batch(1))["output"].shape == (2, 32, 512)


def test_redeploy_over_a_running_deployment_is_reported(compiled, fleet_file, token_file, tmp_path):
    deploy(compiled, fleet_file, token_file)
    other = tmp_path / "other"
    other.mkdir()
    for path in compiled.glob("stage_*"):  # the .onnx and its .weights
        (other / path.name).write_bytes(path.read_bytes())
    manifest = read_manifest(compiled)
    write_manifest(dataclasses.replace(manifest, model="other"), other)
    deploy(other, fleet_file, token_file)
    with pytest.raises(RemoteError, match=r"device 'dev-a' at .* runs deployment .* run `edgeplan deploy` again"):
        connect(compiled)
    (compiled / DEPLOYMENT_FILE).rename(tmp_path / "saved.json")
    try:
        with pytest.raises(RemoteError, match="not deployed; run `edgeplan deploy"):
            connect(compiled)
    finally:
        (tmp_path / "saved.json").rename(compiled / DEPLOYMENT_FILE)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return cert, key


def make_node_cert(directory: Path, ca: tuple[Path, Path], name: str) -> Tls:
    """A certificate for 127.0.0.1 signed by `ca`, as mTLS files for a node."""
    key, request, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", request, "-subj", f"/CN={name}"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1],
                    "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extensions],
                   check=True, capture_output=True)
    return Tls(str(ca[0]), str(cert), str(key))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_mtls_workers_run_the_chain_and_refuse_strangers(compiled, token_file, tmp_path):
    ca = make_ca(tmp_path, "fleet-ca")
    node = make_node_cert(tmp_path, ca, "node")
    # Trusts the fleet's CA but holds a certificate another CA signed: the worker must refuse it.
    stranger = dataclasses.replace(make_node_cert(tmp_path, make_ca(tmp_path, "other-ca"), "stranger"), ca=node.ca)
    tls_args = ("--tls-ca", node.ca, "--tls-cert", node.cert, "--tls-key", node.key)
    procs = [WorkerProcess(tmp_path / name, token_file, extra=tls_args).start() for name in DEVICES]
    try:
        addresses = [proc.wait_ready().address for proc in procs]
        fleet = tmp_path / "tls.toml"
        fleet.write_text(FLEET.format(**{name: f'address = "{a}"' for name, a in zip(DEVICES, addresses)}))
        out = tmp_path / "gpt"
        shutil.copytree(compiled, out, ignore=shutil.ignore_patterns("deployment.json", "runs.jsonl"))
        with pytest.raises(RemoteError, match=r"device 'dev-a' at .* is unreachable .*same --tls-\* setting"):
            deploy(out, fleet, token_file)  # plaintext to a TLS worker
        deploy(out, fleet, token_file, tls=node)
        assert read_deployment(out).tls == node
        inputs = batch(6, seed=3)
        with connect(out) as remote:  # the TLS files come from deployment.json
            assert_bitwise_equal(remote.run(inputs), local_outputs(out, inputs))
        with pytest.raises(RemoteError, match=r"device 'dev-b' at .* is unreachable"):
            WorkerClient(addresses[1], token_file.read_text().strip(), "dev-b", stranger).health()
    finally:
        for proc in procs:
            proc.stop()


def test_framing_round_trips_and_rejects_truncation():
    message = pack({"seq": 3}, {"a": b"\x00\x01", "b": b"", "c": b"xyz"})
    meta, blobs = unpack(message)
    assert meta == {"seq": 3} and {k: bytes(v) for k, v in blobs.items()} == {"a": b"\x00\x01", "b": b"", "c": b"xyz"}
    with pytest.raises(RemoteError, match="announces"):
        unpack(message[:-1])
    with pytest.raises(RemoteError, match="magic"):
        unpack(b"XXXX" + message[4:])


def test_worker_and_driver_import_no_torch():
    code = ("import sys, edgeplan.cli, edgeplan.runtime.worker, edgeplan.runtime.deploy; "
            "bad = [m for m in ('torch', 'ortools', 'onnx') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
