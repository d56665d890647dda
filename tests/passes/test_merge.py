"""Merge pass: layer detection on tiny hand-built models, lossless sharing, accuracy back-off."""

import pytest
import torch
from torch import nn

from edgeplan.errors import MergeError
from edgeplan.passes.merge import (
    LayerRef,
    distinct_param_bytes,
    find_shareable_layers,
    merge_models,
    share_identical,
)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny layers: a second intra-op thread only adds contention (16x slower on a busy box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear(seed: int, fan_in: int = 4, fan_out: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out)


class TwoLayers(nn.Module):
    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_identical_layers_form_one_lossless_group():
    a, b = _linear(0), _linear(0)
    groups = find_shareable_layers({"a": a, "b": b})
    assert len(groups) == 1
    group = groups[0]
    assert group.identical and group.weight_classes == ((0, 1),)
    assert group.layers == (LayerRef("a", ""), LayerRef("b", ""))
    assert group.param_bytes == (4 * 3 + 3) * 4
    assert group.saved_bytes == group.lossless_saved_bytes == (4 * 3 + 3) * 4


def test_same_architecture_different_weights_is_a_candidate():
    groups = find_shareable_layers({"a": _linear(0), "b": _linear(1), "c": _linear(0)})
    assert len(groups) == 1
    group = groups[0]
    assert not group.identical
    assert sorted(group.weight_classes) == [(0, 2), (1,)]
    assert group.saved_bytes == 2 * 60 and group.lossless_saved_bytes == 60


@pytest.mark.parametrize("other", [
    nn.Conv2d(2, 3, 3, stride=2),           # same weight shape, different stride
    nn.Conv2d(2, 3, 3, padding=1),          # same weight shape, different padding
    nn.Conv2d(2, 3, 3, dilation=2),         # same weight shape, different dilation
    nn.Conv2d(2, 3, 3, padding_mode="reflect", padding=1),
    nn.Conv2d(2, 3, 3, bias=False),          # a parameter fewer
    nn.Conv2d(2, 4, 3),                      # different shapes
    nn.ConvTranspose2d(3, 2, 3),             # different op, same weight element count
])
def test_different_hyperparameters_or_shapes_never_group(other):
    torch.manual_seed(0)
    base = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        for p, q in zip(base.parameters(), other.parameters()):
            if p.shape == q.shape:
                q.copy_(p)  # equal weights: only the architecture differs
    assert find_shareable_layers({"a": base, "b": other}) == ()


def test_different_shapes_and_dtypes_never_group():
    assert find_shareable_layers({"a": nn.Linear(4, 3), "b": nn.Linear(4, 5)}) == ()
    assert find_shareable_layers({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3).double()}) == ()


def test_groups_ranked_by_memory_saved_and_buffers_compared():
    big = [TwoLayers(_linear(s, 16, 16), nn.BatchNorm1d(16)) for s in (0, 0)]
    with torch.no_grad():
        big[1].second.running_mean.fill_(0.5)  # equal weights, different running stats
    groups = find_shareable_layers({"a": big[0], "b": big[1]})
    assert [g.kind for g in groups] == ["Linear", "BatchNorm1d"]
    assert [g.saved_bytes for g in groups] == [(16 * 16 + 16) * 4, (4 * 16) * 4 + 8]
    assert groups[0].identical and not groups[1].identical


def test_module_already_shared_is_not_a_candidate():
    shared = _linear(0)
    a, b = TwoLayers(shared, _linear(1, 3, 2)), TwoLayers(shared, _linear(2, 3, 2))
    groups = find_shareable_layers({"a": a, "b": b})
    assert [g.layers for g in groups] == [(LayerRef("a", "second"), LayerRef("b", "second"))]


def test_share_identical_is_bitwise_lossless_and_leaves_inputs_alone():
    a, b = TwoLayers(_linear(0), _linear(5, 3, 2)), TwoLayers(_linear(0), _linear(6, 3, 2))
    x = torch.randn(7, 4)
    workload = {"a": (a, (x,)), "b": (b, (x,))}
    merged, groups = share_identical(workload)
    ma, mb = merged["a"][0], merged["b"][0]
    assert ma.first is mb.first and ma.second is not mb.second
    assert a.first is not b.first  # the given models are untouched
    assert [g.layers for g in groups] == [(LayerRef("a", "first"), LayerRef("b", "first"))]
    assert distinct_param_bytes([ma, mb]) == distinct_param_bytes([a, b]) - (4 * 3 + 3) * 4
    for name, model in (("a", a), ("b", b)):
        assert torch.equal(merged[name][0](x), model(x))


# --- merge with retraining: tiny linear classifiers on a 2-d toy problem -------------------


