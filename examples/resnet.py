"""A small ResNet-style CNN in plain PyTorch (CIFAR-sized input).

Stem (3x3 conv + BatchNorm + ReLU + max-pool), four stages of BasicBlocks held in one
`nn.Sequential` named `blocks` (so each residual block is one unit, `blocks.N`), then
adaptive average pooling, flatten and a linear head. The forward takes `pixels`
[batch, 3, H, W] and returns class logits [batch, num_classes].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual; a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem -> BasicBlock stages -> global average pool -> linear head."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                # The first block of every stage after the first halves the resolution.
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_ch, width, stride))
                in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(pixels))
        return self.head(self.flatten(self.pool(x)))


def _randomize_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine params and running stats.

    Fresh BatchNorm in eval mode is the identity (mean 0, var 1, weight 1, bias 0), which
    would hide bugs in how normalization is captured or folded.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)


def build(
    *,
    batch: int = 2,
    image_size: int = 32,
    widths: Sequence[int] = (16, 32, 64, 128),
    blocks_per_stage: int = 2,
    num_classes: int = 10,
    device: str = "cpu",
) -> tuple[ResNet, dict[str, torch.Tensor]]:
    """A ResNet in eval mode with seeded random weights and example `pixels`."""
    torch.manual_seed(0)
    with torch.device(device):
        model = ResNet(tuple(widths), blocks_per_stage, num_classes)
        pixels = torch.randn(batch, 3, image_size, image_size)
    if device != "meta":
        _randomize_batchnorm(model)
    return model.eval(), {"pixels": pixels}


if __name__ == "__main__":
    model, inputs = build()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**inputs)
    print(f"ResNet: {n_params:,} parameters, logits {tuple(logits.shape)}")
