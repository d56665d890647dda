"""TVM target: stage libraries match torch, the cache is reused, auto keeps the faster runtime,
cross builds are aarch64 ELF files, and a missing TVM is a clear error."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeplan
from edgeplan.cli import load_module
from edgeplan.errors import ArtifactError
from edgeplan.planner.plan import Plan
from edgeplan.planner.report import format_plan
from edgeplan.runtime.manifest import read_manifest
from edgeplan.targets.tvm import TvmTarget, cache_dir, elf_machine

TOLERANCE = 1e-4
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EM_AARCH64 = 183


@pytest.fixture(scope="module")
def tvm_cache(tmp_path_factory):
    pytest.importorskip("tvm")
    return tmp_path_factory.mktemp("tvm-cache")


def _torch_outputs(model, inputs):
    with torch.no_grad():
        output = model(**inputs)
    return output.numpy()


def _compile_and_run(model, inputs, out_dir, cache, **options):
    plan = edgeplan.compile(model, inputs, fleet="home-lab", out_dir=out_dir, time_limit_s=5,
                            tvm=TvmTarget(cache=cache), **options)
    pipe = edgeplan.runtime.load(out_dir)
    outputs = pipe.run({name: value.numpy() for name, value in inputs.items()})
    return plan, pipe, outputs


@pytest.fixture(scope="module")
def gpt_tvm(example, tvm_cache, tmp_path_factory):
    model, inputs = example("gpt").build(n_layer=2)
    out_dir = tmp_path_factory.mktemp("gpt-tvm")
    return (model, inputs, out_dir,
            *_compile_and_run(model, inputs, out_dir, tvm_cache, num_stages=2, targets="tvm"))


@pytest.fixture(scope="module")
def example():
    """Module-scoped twin of conftest's `example`, so module fixtures can build models."""
    return lambda name: load_module(EXAMPLES / f"{name}.py")


def test_gpt_two_tvm_stages_match_torch(gpt_tvm):
    model, inputs, out_dir, plan, pipe, outputs = gpt_tvm
    assert [s.runtime for s in plan.stages] == ["tvm", "tvm"]
    assert [s.artifact.format for s in pipe.manifest.stages] == ["tvm", "tvm"]
    assert all(json.loads(s.artifact.target) == {"kind": "llvm"} for s in pipe.manifest.stages)
    assert all((out_dir / f"stage_{i}.tvm.so").is_file() for i in range(2))
    assert all(s.verified_max_abs_error < TOLERANCE for s in pipe.manifest.stages)
    assert np.abs(outputs["output"] - _torch_outputs(model, inputs)).max() < TOLERANCE
    assert Plan.from_json(out_dir) == plan  # the runtime choice survives the JSON round trip


def test_resnet_tvm_stage_matches_torch(example, tvm_cache, tmp_path):
    model, inputs = example("resnet").build()
    _, pipe, outputs = _compile_and_run(model, inputs, tmp_path, tvm_cache, num_stages=1, targets="tvm")
    assert pipe.manifest.stages[0].artifact.format == "tvm"
    assert np.abs(outputs["output"] - _torch_outputs(model, inputs)).max() < TOLERANCE


@pytest.mark.parametrize("name", ["llama_hf", "gpt2_hf"])
def test_hf_stages_match_torch(example, tvm_cache, tmp_path, name):
    """Stage 0 holds the mask code (bool cumsum, diff); stage 1 the rest of the blocks and head."""
    model, inputs = example(name).build(num_hidden_layers=2) if name == "llama_hf" else example(name).build(n_layer=2)
    _, pipe, outputs = _compile_and_run(model, inputs, tmp_path, tvm_cache, num_stages=2, targets="tvm")
    assert [s.artifact.format for s in pipe.manifest.stages] == ["tvm", "tvm"]
    assert all(s.verified_max_abs_error < TOLERANCE for s in pipe.manifest.stages)
    assert np.abs(outputs["output"] - _torch_outputs(model, inputs)).max() < TOLERANCE


def test_second_build_comes_from_the_cache(gpt_tvm, tmp_path, monkeypatch):
    *_, out_dir, _, pipe, _ = gpt_tvm
    monkeypatch.setenv("EDGEPLAN_CACHE_DIR", str(tmp_path / "env-cache"))
    assert cache_dir() == tmp_path / "env-cache"
    target = TvmTarget()  # no cache option: the environment variable decides
    first = target.emit(out_dir / "stage_1.onnx", 1, tmp_path)
    second = target.emit(out_dir / "stage_1.onnx", 1, tmp_path)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.artifact == second.artifact
    assert len(list((tmp_path / "env-cache").glob("*.so"))) == 1
    # Another schedule is another cache entry.
    assert not TvmTarget(schedule="none").emit(out_dir / "stage_1.onnx", 1, tmp_path).cache_hit


