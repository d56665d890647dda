"""Merge: share layers across the models of a workload (GEMEL, Padmanabhan et al., NSDI 2023).

Works on the models (torch side), before capture: models in, models with shared
submodules out. Needs a workload `{name: (model, example_inputs)}`; the merged workload
goes to `edgeplan.compile_workload`, where a shared submodule becomes one weight in the
graph, counted once per device by the partition and stored once per stage artifact.

Detection (`find_shareable_layers`): a layer is a leaf module with its own parameters or
buffers. Two layers of different models are architecturally identical when they have the
same module type, every hyperparameter (the module's plain attributes: channels, kernel,
stride, padding, groups, eps, ...) and the same parameter and buffer names, shapes and
dtypes. Layers of one signature are matched in module order (the k-th of each model), a
group per position. Each group records which members hold bitwise-equal weights
(`weight_classes`): equal members can share one copy at once, with bitwise-identical
outputs (`share_identical`); a group with different weights is a merge candidate that
needs retraining. Groups are ranked by memory saved, largest first, as GEMEL does.

Merge with retraining (`merge_models`): lossless shares first, then the candidates in
rank order: tie the group to one module (the first model's weights to start from),
fine-tune all models that hold merged layers jointly (sum of their losses, Adam), then
measure every model's metric; the merge is kept only if each model stays at or above
`budget` x its unmerged metric, otherwise the weights and sharing from before the merge
are restored (back-off). The MergeReport records every merge kept or rejected and why.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeplan.errors import MergeError

PLAIN_TYPES = (int, float, bool, str, type(None))

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class LayerRef:
    model: str
    path: str


@dataclass(frozen=True)
class LayerGroup:
    """Architecturally identical layers, one per model, and which of them are equal.

    weight_classes partitions member indices into sets with bitwise-equal parameters and
    buffers (one class: an exact, lossless merge).
    """

    kind: str
    signature: str
    layers: tuple[LayerRef, ...]
    param_bytes: int
    weight_classes: tuple[tuple[int, ...], ...]

    @property
    def identical(self) -> bool:
        return len(self.weight_classes) == 1

    @property
    def saved_bytes(self) -> int:
        """Bytes saved by merging every member into one copy."""
        return (len(self.layers) - 1) * self.param_bytes

    @property
    def lossless_saved_bytes(self) -> int:
        """Bytes saved by sharing only bitwise-equal members."""
        return sum(len(c) - 1 for c in self.weight_classes) * self.param_bytes

    def label(self) -> str:
        paths = dict.fromkeys(ref.path for ref in self.layers)
        where = next(iter(paths)) if len(paths) == 1 else "/".join(paths)
        return f"{where} ({self.kind}) x{len(self.layers)}"


def _own_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _is_layer(module: torch.nn.Module) -> bool:
    return not any(True for _ in module.children()) and bool(_own_tensors(module))


def layer_signature(module: torch.nn.Module) -> str:
    """Type, every hyperparameter and the weight shapes of a layer, as one string."""
    hyper = sorted((k, repr(v)) for k, v in vars(module).items()
                   if not k.startswith("_") and k != "training" and _plain(v))
    tensors = sorted((n, tuple(t.shape), str(t.dtype)) for n, t in _own_tensors(module))
    return f"{type(module).__module__}.{type(module).__qualname__}{hyper}{tensors}"


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, PLAIN_TYPES)


def _weights_digest(module: torch.nn.Module) -> str | None:
    """sha256 over the raw bytes of a layer's tensors; None on meta (no values to compare)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_own_tensors(module), key=lambda item: item[0]):
        if tensor.device.type == "meta":
            return None
        data = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _own_tensors(module))