def _data(seed: int, count: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 2, generator=generator)
    x = x + 0.3 * torch.sign(x)  # a margin around both axes
    return x


def _labels(task: str, x):
    return {"right": (x[:, 0] > 0), "left": (x[:, 0] <= 0), "up": (x[:, 1] > 0)}[task].long()


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _loaders_and_metrics(tasks: dict[str, str]):
    train, test = _data(0, 256), _data(1, 200)
    loaders = {name: [(train[i:i + 32], _labels(task, train[i:i + 32])) for i in range(0, 256, 32)]
               for name, task in tasks.items()}
    metrics = {name: (lambda m, task=task: _accuracy(m, test, _labels(task, test)))
               for name, task in tasks.items()}
    return loaders, metrics


def _trained_head(seed: int, task: str, loaders) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-2)
    for _ in range(10):
        for x, y in loaders:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def test_merge_backs_off_when_a_model_falls_below_budget_and_retries_without_it():
    # a and b solve the same task, c the opposite one: one shared layer cannot serve c too.
    tasks = {"a": "right", "b": "right", "c": "left"}
    loaders, metrics = _loaders_and_metrics(tasks)
    models = {name: _trained_head(seed, tasks[name], loaders[name]) for seed, name in enumerate(tasks)}
    baseline = {name: metrics[name](m) for name, m in models.items()}
    assert min(baseline.values()) > 0.95
    originals = {name: [p.detach().clone() for p in m.parameters()] for name, m in models.items()}
    workload = {name: (m, (torch.zeros(1, 2),)) for name, m in models.items()}

    merged, report = merge_models(workload, loaders, metrics, budget=0.95, epochs=2, lr=1e-2)

    assert [(r.kind, r.kept, tuple(ref.model for ref in r.layers)) for r in report.records] == [
        ("retrained", False, ("a", "b", "c")), ("retrained", True, ("a", "b"))]
    rejected = report.records[0]
    after = dict(rejected.accuracy_after)
    # The reason names a model that fell short, with its accuracy and the bound it missed.
    short = [n for n in tasks if after[n] < 0.95 * baseline[n]]
    assert short and rejected.reason.startswith(short[0] if len(short) == 1 else "")
    assert any(f"{n} {after[n]:.4f} < 0.95 x {baseline[n]:.4f}" in rejected.reason for n in short)
    ma, mb, mc = (merged[n][0] for n in tasks)
    assert ma[0] is mb[0] and mc[0] is not ma[0]
    # c was backed off to its weights from before the merge: bitwise unchanged.
    assert all(torch.equal(p, q) for p, q in zip(mc.parameters(), originals["c"]))
    final = dict(report.final)
    for name in tasks:
        assert final[name] == metrics[name](merged[name][0])
        assert final[name] >= 0.95 * baseline[name]
    assert report.unmerged_param_bytes == 3 * 24
    assert report.merged_param_bytes == 2 * 24 == distinct_param_bytes(m for m, _ in merged.values())
    assert report.records[1].saved_bytes == 24
    assert report.retrain_s == pytest.approx(sum(r.retrain_s for r in report.records))
    assert workload["a"][0][0] is not workload["b"][0][0]  # the given models are untouched


def test_merge_keeps_exact_shares_first_and_checks_its_inputs():
    tasks = {"a": "up", "b": "up"}
    loaders, metrics = _loaders_and_metrics(tasks)
    same = _trained_head(0, "up", loaders["a"])
    twin = _trained_head(0, "up", loaders["a"])  # same seed and data: bitwise-equal weights
    workload = {"a": (same, (torch.zeros(1, 2),)), "b": (twin, (torch.zeros(1, 2),))}
    merged, report = merge_models(workload, loaders, metrics, epochs=1)
    assert [(r.kind, r.kept, r.retrain_s) for r in report.records] == [("identical", True, 0.0)]
    assert report.final == report.baseline
    with pytest.raises(MergeError, match=r"metrics has no entry for model\(s\) \['b'\]"):
        merge_models(workload, loaders, {"a": metrics["a"]})
    with pytest.raises(MergeError, match="budget 1.5"):
        merge_models(workload, loaders, metrics, budget=1.5)
    with pytest.raises(MergeError, match=r"metrics\['b'\] failed \(ZeroDivisionError"):
        merge_models(workload, loaders, {**metrics, "b": lambda model: 1 / 0})
    different = {"a": (same, (torch.zeros(1, 2),)), "b": (_trained_head(1, "up", loaders["b"]), (torch.zeros(1, 2),))}
    bad_loaders = {**loaders, "b": [(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))]}
    with pytest.raises(MergeError, match=r"model 'b' failed on a batch of train_loaders\['b'\] \(RuntimeError"):
        merge_models(different, bad_loaders, metrics)
