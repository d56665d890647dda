"""Four small CNNs of one architecture on scikit-learn's 8x8 digits: a multi-model workload.

Tasks (models), all `DigitsCNN` with a different head size:
    digit    the digit class (10), trained from scratch: the common backbone
    parity   odd or even (2), fine-tuned from `digit` with its convolutions frozen
    high     digit >= 5 (2), fine-tuned from `digit` with its convolutions frozen
    rotated  the digit class of the image rotated by 90 degrees (10), fine-tuned from
             `digit`, every layer

So `digit`, `parity` and `high` hold bitwise-equal convolutions (exact, lossless merges)
and take the same input, while `rotated` takes another input and holds weights of its
own, as do the fine-tuned classifiers (merges that need retraining). Training is
deterministic (fixed seeds, fixed split) and takes a few seconds on a CPU; nothing is
cached on disk.

    edgeplan compile examples/digits.py:build_workload -o out/digits          # lossless merges
    edgeplan compile examples/digits.py:build_merged_workload -o out/digits-m  # + retrained merges
    python examples/digits.py                                                  # the merge report
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TASKS = {  # name -> (classes, rotated input)
    "digit": (10, False),
    "parity": (2, False),
    "high": (2, False),
    "rotated": (10, True),
}
BATCH = 64
TEST_FRACTION = 0.2


HIDDEN = (512, 256)


class DigitsCNN(nn.Module):
    """conv 1->8->16 (pool) ->32 (pool), then 128 -> hidden[0] -> hidden[1] -> classes.

    Small convolutions keep training fast; the fully connected layers hold most of the
    weights, as in the vision models GEMEL merges."""

    def __init__(self, num_classes: int, hidden: tuple[int, int] = HIDDEN):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
        )
        self.head = nn.Linear(hidden[1], num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier(self.features(pixels)))


@dataclass(frozen=True)
class DigitsData:
    """Images [N, 1, 8, 8] in [0, 1] and digit labels, split once with a fixed seed."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def task(self, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of one task on "train" or "test"."""
        x, y = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        return task_inputs(name, x), task_labels(name, y)


def task_inputs(name: str, pixels: torch.Tensor) -> torch.Tensor:
    return torch.rot90(pixels, 1, dims=(2, 3)).contiguous() if TASKS[name][1] else pixels


def task_labels(name: str, digits: torch.Tensor) -> torch.Tensor:
    if name == "parity":
        return digits % 2
    if name == "high":
        return (digits >= 5).long()
    return digits


def load_data(seed: int = 0) -> DigitsData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test = int(len(y) * TEST_FRACTION)
    return DigitsData(x[order[test:]], y[order[test:]], x[order[:test]], y[order[:test]])


class Batches:
    """Shuffled minibatches of (inputs, labels); every pass draws a new seeded order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = BATCH, seed: int = 0):
        self.x, self.y, self.batch = x, y, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch):
            index = order[start:start + self.batch]
            yield self.x[index], self.y[index]

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch)


@contextmanager
def one_thread():
    """Train with one intra-op thread: these layers are too small to gain from more, and on
    a busy machine extra threads made a training step 16x slower (25 vs 400 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(dim=1) == y).float().mean())


def _train(model: nn.Module, batches: Batches, epochs: int, lr: float = 2e-3) -> nn.Module:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def train_models(data: DigitsData | None = None, epochs: int = 12, seed: int = 0,
                 hidden: tuple[int, int] = HIDDEN) -> dict[str, DigitsCNN]:
    """The four unmerged models, trained deterministically (see module docstring)."""
    data = data or load_data(seed)
    with one_thread():
        return _train_all(data, epochs, seed, hidden)


def _train_all(data: DigitsData, epochs: int, seed: int, hidden: tuple[int, int]) -> dict[str, DigitsCNN]:
    torch.manual_seed(seed)
    digit = _train(DigitsCNN(10, hidden), Batches(*data.task("digit", "train"), seed=seed), epochs)
    models = {"digit": digit}
    backbone = {k: v for k, v in digit.state_dict().items() if not k.startswith("head.")}
    for offset, name in enumerate(("parity", "high", "rotated"), start=1):
        torch.manual_seed(seed + offset)
        model = DigitsCNN(TASKS[name][0], hidden)
        model.load_state_dict(backbone, strict=False)
        frozen = name != "rotated"
        model.features.requires_grad_(not frozen)
        models[name] = _train(model, Batches(*data.task(name, "train"), seed=seed + offset),
                              epochs // 2 if frozen else epochs)
        model.features.requires_grad_(True)
    return models


def workload_of(models: dict[str, nn.Module], data: DigitsData, batch: int = 8) -> dict:
    """{name: (model, {"pixels": ...})}: the first `batch` test images (rotated for `rotated`);
    the unrotated models get the same tensor, so they share one input."""
    pixels = data.test_x[:batch]
    rotated = task_inputs("rotated", pixels)
    return {name: (model, {"pixels": rotated if TASKS[name][1] else pixels}) for name, model in models.items()}


def build_workload(batch: int = 8, seed: int = 0) -> dict:
    """The unmerged workload (for `edgeplan compile`, which shares the exact layers)."""
    data = load_data(seed)
    return workload_of(train_models(data, seed=seed), data, batch)


def merge_inputs(data: DigitsData, seed: int = 0) -> tuple[dict, dict]:
    """(train_loaders, metrics) for `edgeplan.passes.merge.merge_models`."""
    loaders = {name: Batches(*data.task(name, "train"), seed=seed + 10 + i) for i, name in enumerate(TASKS)}
    metrics = {name: (lambda model, name=name: accuracy(model, *data.task(name, "test"))) for name in TASKS}
    return loaders, metrics


def merge_workload(workload: dict, data: DigitsData, seed: int = 0, epochs: int = 2, progress=None):
    """GEMEL merge of the four models: (merged workload, MergeReport)."""
    from edgeplan.passes.merge import merge_models

    torch.manual_seed(seed)
    loaders, metrics = merge_inputs(data, seed)
    with one_thread():
        return merge_models(workload, loaders, metrics, budget=0.99, epochs=epochs, progress=progress)


def build_merged_workload(batch: int = 8, seed: int = 0) -> dict:
    """The workload after merging with retraining (for `edgeplan compile ... --merge none`)."""
    data = load_data(seed)
    merged, _report = merge_workload(workload_of(train_models(data, seed=seed), data, batch), data, seed)
    return merged


if __name__ == "__main__":
    import time

    from edgeplan.passes.merge import text_progress

    started = time.perf_counter()
    data = load_data()
    models = train_models(data)
    print(f"trained 4 models in {time.perf_counter() - started:.1f} s; test accuracy: "
          + ", ".join(f"{n} {accuracy(m, *data.task(n, 'test')):.4f}" for n, m in models.items()))
    merged, report = merge_workload(workload_of(models, data), data, progress=text_progress(sys.stderr))
    print(report.format())
