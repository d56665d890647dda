"""Multi-model workloads: combining models, shared inputs and prefixes, shared-weight memory
accounting in the solvers, lossless merges end to end, plan round trip, CLI, digits example."""

import itertools
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import load_example
from onnx import numpy_helper
from torch import nn

import edgeplan
from edgeplan.cli import main
from edgeplan.errors import CaptureError, PlanError
from edgeplan.passes.annotate import annotate
from edgeplan.passes.capture import capture
from edgeplan.passes.dedup import dedup
from edgeplan.passes.merge import share_identical
from edgeplan.passes.partition import (
    StageAssignment,
    evaluate,
    partition,
    solve_dp,
    validate_assignment,
)
from edgeplan.passes.units import group_units
from edgeplan.planner.cost import CostTables, RooflineCostModel
from edgeplan.planner.fleet import load_fleet
from edgeplan.planner.plan import Plan
from edgeplan.planner.workload import combine_workload


class Tiny(nn.Module):
    def __init__(self, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 36, classes)

    def forward(self, pixels):
        return self.head(self.features(pixels).flatten(1))


CONV1_BYTES = (4 * 9 + 4) * 4


def tiny_workload() -> dict:
    """a and b take one input and hold bitwise-equal first convs; c takes another input."""
    a, b, c = Tiny(3, 0), Tiny(2, 1), Tiny(3, 2)
    b.features[0].load_state_dict(a.features[0].state_dict())
    pixels = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    other = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(6))
    return {"a": (a, {"pixels": pixels}), "b": (b, {"pixels": pixels}), "c": (c, {"pixels": other})}


def test_models_with_the_same_input_share_one_graph_input():
    workload = tiny_workload()
    _module, example, layout = combine_workload(workload)
    # "pixels" names two different tensors, so both graph inputs get the first model's name.
    assert list(example) == ["a_pixels", "c_pixels"]
    assert [m.inputs for m in layout.models] == [("a_pixels",), ("a_pixels",), ("c_pixels",)]
    equal_copy = {"x": (Tiny(3, 0), {"pixels": workload["a"][1]["pixels"].clone()}),
                  "y": (Tiny(3, 1), {"image": workload["c"][1]["pixels"]})}
    equal_copy["y"][0].forward = lambda image: equal_copy["y"][0].head(image.flatten(1).repeat(1, 4))
    _module, example, layout = combine_workload({**equal_copy, "z": workload["a"]})
    # Equal values under the same name are one input; a name used once stays as it is.
    assert list(example) == ["pixels", "image"] and layout.models[2].inputs == ("pixels",)


@pytest.mark.parametrize("workload, message", [
    ({"a-b": (nn.Linear(2, 2), (torch.zeros(1, 2),))}, "must be a Python identifier"),
    ({"training": (nn.Linear(2, 2), (torch.zeros(1, 2),))}, "reserved"),
    ({"a": nn.Linear(2, 2)}, r"must map to \(nn.Module, example_inputs\)"),
    ({"a": (nn.Linear(2, 2), (torch.zeros(1, 2),)), "b": (nn.Linear(2, 2), (torch.zeros(3, 2),))},
     "different batch sizes"),
    ({"a": (nn.Linear(2, 2), (torch.zeros(1, 3),))}, "failed on its example inputs"),
    ({}, "non-empty dict"),
])
def test_bad_workloads_are_named(workload, message):
    with pytest.raises(CaptureError, match=message):
        combine_workload(workload)


def _conv_count(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)


def test_dedup_computes_a_shared_prefix_once_and_reads_a_shared_weight_once():
    merged, _groups = share_identical(tiny_workload())
    module, example, _layout = combine_workload(merged)
    gm = capture(module, example)
    assert _conv_count(gm) == 6
    gm, weights, calls = dedup(gm)
    # b's first conv (and its relu) on the same input is a's: computed once.
    assert (weights, _conv_count(gm)) == (2, 5) and calls >= 2
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(targets) == len(set(targets)) == 3 * 6 - 2
    with torch.no_grad():
        expected = {name: model(**inputs) for name, (model, inputs) in merged.items()}
        produced = gm(*example.values())
    for tensor, name in zip(produced, ("a", "b", "c")):
        assert torch.equal(tensor, expected[name])