def find_shareable_layers(models: Mapping[str, torch.nn.Module]) -> tuple[LayerGroup, ...]:
    """Groups of architecturally identical layers across models, largest saving first.

    A module object already shared by several models counts once (it is merged already).
    """
    seen: set[int] = set()
    by_signature: dict[str, dict[str, list[tuple[str, torch.nn.Module]]]] = {}
    for model_name, model in models.items():
        for path, module in model.named_modules():
            if not _is_layer(module) or id(module) in seen:
                continue
            seen.add(id(module))
            per_model = by_signature.setdefault(layer_signature(module), {})
            per_model.setdefault(model_name, []).append((path, module))
    groups = []
    for signature, per_model in by_signature.items():
        if len(per_model) < 2:
            continue
        for position in range(max(len(layers) for layers in per_model.values())):
            members = [(name, layers[position]) for name, layers in per_model.items() if position < len(layers)]
            if len(members) < 2:
                continue
            digests: dict[str, list[int]] = {}
            for index, (_name, (_path, module)) in enumerate(members):
                key = _weights_digest(module) or f"meta-{index}"
                digests.setdefault(key, []).append(index)
            first_module = members[0][1][1]
            groups.append(LayerGroup(
                kind=type(first_module).__name__, signature=signature,
                layers=tuple(LayerRef(name, path) for name, (path, _m) in members),
                param_bytes=_nbytes(first_module),
                weight_classes=tuple(tuple(c) for c in digests.values())))
    return tuple(sorted(groups, key=lambda g: (-g.saved_bytes, g.layers[0].path, g.layers[0].model)))


def _set_module(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, module)


def share(models: Mapping[str, torch.nn.Module], layers: Iterable[LayerRef]) -> int:
    """Make the given layers one module object (the first one's); returns bytes saved.

    Changes the models in place.
    """
    layers = list(layers)
    keep = models[layers[0].model].get_submodule(layers[0].path)
    distinct = {id(keep)}
    for ref in layers[1:]:
        current = models[ref.model].get_submodule(ref.path)
        distinct.add(id(current))
        _set_module(models[ref.model], ref.path, keep)
    return (len(distinct) - 1) * _nbytes(keep)


def _copy_workload(workload: Mapping) -> dict:
    """Deep copy of a workload in one go, so modules already shared stay shared."""
    _check_workload(workload)
    return copy.deepcopy(dict(workload))


def _check_workload(workload) -> None:
    if not isinstance(workload, Mapping) or not workload or not all(
            isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.nn.Module)
            for v in workload.values()):
        raise MergeError("merge: expected a workload dict {name: (nn.Module, example_inputs)}")


def share_identical(workload: Mapping) -> tuple[dict, tuple[LayerGroup, ...]]:
    """A copy of the workload where bitwise-equal layers of identical architecture are one
    module (lossless); returns it and the groups that were shared."""
    merged = _copy_workload(workload)
    models = {name: model for name, (model, _inputs) in merged.items()}
    shared = []
    for group in find_shareable_layers(models):
        for members in group.weight_classes:
            if len(members) > 1:
                share(models, [group.layers[i] for i in members])
                shared.append(group)
    return merged, tuple(dict.fromkeys(shared))


@dataclass(frozen=True)
class MergeRecord:
    """One merge tried: which layers, kept or not and why, and the metric of every model
    before (the unmerged baseline) and after (after fine-tuning, before any back-off)."""

    layers: tuple[LayerRef, ...]
    kind: str  # "identical" (lossless) or "retrained"
    kept: bool
    reason: str
    saved_bytes: int
    accuracy_before: tuple[tuple[str, float], ...]
    accuracy_after: tuple[tuple[str, float], ...]
    retrain_s: float
    label: str


