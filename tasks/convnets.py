"""Convolutional networks of the image tasks: a small CNN and the ResNet-9 of TRAK, dattri and
kronfluence.

Both are plain ``nn.Sequential`` s of ``Conv2d``/``Linear`` layers (what the gradient engine
tracks) and parameter-free modules. ``resnet9``'s batch norms are not attributed through (as
in kronfluence); they keep running statistics, so its retraining is not vectorised.
"""

from __future__ import annotations

from torch import Tensor, nn


def small_cnn(in_channels: int, size: tuple[int, int], channels: list[int], n_classes: int,
              flat_input: bool = False) -> nn.Sequential:
    """Images ``[B, C, H, W]`` (or flat ``[B, C·H·W]`` with ``flat_input``) -> logits
    ``[B, n_classes]``: per entry of ``channels`` a 3×3 convolution with stride 2 and padding
    1 (each halves the map, rounding up) and a ReLU, then a linear head over the flattened
    feature map. No batch norm, no dropout: copies train as one vectorised ensemble."""
    height, width = size
    layers: list[nn.Module] = [nn.Unflatten(1, (in_channels, height, width))] if flat_input \
        else []
    depth = in_channels
    for c in channels:
        layers += [nn.Conv2d(depth, c, 3, stride=2, padding=1), nn.ReLU()]
        depth, height, width = c, (height + 1) // 2, (width + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(depth * height * width, n_classes))


class Residual(nn.Module):
    """``x + module(x)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        return x + self.module(x)


class Scale(nn.Module):
    """Multiplies by a fixed number (ResNet-9's output scale 0.2)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


def _conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
             padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding,
                                   bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def resnet9(in_channels: int, n_classes: int, width: int = 64) -> nn.Sequential:
    """The ResNet-9 of TRAK's CIFAR examples (Park et al. 2023), dattri and kronfluence:
    conv-BN-ReLU blocks of widths w, 2w (5×5, stride 2), a residual pair at 2w, 4w, max-pool
    2, a residual pair at 4w, 2w (no padding), global max-pool, a linear head without bias,
    output × 0.2; ``width`` w = 64 is the original (2.27 M parameters). Needs images of at
    least 16×16."""
    w = int(width)
    return nn.Sequential(
        _conv_bn(in_channels, w),
        _conv_bn(w, 2 * w, kernel=5, stride=2, padding=2),
        Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
        _conv_bn(2 * w, 4 * w),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(_conv_bn(4 * w, 4 * w), _conv_bn(4 * w, 4 * w))),
        _conv_bn(4 * w, 2 * w, padding=0),
        nn.AdaptiveMaxPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(2 * w, n_classes, bias=False),
        Scale(0.2),
    )