class InPlace(nn.Module):
    """Shares conv with another model; relu_ and add_ change values in place after it."""

    def __init__(self, conv: nn.Conv2d, offset: float):
        super().__init__()
        self.conv, self.relu, self.offset = conv, nn.ReLU(inplace=True), offset

    def forward(self, pixels):
        y = self.relu(self.conv(pixels))
        y.view(-1).add_(self.offset)  # through a view: the base changes too
        return y * 2


def test_dedup_never_merges_values_changed_in_place():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3)
    pixels = torch.randn(2, 1, 6, 6)
    workload = {"a": (InPlace(conv, 1.0), {"pixels": pixels}), "b": (InPlace(conv, 2.0), {"pixels": pixels})}
    module, example, _layout = combine_workload(workload)
    gm, _weights, _calls = dedup(capture(module, example))
    assert _conv_count(gm) == 2  # each conv output is changed in place: not one value
    with torch.no_grad():
        produced = gm(*example.values())
        for tensor, (model, inputs) in zip(produced, workload.values()):
            assert torch.equal(tensor, model(**inputs))


def test_lossless_merge_gives_bitwise_identical_outputs_and_stores_a_shared_weight_once(tmp_path):
    workload = tiny_workload()
    plans, outputs, stored = {}, {}, {}
    for merge in ("none", "identical"):
        out = tmp_path / merge
        plans[merge] = edgeplan.compile_workload(workload, fleet="home-lab", out_dir=out, merge=merge,
                                                 num_stages=1, time_limit_s=5)
        pipe = edgeplan.runtime.load(out)
        feeds = {"a_pixels": workload["a"][1]["pixels"].numpy(), "c_pixels": workload["c"][1]["pixels"].numpy()}
        outputs[merge] = pipe.run(feeds)
        initializers = onnx.load(out / "stage_0.onnx").graph.initializer
        stored[merge] = sum(numpy_helper.to_array(i).nbytes for i in initializers)
    # Merged: the stage file holds every distinct weight once. Unmerged, the exporter itself
    # folds bitwise-equal initializers into one, which the plan does not count on.
    assert stored["identical"] == plans["identical"].workload.param_bytes
    assert stored["none"] == plans["none"].workload.param_bytes - CONV1_BYTES
    assert list(outputs["none"]) == ["a", "b", "c"]
    for name, (model, inputs) in workload.items():
        assert np.array_equal(outputs["none"][name], outputs["identical"][name])
        np.testing.assert_allclose(outputs["identical"][name], model(**inputs).detach().numpy(), atol=1e-5)
    none, identical = plans["none"].workload, plans["identical"].workload
    assert none.param_bytes == none.unmerged_param_bytes == identical.unmerged_param_bytes
    assert identical.param_bytes == none.param_bytes - CONV1_BYTES
    assert identical.shared_weights == 2
    assert [(m.name, m.shared_bytes) for m in identical.models] == [("a", CONV1_BYTES), ("b", CONV1_BYTES), ("c", 0)]
    stage = plans["identical"].stages[0]
    assert stage.param_bytes == identical.param_bytes
    assert stage.memory_bytes == plans["identical"].costs.stage_memory(0, len(plans["identical"].units))


def test_shared_weight_counted_once_per_device_in_the_cost_tables():
    merged, _groups = share_identical(tiny_workload())
    module, example, _layout = combine_workload(merged)
    gm = annotate(capture(module, example))  # no dedup: a and b read the conv as two targets
    units = group_units(gm)
    tables = RooflineCostModel().costs(units, load_fleet("home-lab"))
    readers = tables.shared_weight_units
    assert readers.shape == (2, len(units)) and list(readers.sum(axis=1)) == [2, 2]
    assert sorted(tables.shared_weight_bytes) == [4 * 4, 4 * 9 * 4]
    count = len(units)
    assert tables.stage_memory(0, count) == (tables.memory_sum_bytes.sum() - CONV1_BYTES
                                             + tables.memory_max_bytes.max())
    first, second = np.flatnonzero(readers[0])
    assert tables.overcount_bytes(first, second) == 0  # the second reader is not in the range
    assert tables.overcount_bytes(first, second + 1) == CONV1_BYTES
    np.testing.assert_array_equal(
        tables.range_weight_bytes(),
        [[tables.memory_sum_bytes[i:j].sum() - tables.overcount_bytes(i, j) if i < j else
          tables.range_weight_bytes()[i, j] for j in range(count + 1)] for i in range(count + 1)])


