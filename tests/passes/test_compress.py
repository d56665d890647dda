"""Compression: codec measurements per cut, the budget, and codecs applied by the runtime."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ROOT, load_example
from torch import nn

import edgeplan
from edgeplan.errors import PlanError
from edgeplan.passes.annotate import annotate
from edgeplan.passes.capture import capture
from edgeplan.passes.compress import codec_time_scale, measure_cuts, offer_codecs
from edgeplan.passes.units import group_units
from edgeplan.planner.plan import Plan

SLOW_FLEET = "pi-pair-slow-link"  # 2 Pis, 20 Mbit/s


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(256, 256), nn.Linear(256, 10)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


@pytest.fixture(scope="module")
def two_layer_cuts():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    batch = (torch.randn(64, 256),)
    gm = annotate(capture(model, batch))
    units = group_units(gm)
    return units, measure_cuts(gm, units, [batch])


def test_measurements_per_codec(two_layer_cuts):
    units, cuts = two_layer_cuts
    assert len(units) == 2 and len(cuts) == 1
    cut = cuts[0]
    raw = cut.get("raw")
    assert raw.raw_bytes == 64 * 256 * 4 and raw.output_error == 0.0 and raw.agreement == 1.0
    assert cut.get("raw+zstd").output_error == 0.0
    int8 = cut.get("int8")
    assert int8.ratio >= 3.9
    assert 0 < int8.boundary_error < 0.01 and int8.output_error < 0.01
    fp16 = cut.get("fp16")
    assert fp16.boundary_error < 1e-3 and 1.9 < fp16.ratio <= 2.0
    # Fewer bits, more error: int2 > int4 > int8 > fp16.
    errors = [cut.get(name).output_error for name in ("fp16", "int8", "int4", "int2")]
    assert errors == sorted(errors)
    assert all(m.encode_s > 0 and m.decode_s > 0 for m in cut.codecs)


def test_budget_and_dominance(two_layer_cuts):
    units, cuts = two_layer_cuts
    from edgeplan.planner.cost import RooflineCostModel
    from edgeplan.planner.fleet import load_fleet

    tables = RooflineCostModel().costs(units, load_fleet("pi-cluster"))
    loose = offer_codecs(tables, cuts, max_error=1.0)
    tight = offer_codecs(tables, cuts, max_error=1e-3)
    names = loose.codec_names
    assert names[0] == "raw" and tight.codec_allowed[0, 0]
    allowed_tight = {n for n, ok in zip(names, tight.codec_allowed[0]) if ok}
    assert "int2" not in allowed_tight and "int4" not in allowed_tight
    for name, ok in zip(names, tight.codec_allowed[0]):
        if ok:
            assert cuts[0].get(name).output_error <= 1e-3
    # Everything within budget is offered unless another codec is smaller and faster.
    wire, enc, dec = loose.codec_wire_bytes[0], loose.codec_encode_s[0], loose.codec_decode_s[0]
    for c, ok in enumerate(loose.codec_allowed[0]):
        if not ok:
            assert any((wire <= wire[c]) & (enc <= enc[c]) & (dec <= dec[c]) & loose.codec_allowed[0])


def test_slow_link_compresses_and_runtime_applies_the_codec(tmp_path):
    fleet = SLOW_FLEET
    model, inputs = load_example("gpt").build(batch=8)
    calibration = [{"input_ids": torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(i))}
                   for i in range(3)]
    raw = edgeplan.compile(model, inputs, fleet=fleet, num_stages=2, time_limit_s=5)
    plan = edgeplan.compile(model, inputs, fleet=fleet, out_dir=tmp_path / "out", num_stages=2,
                            max_error=0.02, calibration_inputs=calibration, time_limit_s=5)
    boundary = plan.stages[0].boundary
    assert boundary.codec != "raw" and boundary.ratio > 3.5
    assert boundary.output_error <= 0.02
    assert plan.bottleneck_s < raw.bottleneck_s / 3
    manifest = edgeplan.runtime.read_manifest(tmp_path / "out")
    assert manifest.stages[0].codec == boundary.codec

    # The runtime encodes and decodes: on a calibration batch the output error is what
    # the compressor measured there (same data, same quantization).
    pipe = edgeplan.runtime.load(tmp_path / "out")
    batch = calibration[0]["input_ids"]
    outputs = pipe.run({"input_ids": batch.numpy()})["output"].astype(np.float64)
    with torch.no_grad():
        expected = model(input_ids=batch).double().numpy()
    error = np.linalg.norm(outputs - expected) / np.linalg.norm(expected)
    assert 0 < error <= 0.02 + 1e-4

    # The plan replays with its codec, and an emulated run is paced by the link.
    replayed = edgeplan.compile(model, inputs, fleet=fleet, plan_from=Plan.from_json(tmp_path / "out"),
                                calibration_inputs=calibration)
    assert replayed.stages[0].boundary.codec == boundary.codec
    emulated = edgeplan.runtime.load(tmp_path / "out", emulate_links=True)
    emulated.run({"input_ids": np.concatenate([batch.numpy()] * 4)})
    assert emulated.last_stats.link_mean_s[0] >= boundary.link_s * 0.9


def test_codec_times_scale_to_each_device(monkeypatch):
    """Codec times are measured on the host; the plan charges the sender's encode and the
    receiver's decode at host speed / that device's codec_gbs."""
    from edgeplan.planner import compile as compile_module
    from edgeplan.planner.fleet import Fleet, Link, preset_device

    monkeypatch.setattr(compile_module, "reference_gbs", lambda: 1.4)  # this host's figure
    fleet = Fleet("pair", (preset_device("raspberry-pi-5-8gb", "a", codec_gbs=0.7),
                           preset_device("raspberry-pi-5-8gb", "b", codec_gbs=3.5)),
                  default_link=Link("*", "*", 2.5e6, 0.002))
    torch.manual_seed(0)
    batch = (torch.randn(64, 256),)
    state = compile_module.run_passes(compile_module.Compilation(
        model=TwoLayers().eval(), example_inputs=batch, fleet=fleet, options=compile_module.CompileOptions(
            num_stages=2, max_error=0.05, time_limit_s=5), out_dir=None))
    assert state.tables.codec_time_scale == pytest.approx([2.0, 0.4])
    first, second = state.plan.stages
    measured = state.cuts[0].get(first.boundary.codec)
    scale = {"a": 2.0, "b": 0.4}
    assert first.boundary.encode_s == pytest.approx(measured.encode_s * scale[first.device])
    assert first.boundary.decode_s == pytest.approx(measured.decode_s * scale[second.device])

    def not_needed():
        raise AssertionError("no device states codec_gbs: the host need not be measured")

    plain = Fleet("pair", (dataclasses.replace(fleet.devices[0], codec_gbs=None),
                           dataclasses.replace(fleet.devices[1], codec_gbs=None)))
    assert codec_time_scale(plain, ("b", "a"), not_needed).tolist() == [1.0, 1.0]
    assert codec_time_scale(fleet, ("b", "a"), lambda: 1.4) == pytest.approx([0.4, 2.0])


def test_meta_weights_cannot_be_calibrated():
    model, inputs = load_example("gpt").build(device="meta")
    with pytest.raises(PlanError, match="meta device.*--max-error"):
        edgeplan.compile(model, inputs, fleet="pi-cluster", max_error=0.01)


def test_cli_max_error_and_emulated_run(tmp_path, capsys):
    from edgeplan.cli import main

    out = tmp_path / "resnet"
    assert main(["compile", str(ROOT / "examples/resnet.py:build"), "--fleet", SLOW_FLEET, "-o", str(out),
                 "--stages", "2", "--max-error", "0.01", "--time-limit", "5"]) == 0
    table = capsys.readouterr().out
    assert "codec" in table and "agree" in table and "--max-error 0.01" in table
    inputs = tmp_path / "x.npz"
    np.savez(inputs, pixels=np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    assert main(["run", str(out), "--inputs", str(inputs), "--emulate-links"]) == 0
    assert "emulated link ms/microbatch" in capsys.readouterr().out