@dataclass(frozen=True)
class MergeReport:
    records: tuple[MergeRecord, ...]
    budget: float
    baseline: tuple[tuple[str, float], ...]
    final: tuple[tuple[str, float], ...]
    unmerged_param_bytes: int
    merged_param_bytes: int
    retrain_s: float

    @property
    def kept(self) -> tuple[MergeRecord, ...]:
        return tuple(r for r in self.records if r.kept)

    @property
    def rejected(self) -> tuple[MergeRecord, ...]:
        return tuple(r for r in self.records if not r.kept)

    def format(self) -> str:
        """A table of every merge tried, then the accuracy of every model before and after."""
        lines = [f"{'merge':<44} {'kind':<9} {'kept':<4} {'saved KB':>9} {'retrain s':>9}  reason"]
        for r in self.records:
            lines.append(f"{r.label[:44]:<44} {r.kind:<9} {'yes' if r.kept else 'no':<4} "
                         f"{r.saved_bytes / 1e3:>9.1f} {r.retrain_s:>9.2f}  {r.reason}")
        baseline = dict(self.baseline)
        lines.append("")
        lines.append("accuracy: " + "  ".join(
            f"{name} {baseline[name]:.4f} -> {value:.4f}" for name, value in self.final))
        lines.append(f"parameters: {self.unmerged_param_bytes / 1e6:.3f} MB -> "
                     f"{self.merged_param_bytes / 1e6:.3f} MB "
                     f"({1 - self.merged_param_bytes / self.unmerged_param_bytes:.1%} less); kept "
                     f"{len(self.kept)}, rejected {len(self.rejected)}; retraining {self.retrain_s:.1f} s")
        return "\n".join(lines)