def shared_tables(seed: int) -> CostTables:
    """A random chain with weights shared between units, on 1-3 devices."""
    rng = np.random.default_rng(seed)
    units, devices = int(rng.integers(2, 7)), int(rng.integers(1, 4))
    shared = int(rng.integers(1, 4))
    readers = np.zeros((shared, units), dtype=bool)
    for w in range(shared):
        readers[w, rng.choice(units, size=int(rng.integers(2, units + 1)), replace=False)] = True
    shared_bytes = rng.integers(5, 40, size=shared) * 1_000_000
    own = rng.integers(1, 30, size=units) * 1_000_000
    memory_sum = own + shared_bytes @ readers.astype(np.int64)
    peak = rng.integers(1, 5, size=units) * 1_000_000
    union = int(own.sum() + shared_bytes.sum() + peak.max())
    memory = (rng.uniform(0.3, 1.1, size=devices) * union).astype(np.int64)
    bandwidth = np.full((devices, devices), 1e8)
    np.fill_diagonal(bandwidth, np.inf)
    latency = np.full((devices, devices), 1e-3)
    np.fill_diagonal(latency, 0.0)
    return CostTables(
        unit_names=tuple(f"u{i}" for i in range(units)),
        device_names=tuple(f"d{d}" for d in range(devices)),
        slots=tuple((f"d{d}", "cpu") for d in range(devices)),
        compute_s=rng.uniform(1e-3, 1e-2, size=(units, 1)) / rng.uniform(0.5, 2.0, size=(1, devices)),
        memory_sum_bytes=memory_sum.astype(np.int64), memory_max_bytes=peak.astype(np.int64),
        cut_bytes=rng.integers(1, 20, size=units - 1) * 100_000, device_memory_bytes=memory,
        link_latency_s=latency, link_bandwidth=bandwidth, slot_device=np.arange(devices),
        shared_weight_bytes=shared_bytes.astype(np.int64), shared_weight_units=readers)


def brute_force(tables: CostTables) -> float:
    units, devices = len(tables.unit_names), len(tables.device_names)
    best = np.inf
    for count in range(1, min(units, devices) + 1):
        for cuts in itertools.combinations(range(1, units), count - 1):
            bounds = (0, *cuts, units)
            for order in itertools.permutations(range(devices), count):
                stages = [StageAssignment(d, a, b) for d, a, b in zip(order, bounds, bounds[1:])]
                try:
                    validate_assignment(tables, stages)
                except PlanError:
                    continue
                best = min(best, evaluate(tables, stages).bottleneck_s)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_solvers_count_shared_weights_once_and_match_brute_force(seed):
    tables = shared_tables(seed)
    expected = brute_force(tables)
    dp = [solve_dp(tables, order) for order in itertools.permutations(range(len(tables.device_names)))]
    dp_best = min((r.value_s for r in dp if r is not None), default=np.inf)
    assert dp_best == pytest.approx(expected, rel=1e-9) or dp_best == expected == np.inf
    if not np.isfinite(expected):
        with pytest.raises(PlanError):
            partition(tables, time_limit_s=5, workers=1)
        return
    result = partition(tables, time_limit_s=5, workers=1)
    assert result.value_s == pytest.approx(expected, rel=1e-4)


def test_one_device_fits_only_when_a_shared_weight_counts_once():
    tables = shared_tables(0)
    union = tables.stage_memory(0, len(tables.unit_names))
    naive = int(tables.memory_sum_bytes.sum() + tables.memory_max_bytes.max())
    # CP-SAT rounds each unit's and each shared weight's bytes up to 1 KiB: leave that slack.
    slack = 1024 * (len(tables.unit_names) + len(tables.shared_weight_bytes) + 1)
    assert naive > union + slack
    one = CostTables(**{**{f: getattr(tables, f) for f in tables.__dataclass_fields__},
                        "device_names": ("d0",), "slots": (("d0", "cpu"),),
                        "compute_s": tables.compute_s[:, :1], "slot_device": np.array([0]),
                        "device_memory_bytes": np.array([union + slack]), "link_latency_s": np.zeros((1, 1)),
                        "link_bandwidth": np.full((1, 1), np.inf), "join_s": tables.join_s[:, :1]})
    assert partition(one, time_limit_s=5, workers=1).stages == (StageAssignment(0, 0, len(tables.unit_names)),)
    short = CostTables(**{**{f: getattr(one, f) for f in one.__dataclass_fields__},
                          "device_memory_bytes": np.array([union - 1])})
    with pytest.raises(PlanError, match="1 bytes"):
        partition(short, time_limit_s=5, workers=1)


