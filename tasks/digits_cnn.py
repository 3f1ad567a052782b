"""``digits_cnn``: a small convolutional network on the 8×8 digits, trained with SGD.

The convolutional counterpart of ``digits_mlp``: the same split, objective, optimizer and
ground truth (LDS by vectorised retraining, PBRF), with every layer a ``Conv2d`` but the
classifier head, so K-FAC/EK-FAC factor convolutions over patches and positions (Grosse &
Martens 2016) and ``explicit`` still fits (1,898 parameters by default: 8×8 -> 8 channels at
4×4 -> 16 channels at 2×2 -> 10 logits). No batch norm and no dropout: retraining vectorises
(:mod:`tasks.ensemble`).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.convnets import small_cnn
from tasks.digits import DigitsTask


class DigitsCNN(DigitsTask):
    """A small CNN on the digits (see module docstring).

    Args:
        channels: output channels of the 3×3 stride-2 convolutions (8×8 -> 4×4 -> 2×2).
        **task: see :class:`~tasks.digits.DigitsTask`.
    """

    VERSION = 1

    def __init__(self, channels: list[int] | tuple[int, ...] = (8, 16), **task):
        super().__init__(**task)
        self.channels = [int(c) for c in channels]
        if not self.channels or min(self.channels) <= 0:
            raise ValueError(f"task.channels must be a non-empty list of positive widths, got "
                             f"{channels!r}")

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return small_cnn(1, (8, 8), self.channels, 10, flat_input=True).to(self.dtype)