def distinct_param_bytes(models: Iterable[torch.nn.Module]) -> int:
    """Bytes of the distinct parameters and buffers of several models (shared ones once)."""
    tensors = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            tensors[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(tensors.values())


def _call(model: torch.nn.Module, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _fine_tune(models: Mapping[str, torch.nn.Module], loaders: Mapping[str, Iterable],
               loss_fns: Mapping[str, Callable], epochs: int, lr: float) -> None:
    """Joint fine-tuning: one Adam over the union of parameters, the sum of the losses."""
    parameters = list({id(p): p for m in models.values() for p in m.parameters()}.values())
    optimizer = torch.optim.Adam(parameters, lr=lr)
    for model in models.values():
        model.train()
    for _epoch in range(epochs):
        for batches in zip(*(loaders[name] for name in models)):
            optimizer.zero_grad()
            loss = sum(_loss(name, model, batch, loss_fns[name])
                       for (name, model), batch in zip(models.items(), batches))
            loss.backward()
            optimizer.step()
    for model in models.values():
        model.eval()


def _loss(name: str, model: torch.nn.Module, batch, loss_fn: Callable) -> torch.Tensor:
    try:
        inputs, targets = batch
        return loss_fn(_call(model, inputs), targets)
    except Exception as exc:  # the user's loader, model or loss: name the model once
        raise MergeError(
            f"merge: model {name!r} failed on a batch of train_loaders[{name!r}] "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); a loader "
            f"must yield (inputs, targets) with inputs as the model takes them") from exc


def _measure(models: Mapping[str, torch.nn.Module], metrics: Mapping[str, Callable]) -> dict[str, float]:
    scores = {}
    with torch.no_grad():
        for name, model in models.items():
            try:
                scores[name] = float(metrics[name](model.eval()))
            except Exception as exc:  # the user's metric: name the model once
                raise MergeError(
                    f"merge: metrics[{name!r}] failed ({exc.__class__.__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); a metric takes the model and "
                    f"returns a number, higher is better") from exc
    return scores


def merge_models(workload: Mapping, train_loaders: Mapping[str, Iterable],
                 metrics: Mapping[str, Callable[[torch.nn.Module], float]], budget: float = 0.99,
                 epochs: int = 2, lr: float = 1e-3, loss_fns: Mapping[str, Callable] | None = None,
                 max_candidates: int | None = None,
                 progress: Progress | None = None) -> tuple[dict, MergeReport]:
    """Merge layers across models, largest first, keeping a merge only within the accuracy budget.

    train_loaders[name] yields (inputs, targets) batches for model `name` (inputs as the
    model takes them: a tensor, tuple or dict); metrics[name](model) returns a score where
    higher is better (e.g. held-out accuracy); loss_fns[name](outputs, targets) defaults
    to cross-entropy. Each candidate is fine-tuned for `epochs` passes over the loaders
    (zipped: the shortest sets the length). `progress(done, total, label)` is called
    after each candidate. The given models are not changed; returns the merged workload
    (same example inputs) and the report.
    """
    if not 0 < budget <= 1:
        raise MergeError(f"merge: budget {budget} must be in (0, 1], e.g. 0.99 to keep 99% of "
                         f"each model's unmerged accuracy")
    merged = _copy_workload(workload)
    models = {name: model for name, (model, _inputs) in merged.items()}
    for what, given in (("train_loaders", train_loaders), ("metrics", metrics)):
        missing = [name for name in models if name not in given]
        if missing:
            raise MergeError(f"merge: {what} has no entry for model(s) {missing}; give one per "
                             f"model of the workload ({list(models)})")
    loss_fns = {name: (loss_fns or {}).get(name, F.cross_entropy) for name in models}
    unmerged_bytes = distinct_param_bytes(models.values())
    baseline = _measure(models, metrics)
    exact = []
    for group in find_shareable_layers(models):
        for members in group.weight_classes:
            if len(members) > 1:
                layers = tuple(group.layers[i] for i in members)
                label = group.label() if len(layers) == len(group.layers) else _subset_label(group, layers)
                exact.append((layers, share(models, layers), label))
    after_exact = tuple(_measure(models, metrics).items()) if exact else tuple(baseline.items())
    records = [MergeRecord(layers, "identical", True, "bitwise-equal weights", saved,
                           tuple(baseline.items()), after_exact, 0.0, label)
               for layers, saved, label in exact]
    candidates = [g for g in find_shareable_layers(models) if not g.identical]
    if max_candidates is not None:
        candidates = candidates[:max_candidates]
    total_retrain = 0.0
    for done, group in enumerate(candidates, start=1):
        members = group.layers
        while len(members) > 1:
            snapshot = copy.deepcopy(models)
            saved = share(models, members)
            trained = {name: model for name, model in models.items() if _holds_shared(model, models)}
            started = time.perf_counter()
            _fine_tune(trained, train_loaders, loss_fns, epochs, lr)
            seconds = time.perf_counter() - started
            total_retrain += seconds
            after = _measure(models, metrics)
            short = [(name, after[name], budget * baseline[name]) for name in models
                     if after[name] < budget * baseline[name]]
            label = group.label() if members == group.layers else _subset_label(group, members)
            if not short:
                records.append(MergeRecord(members, "retrained", True, f"every model >= {budget:g} x unmerged",
                                           saved, tuple(baseline.items()), tuple(after.items()), seconds, label))
                break
            worst = min(short, key=lambda item: item[1] - item[2])
            reason = (f"{worst[0]} {worst[1]:.4f} < {budget:g} x {baseline[worst[0]]:.4f}"
                      + (f" (+{len(short) - 1} more)" if len(short) > 1 else ""))
            records.append(MergeRecord(members, "retrained", False, reason, saved,
                                       tuple(baseline.items()), tuple(after.items()), seconds, label))
            models = snapshot  # back off: weights and sharing from before this merge
            # Retry without the models that fell short, while two or more members remain.
            failing = {name for name, _value, _need in short}
            rest = tuple(ref for ref in members if ref.model not in failing)
            members = rest if len(rest) < len(members) else ()
        if progress is not None:
            progress(done, len(candidates), group.label())
    final = _measure(models, metrics)
    result = {name: (models[name], inputs) for name, (_model, inputs) in merged.items()}
    report = MergeReport(tuple(records), budget, tuple(baseline.items()), tuple(final.items()),
                         unmerged_bytes, distinct_param_bytes(models.values()), total_retrain)
    return result, report


def _subset_label(group: LayerGroup, members: tuple[LayerRef, ...]) -> str:
    return f"{group.layers[0].path} ({group.kind}) {'+'.join(ref.model for ref in members)}"


def _holds_shared(model: torch.nn.Module, models: Mapping[str, torch.nn.Module]) -> bool:
    """Whether a model has a parameter that another model also holds."""
    mine = {id(p) for p in model.parameters()}
    return any(mine & {id(p) for p in other.parameters()} for other in models.values() if other is not model)


def text_progress(stream) -> Progress:
    """A progress bar on `stream` (e.g. sys.stderr) for `merge_models(progress=...)`."""
    def report(done: int, total: int, label: str) -> None:
        filled = int(30 * done / total) if total else 30
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {label[:40]:<40}")
        if done >= total:
            stream.write("\n")
        stream.flush()
    return report