def test_plan_round_trip_keeps_the_workload_and_old_plans_still_load(tmp_path):
    plan = edgeplan.compile_workload(tiny_workload(), fleet="home-lab", num_stages=1, time_limit_s=5)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    loaded = Plan.from_json(path)
    assert loaded.workload == plan.workload and loaded.costs == plan.costs
    data = json.loads(path.read_text())
    for key in ("shared_weight_bytes", "shared_weight_units"):
        del data["costs"][key]
    del data["workload"]
    old = Plan.from_dict(data)
    assert old.workload is None and old.costs.shared_weight_units.shape == (0, len(plan.units))


FACTORY = '''
import torch
from test_multi_model import tiny_workload

def build():
    return tiny_workload()
'''


def test_cli_compiles_a_workload_factory_and_inspect_shows_per_model_memory(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    factory = tmp_path / "workload_factory.py"
    factory.write_text(FACTORY)
    out = tmp_path / "out"
    assert main(["compile", f"{factory}:build", "-o", str(out), "--stages", "1", "--time-limit", "5"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    plan = Plan.from_json(out)
    assert f"{plan.workload.unmerged_param_bytes / 1e6:.3f} MB of weights on their own" in text
    assert "2 weight tensor(s) shared across models" in text
    row = next(line for line in text.splitlines() if line.startswith("b "))
    assert row.split()[1:] == ["a_pixels", "b", f"{plan.workload.models[1].param_bytes / 1e6:.3f}",
                               f"{CONV1_BYTES / 1e6:.3f}",
                               f"{(plan.workload.models[1].param_bytes - CONV1_BYTES) / 1e6:.3f}"]
    assert main(["compile", f"{factory}:build", "-o", str(tmp_path / "none"), "--stages", "1",
                 "--merge", "none", "--time-limit", "5"]) == 0
    assert Plan.from_json(tmp_path / "none").workload.shared_weights == 0


def test_digits_example_shares_the_backbone_convolutions(tmp_path):
    digits = load_example("digits")
    data = digits.load_data()
    models = digits.train_models(data, epochs=2)
    for name in ("parity", "high"):
        assert all(torch.equal(p, q) for p, q in zip(models[name].features.parameters(),
                                                     models["digit"].features.parameters()))
    assert not torch.equal(models["rotated"].features[0].weight, models["digit"].features[0].weight)
    workload = digits.workload_of(models, data)
    plan = edgeplan.compile_workload(workload, fleet="home-lab", out_dir=tmp_path, num_stages=1, time_limit_s=5)
    conv_bytes = sum(p.numel() * 4 for p in models["digit"].features.parameters())
    assert plan.workload.shared_weights == 6
    assert plan.workload.param_bytes == plan.workload.unmerged_param_bytes - 2 * conv_bytes
    pipe = edgeplan.runtime.load(tmp_path)
    outputs = pipe.run({"digit_pixels": workload["digit"][1]["pixels"].numpy(),
                        "rotated_pixels": workload["rotated"][1]["pixels"].numpy()})
    for name, (model, inputs) in workload.items():
        np.testing.assert_allclose(outputs[name], model(**inputs).detach().numpy(), atol=1e-4)


@pytest.mark.slow
def test_digits_merge_saves_60_percent_within_the_accuracy_budget():
    digits = load_example("digits")
    data = digits.load_data()
    models = digits.train_models(data)
    merged, report = digits.merge_workload(digits.workload_of(models, data), data)
    assert 1 - report.merged_param_bytes / report.unmerged_param_bytes >= 0.60
    baseline = dict(report.baseline)
    assert all(value >= 0.99 * baseline[name] for name, value in report.final)
    assert report.kept and report.rejected
