"""Compile driver, plan files, runtime checks and the CLI, on the GPT example."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, load_example

import edgeplan
from edgeplan.cli import main
from edgeplan.errors import ArtifactError, InputError, PlanError
from edgeplan.planner.plan import SCHEMA_VERSION, Plan


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    model, inputs = load_example("gpt").build(n_layer=4)
    plan = edgeplan.compile(model, inputs, fleet="home-lab", out_dir=out, time_limit_s=5)
    return out, plan, model, inputs


def fresh_copy(compiled, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(compiled[0], out)
    return out


def test_plan_round_trips_through_json(compiled):
    out, plan, _, _ = compiled
    loaded = Plan.from_json(out / "plan.json")
    assert loaded == plan
    assert loaded.costs == plan.costs
    assert loaded.to_dict() == json.loads(plan.to_json())
    assert plan.solver.status == "OPTIMAL" and plan.solver.gap == 0.0


def test_plan_rejects_other_schema_and_garbage(compiled, tmp_path):
    data = compiled[1].to_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(PlanError, match="schema version"):
        Plan.from_dict(data)
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(bad)
    with pytest.raises(PlanError, match="no such file"):
        Plan.from_json(tmp_path / "missing.json")


def test_manifest_records_hashes_and_verified_error(compiled):
    out, plan, _, _ = compiled
    manifest = edgeplan.runtime.read_manifest(out)
    assert len(manifest.stages) == len(plan.stages)
    for stage in manifest.stages:
        assert len(stage.artifact.sha256) == 64
        assert stage.verified_max_abs_error is not None and stage.verified_max_abs_error < 1e-4


def test_edited_plan_is_replayed(compiled, tmp_path):
    out, plan, model, inputs = compiled
    data = plan.to_dict()
    # Move every unit onto two stages on fixed devices, as a user editing the file would.
    unit_count = len(plan.units)
    first, second = dict(data["stages"][0]), dict(data["stages"][0])
    first.update(index=0, device="n100-box", backend="cpu", unit_start=0, unit_end=3)
    second.update(index=1, device="pi5", backend="cpu", unit_start=3, unit_end=unit_count)
    data["stages"] = [first, second]
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    replayed = edgeplan.compile(model, inputs, fleet="home-lab", out_dir=tmp_path / "out",
                                plan_from=edited)
    assert [(s.device, s.unit_start, s.unit_end) for s in replayed.stages] == [
        ("n100-box", 0, 3), ("pi5", 3, unit_count)]
    assert replayed.solver.status == "GIVEN"
    pipe = edgeplan.runtime.load(tmp_path / "out")
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).numpy()
    assert np.abs(pipe.run({"input_ids": ids.numpy()})["output"] - expected).max() < 1e-4


def test_replay_rejects_unknown_device_and_other_model(compiled, tmp_path):
    _, plan, model, inputs = compiled
    data = plan.to_dict()
    data["stages"][0]["device"] = "toaster"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="toaster.*does not have"):
        edgeplan.compile(model, inputs, fleet="home-lab", plan_from=path)
    other, other_inputs = load_example("gpt").build(n_layer=6)
    with pytest.raises(PlanError, match="made for .* units, this model has"):
        edgeplan.compile(other, other_inputs, fleet="home-lab", plan_from=plan)


def test_runtime_checks_inputs(compiled):
    out, _, _, inputs = compiled
    pipe = edgeplan.runtime.load(out)
    ids = inputs["input_ids"].numpy()
    with pytest.raises(InputError, match=r"missing \['input_ids'\], unexpected \['ids'\]"):
        pipe.run({"ids": ids})
    with pytest.raises(InputError, match=r"dtype int32.*astype\(np.int64\)"):
        pipe.run({"input_ids": ids.astype(np.int32)})
    with pytest.raises(InputError, match=r"shape \[3, 32\].*k\*2, 32"):
        pipe.run({"input_ids": np.zeros((3, 32), dtype=np.int64)})
    with pytest.raises(InputError, match=r"shape \[2, 31\]"):
        pipe.run({"input_ids": ids[:, :31]})


def test_runtime_rejects_missing_and_corrupt_artifacts(compiled, tmp_path):
    out = fresh_copy(compiled, tmp_path)
    stage = out / "stage_1.onnx"
    data = bytearray(stage.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stage.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"stage 1 .*corrupt: sha256"):
        edgeplan.runtime.load(out)
    stage.unlink()
    with pytest.raises(ArtifactError, match=r"stage 1 .*is missing"):
        edgeplan.runtime.load(out)
    with pytest.raises(ArtifactError, match="no manifest here"):
        edgeplan.runtime.load(tmp_path)


def test_runtime_imports_neither_torch_nor_ortools():
    code = ("import sys, edgeplan.runtime; "
            "print(sorted(m for m in ('torch', 'ortools') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_meta_model_plans_but_does_not_emit(tmp_path):
    model, inputs = load_example("llama_hf").build(device="meta", num_hidden_layers=4)
    plan = edgeplan.compile(model, inputs, fleet="pi-cluster", time_limit_s=5)
    assert len(plan.units) >= 6 and plan.stages
    with pytest.raises(ArtifactError, match="meta device.*--plan-only"):
        edgeplan.compile(model, inputs, fleet="pi-cluster", out_dir=tmp_path, time_limit_s=5)


def test_model_too_big_says_how_many_bytes_are_missing():
    model, inputs = load_example("gpt").build(device="meta", n_layer=40, d_model=4096, n_head=32, vocab=32000)
    with pytest.raises(PlanError, match=r"at least 5363630080 bytes .* short overall.*add devices"):
        edgeplan.compile(model, inputs, fleet="pi-cluster", time_limit_s=5)


def test_training_mode_needs_more_memory(compiled):
    _, plan, model, inputs = compiled
    training = edgeplan.compile(model, inputs, fleet="home-lab", mode="training", time_limit_s=5)
    assert training.costs.memory_sum_bytes.sum() > 4 * plan.costs.memory_sum_bytes.sum()


def test_latency_objective_never_slower_end_to_end(compiled):
    _, plan, model, inputs = compiled
    latency = edgeplan.compile(model, inputs, fleet="home-lab", objective="latency", time_limit_s=5)
    assert latency.latency_s <= plan.latency_s + 1e-9
    assert plan.bottleneck_s <= latency.bottleneck_s + 1e-9


def test_cli_compile_inspect_run(tmp_path, capsys):
    out = tmp_path / "gpt"
    assert main(["compile", str(ROOT / "examples/gpt.py:build"), "--fleet", "jetson-cluster",
                 "-o", str(out), "--stages", "2", "--time-limit", "5"]) == 0
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "orin-nano" in table and "*" in table and "gap" in table and "|ORT-torch|" in table
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema_version"] == SCHEMA_VERSION
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input_ids=np.random.default_rng(0).integers(0, 512, (4, 32)))
    assert main(["run", str(out), "--inputs", str(inputs), "-o", str(tmp_path / "y.npz")]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "measured ms" in shown and "runs.jsonl" in shown
    with np.load(tmp_path / "y.npz") as outputs:
        assert outputs["output"].shape == (4, 32, 512)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["compile", "examples/nope.py:build", "-o", str(tmp_path)]) == 2
    assert main(["compile", str(ROOT / "examples/gpt.py:build"), "--fleet", "nowhere", "-o", str(tmp_path)]) == 2
    assert main(["inspect", str(tmp_path / "none")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("edgeplan: error:") for line in errors)
    assert "no file" in errors[0] and "nowhere" in errors[1]


def test_cli_plan_only_on_meta(tmp_path, capsys):
    out = tmp_path / "big"
    spec = f"{ROOT / 'examples/llama_hf.py'}:build_7b"
    assert main(["compile", spec, "--fleet", "edge-8", "-o", str(out), "--plan-only", "--time-limit", "3"]) == 0
    assert (out / "plan.json").is_file() and not (out / "manifest.json").exists()
    plan = Plan.from_json(out)
    assert sum(s.param_bytes for s in plan.stages) >= 26e9


def test_sessions_run_once_on_zeros_when_opened(compiled, monkeypatch):
    """A session's first run pays for its buffers and thread pool (1.6x a warm run here);
    open_session pays it on zeros so that no measured microbatch does."""
    from edgeplan.runtime import session as session_module
    from edgeplan.runtime.manifest import read_manifest

    out = compiled[0]
    calls = []
    real_run = session_module.StageSession.run

    def recording_run(self, feeds):
        calls.append((self.stage.index, {name: (a.shape, a.dtype, bool(a.any())) for name, a in feeds.items()}))
        return real_run(self, feeds)

    monkeypatch.setattr(session_module.StageSession, "run", recording_run)
    manifest = read_manifest(out)
    edgeplan.runtime.load(out)
    assert calls == [(s.index, {t.name: (tuple(t.shape), np.dtype(t.dtype), False) for t in s.inputs})
                     for s in manifest.stages]
    calls.clear()
    session_module.open_session(out, manifest.stages[0], warm_up=False)
    assert calls == []

    def failing_run(self, feeds):
        raise session_module.StageError("zeros are not a valid input here")

    monkeypatch.setattr(session_module.StageSession, "run", failing_run)
    assert session_module.open_session(out, manifest.stages[0]).stage.index == 0  # warm-up skipped
