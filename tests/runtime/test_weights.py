"""Stage weights stored apart and held once: manifest records, prepacking choice, resident memory."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgeplan
from edgeplan.errors import ArtifactError
from edgeplan.runtime import WeightStore, read_manifest
from edgeplan.runtime.manifest import MANIFEST_FILE

WIDTH = 1024  # the big model's shared weight: 1024 x 2048 float32 = 8 MiB


class TwoReaders(nn.Module):
    """One weight read by two Gemm nodes (a merged layer whose models take different inputs),
    and one read by one."""

    def __init__(self, width: int):
        super().__init__()
        self.shared = nn.Linear(width, 2 * width)
        self.own = nn.Linear(2 * width, 8)

    def forward(self, a, b):
        return self.own(torch.relu(self.shared(a)) + torch.relu(self.shared(b)))


def compile_model(width: int, out):
    torch.manual_seed(0)
    model = TwoReaders(width).eval()
    inputs = (torch.rand(4, width), torch.rand(4, width))
    edgeplan.compile(model, inputs, fleet="home-lab", out_dir=out, num_stages=1, time_limit_s=5)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return compile_model(16, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return compile_model(WIDTH, tmp_path_factory.mktemp("big"))


def feeds(pipe, seed=0):
    rng = np.random.default_rng(seed)
    return {t.name: rng.random(t.shape, dtype=np.float32) for t in pipe.manifest.inputs}


def test_weights_are_stored_apart_and_listed(big):
    stage = read_manifest(big).stages[0]
    weights = stage.artifact.weights
    assert (big / weights.path).stat().st_size == weights.nbytes
    assert stage.artifact.nbytes < 10_000  # the .onnx holds the graph, not the 8 MiB
    shared = next(t for t in weights.tensors if t.nbytes == 2 * WIDTH * WIDTH * 4)
    own = next(t for t in weights.tensors if t.nbytes == 2 * WIDTH * 8 * 4)
    assert shared.readers == 2 and own.readers == 1  # two Gemm nodes read the shared Linear
    assert all(t.offset % 64 == 0 for t in weights.tensors)
    data = np.fromfile(big / weights.path, np.float32, 2 * WIDTH * WIDTH, offset=shared.offset)
    expected = onnx.numpy_helper.to_array(next(i for i in onnx.load(big / stage.artifact.path).graph.initializer
                                               if i.name == shared.name))
    np.testing.assert_array_equal(data.reshape(shared.shape), expected)


def test_prepacked_outputs_are_bitwise_those_of_the_self_contained_model(small):
    stage = read_manifest(small).stages[0]
    inlined = onnx.load(small / stage.artifact.path)  # loads the external data back in
    session = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    pipe = edgeplan.runtime.load(small, weights=WeightStore("on"))
    x = feeds(pipe)
    expected = session.run(None, x)[0]
    assert pipe.sessions[0].prepacked
    assert np.array_equal(pipe.run(x)["output"], expected)
    shared = edgeplan.runtime.load(small, weights=WeightStore("off"))
    assert not shared.sessions[0].prepacked
    np.testing.assert_allclose(shared.run(x)["output"], expected, rtol=1e-5, atol=1e-6)


def test_auto_shares_only_where_a_weight_has_several_readers_or_holders(small, tmp_path):
    stage = read_manifest(small).stages[0]
    store = WeightStore("auto")
    store.expect(small)
    assert not store.prepacks(stage)  # the shared Linear is read twice
    single = dataclasses.replace(stage, artifact=dataclasses.replace(stage.artifact, weights=dataclasses.replace(
        stage.artifact.weights, tensors=tuple(dataclasses.replace(t, readers=1)
                                              for t in stage.artifact.weights.tensors))))
    alone = WeightStore("auto")
    alone.expect(small, [single])
    alone.expect(small, [single])  # a directory counts once
    assert alone.prepacks(single)
    together = WeightStore("auto")
    together.expect(small, [single, dataclasses.replace(single, index=1)])  # two stages, equal weights
    assert not together.prepacks(single)
    assert WeightStore("on").prepacks(stage) and not WeightStore("off").prepacks(single)
    with pytest.raises(ArtifactError, match="prepacking 'sometimes' is unknown"):
        WeightStore("sometimes")


def test_one_store_holds_equal_weights_of_two_pipelines_once(small, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for path in small.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    store = WeightStore()
    store.expect(small)
    store.expect(other)
    first = edgeplan.runtime.load(small, weights=store)
    held = store.nbytes
    second = edgeplan.runtime.load(other, weights=store)
    assert not first.sessions[0].prepacked and not second.sessions[0].prepacked
    assert store.nbytes == held == read_manifest(small).stages[0].artifact.weights.nbytes - _padding(small)
    x = feeds(first)
    assert np.array_equal(first.run(x)["output"], second.run(x)["output"])


def _padding(directory) -> int:
    weights = read_manifest(directory).stages[0].artifact.weights
    return weights.nbytes - sum(t.nbytes for t in weights.tensors)


def test_corrupt_or_missing_weights_file_is_named(small, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for path in small.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    weights = out / read_manifest(out).stages[0].artifact.weights.path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"stage 0 .*stage_0.weights is corrupt: sha256"):
        edgeplan.runtime.load(out)
    weights.unlink()
    with pytest.raises(ArtifactError, match=r"stage 0 .*stage_0.weights is missing"):
        edgeplan.runtime.load(out)


def test_manifest_without_weights_records_still_loads(small, tmp_path):
    data = json.loads((small / MANIFEST_FILE).read_text())
    del data["stages"][0]["artifact"]["weights"]
    out = tmp_path / "old"
    out.mkdir()
    stage = read_manifest(small).stages[0]
    inlined = onnx.load(small / stage.artifact.path)
    onnx.save_model(inlined, out / stage.artifact.path)  # self-contained, as before weights files
    data["stages"][0]["artifact"]["sha256"] = edgeplan.runtime.manifest.sha256_of(out / stage.artifact.path)
    (out / MANIFEST_FILE).write_text(json.dumps(data))
    pipe = edgeplan.runtime.load(out)
    assert pipe.manifest.stages[0].artifact.weights is None and pipe.sessions[0].prepacked
    x = feeds(pipe)
    reloaded = edgeplan.runtime.load(small, weights=WeightStore("on"))
    assert np.array_equal(pipe.run(x)["output"], reloaded.run(x)["output"])


RESIDENT = r"""
import json, sys
import numpy as np
from edgeplan.runtime import WeightStore, load