def test_auto_keeps_the_faster_runtime(example, tvm_cache, tmp_path):
    model, inputs = example("gpt").build(n_layer=2)
    plan, pipe, outputs = _compile_and_run(model, inputs, tmp_path, tvm_cache, num_stages=2, targets="auto")
    for stage, entry in zip(plan.stages, pipe.manifest.stages):
        assert set(stage.runtime_s) == {"onnxruntime", "tvm"}
        assert stage.runtime == min(stage.runtime_s, key=stage.runtime_s.get)
        assert entry.artifact.format == ("tvm" if stage.runtime == "tvm" else "onnx")
    assert np.abs(outputs["output"] - _torch_outputs(model, inputs)).max() < TOLERANCE
    table = format_plan(plan, pipe.manifest)
    assert "TVM ms" in table and "ORT ms" in table
    assert f"{plan.stages[1].runtime_s['tvm'] * 1e3:.3f}" in table


def test_aarch64_build_is_an_aarch64_elf(gpt_tvm, tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    *_, out_dir, _, pipe, _ = gpt_tvm
    built = TvmTarget(target="aarch64", cache=tmp_path / "cache").emit(out_dir / "stage_0.onnx", 0, tmp_path)
    assert elf_machine(tmp_path / built.artifact.path) == EM_AARCH64
    assert elf_machine(out_dir / "stage_0.tvm.so") != EM_AARCH64  # the host build is not
    assert json.loads(built.artifact.target)["mtriple"] == "aarch64-linux-gnu"


def test_gpu_targets_build_but_do_not_run_here(tvm_cache, tmp_path):
    """OpenCL kernels with host code: built and recorded, never run (no GPU on this machine)."""
    torch.manual_seed(0)
    plan = edgeplan.compile(Tiny().eval(), (torch.randn(2, 16),), fleet="pi-cluster", out_dir=tmp_path,
                            num_stages=1, time_limit_s=5, targets="tvm",
                            tvm=TvmTarget(target="opencl", cache=tvm_cache))
    entry = read_manifest(tmp_path).stages[0]
    assert plan.stages[0].runtime == "tvm" and json.loads(entry.artifact.target) == {"kind": "opencl"}
    assert entry.verified_max_abs_error is None  # not run, so not verified
    with pytest.raises(ArtifactError, match="runs host llvm libraries only"):
        edgeplan.runtime.load(tmp_path)


def test_runtime_refuses_a_library_for_another_target(gpt_tvm, tmp_path):
    *_, out_dir, _, _, _ = gpt_tvm
    copy = tmp_path / "copy"
    shutil.copytree(out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"][0]["artifact"]["target"] = json.dumps({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="compiled for TVM target.*aarch64"):
        edgeplan.runtime.load(copy)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_missing_tvm_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm raises ImportError
    torch.manual_seed(0)
    with pytest.raises(ArtifactError, match=r"TVM is not installed; install it with `pip install 'edgeplan\[tvm\]'"):
        edgeplan.compile(Tiny().eval(), (torch.randn(2, 16),), fleet="pi-cluster", out_dir=tmp_path,
                         num_stages=1, time_limit_s=5, targets="tvm")
    # ONNX stages do not need TVM.
    edgeplan.compile(Tiny().eval(), (torch.randn(2, 16),), fleet="pi-cluster", out_dir=tmp_path,
                     num_stages=1, time_limit_s=5)
    assert read_manifest(tmp_path).stages[0].artifact.format == "onnx"


@pytest.mark.parametrize("options, reason", [
    ({"targets": "tflite"}, "targets 'tflite' is unknown"),
    ({"targets": "tvm", "tvm": TvmTarget(target="llvm -mcpu=cortex-a76")}, "TVM rejects the 'llvm -mcpu"),
    ({"targets": "tvm", "tvm": TvmTarget(schedule="fast")}, "schedule 'fast' is unknown"),
    ({"targets": "auto", "tvm": TvmTarget(target="aarch64")}, "needs the host TVM target"),
    ({"targets": "tvm", "tvm": TvmTarget(target="vulkan")}, "USE_VULKAN=ON"),
])
def test_bad_tvm_options_are_clear_errors(tvm_cache, tmp_path, options, reason):
    torch.manual_seed(0)
    with pytest.raises(ArtifactError, match=reason):
        edgeplan.compile(Tiny().eval(), (torch.randn(2, 16),), fleet="pi-cluster", out_dir=tmp_path,
                         num_stages=1, time_limit_s=5, **options)


def test_plans_without_runtime_fields_still_load(gpt_tvm):
    *_, out_dir, plan, _, _ = gpt_tvm
    data = plan.to_dict()
    for stage in data["stages"]:
        del stage["runtime"], stage["runtime_s"]
    assert [s.runtime for s in Plan.from_dict(data).stages] == ["onnxruntime", "onnxruntime"]


def test_tvm_session_module_imports_no_torch():
    code = ("import sys, edgeplan.runtime, edgeplan.runtime.tvm_session; "
            "bad = [m for m in ('torch', 'ortools', 'onnx', 'tvm') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_metaschedule_tunes_and_matches_torch(tvm_cache, tmp_path):
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 16)
    ticks = []
    plan = edgeplan.compile(model, (x,), fleet="pi-cluster", out_dir=tmp_path, num_stages=1, time_limit_s=5,
                            targets="tvm", tvm=TvmTarget(schedule="metaschedule", trials=8, cache=tvm_cache,
                                                         progress=lambda *tick: ticks.append(tick)))
    pipe = edgeplan.runtime.load(tmp_path)
    output = pipe.run({pipe.input_names[0]: x.numpy()})["output"]
    assert plan.stages[0].runtime == "tvm"
    assert np.abs(output - model(x).detach().numpy()).max() < TOLERANCE
    assert any(label.endswith("tuning") for _, _, label in ticks)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


PI_AND_BOX = """
name = "pi-and-box"
[[device]]
name = "pi"
preset = "raspberry-pi-5-8gb"
[[device]]
name = "box"
preset = "intel-n100-edge-box"
only_backends = ["cpu"]
"""


def test_fleet_target_builds_each_stage_for_its_backend(tvm_cache, tmp_path):
    """--tvm-target fleet: the Pi's stage is an aarch64 library (its preset says so), the x86
    box's cpu stage a host one; auto keeps ONNX Runtime where it cannot time the library."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(PI_AND_BOX)
    torch.manual_seed(0)
    model, x = TwoLayers().eval(), torch.randn(2, 16)
    out = tmp_path / "tvm"
    plan = edgeplan.compile(model, (x,), fleet=fleet, out_dir=out, num_stages=2, time_limit_s=5,
                            granularity="layer", targets="tvm", tvm=TvmTarget(target="fleet", cache=tvm_cache))
    machines = {s.device: elf_machine(out / s.artifact.path) for s in read_manifest(out).stages}
    assert [s.runtime for s in plan.stages] == ["tvm", "tvm"]
    assert machines["pi"] == EM_AARCH64 and machines["box"] not in (None, EM_AARCH64)

    auto = tmp_path / "auto"
    plan = edgeplan.compile(model, (x,), fleet=fleet, out_dir=auto, num_stages=2, time_limit_s=5,
                            granularity="layer", targets="auto", tvm=TvmTarget(target="fleet", cache=tvm_cache))
    by_device = {s.device: s for s in plan.stages}
    assert by_device["pi"].runtime == "onnxruntime" and "tvm" not in (by_device["pi"].runtime_s or {})
    assert set(by_device["box"].runtime_s) == {"onnxruntime", "tvm"}
    np.testing.assert_allclose(edgeplan.runtime.load(auto).run({"x": x.numpy()})[plan.outputs[0].name],
                               model(x).detach().numpy(), atol=TOLERANCE)


def test_fleet_target_needs_a_tvm_target_on_gpu_backends(tvm_cache, tmp_path):
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('name = "orin"\n[[device]]\nname = "orin"\npreset = "jetson-orin-nano-8gb"\n'
                     'only_backends = ["gpu"]\n')
    torch.manual_seed(0)
    with pytest.raises(ArtifactError, match="orin/gpu, a gpu backend whose fleet entry has no tvm_target"):
        edgeplan.compile(Tiny().eval(), (torch.randn(2, 16),), fleet=fleet, out_dir=tmp_path / "o",
                         num_stages=1, time_limit_s=5, targets="tvm", tvm=TvmTarget(target="fleet", cache=tvm_cache))