def rss_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

directory, copies, one_store = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "one"
before = rss_kb()
store = WeightStore("off" if copies > 1 else "auto")  # one directory loaded again shares with "off"
pipes = [load(directory, threads_per_stage=1, weights=store if one_store else None) for _ in range(copies)]
for pipe in pipes:
    pipe.run({t.name: np.ones(t.shape, t.dtype) for t in pipe.manifest.inputs})
print(json.dumps(rss_kb() - before))
"""


def resident_bytes(directory, copies: int, one_store: bool) -> int:
    """RSS a fresh process gains by loading and running `copies` pipelines of `directory`."""
    result = subprocess.run([sys.executable, "-c", RESIDENT, str(directory), str(copies),
                             "one" if one_store else "each"], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) * 1024


@pytest.mark.parametrize("copies", [1, 3])
def test_resident_memory_holds_each_weight_once(small, big, copies):
    """The big and the small model differ only in weight size, so the difference of their
    resident memory is what the weights cost: under 1.3x their bytes, with one weight read by
    two nodes and (copies=3) three pipelines of the model sharing one WeightStore."""
    weights = read_manifest(big).stages[0].artifact.weights.nbytes
    extra = resident_bytes(big, copies, True) - resident_bytes(small, copies, True)
    assert extra < 1.3 * weights, f"{extra / 2**20:.1f} MiB resident for {weights / 2**20:.1f} MiB of weights"


def test_resident_memory_check_sees_copies(small, big):
    """The same measurement tells copies apart: three pipelines with a store each hold the
    weights three times."""
    weights = read_manifest(big).stages[0].artifact.weights.nbytes
    extra = resident_bytes(big, 3, False) - resident_bytes(small, 3, False)
    assert extra > 2.7 * weights, f"{extra / 2**20:.1f} MiB resident for 3 x {weights / 2**20:.1f} MiB"


def test_cli_run_takes_the_prepacking_choice(small, tmp_path):
    from edgeplan.cli import main

    pipe = edgeplan.runtime.load(small)
    inputs = tmp_path / "x.npz"
    np.savez(inputs, **feeds(pipe))
    outputs = {}
    for choice in ("on", "off"):
        assert main(["run", str(small), "--inputs", str(inputs), "--prepacking", choice,
                     "-o", str(tmp_path / f"{choice}.npz")]) == 0
        with np.load(tmp_path / f"{choice}.npz") as archive:
            outputs[choice] = archive["output"]
    expected = edgeplan.runtime.load(small, weights=WeightStore("on")).run(feeds(pipe))["output"]
    assert np.array_equal(outputs["on"], expected)
    np.testing.assert_allclose(outputs["off"], expected, rtol=1e-5, atol=1e-6)
