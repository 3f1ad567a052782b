"""``digits_mlp``: a small ReLU MLP on the digits, trained with SGD.

Non-convex, so its ground truth is LDS (Park et al. 2023), not leave-one-out. SGD with a
constant learning rate (momentum configurable) makes TracIn's learning-rate weighting apply.
"""

from __future__ import annotations

import torch
from torch import nn

from estimators.options import OptionError, literal, positive
from tasks.digits import DigitsTask


class DigitsMLP(DigitsTask):
    """A ``64 -> hidden -> ... -> 10`` ReLU MLP (see module docstring).

    Args:
        hidden: widths of the hidden layers.
        **task: see :class:`~tasks.digits.DigitsTask`.
    """

    VERSION = 1

    def __init__(self, hidden: list[int] | tuple[int, ...] = (64,), **task):
        super().__init__(**task)
        if isinstance(hidden, str | bytes) or not hasattr(hidden, "__iter__"):
            raise OptionError(f"{{hidden}} must be a list of layer widths such as [64], got "
                              f"{literal(hidden)}")
        self.hidden = [positive("hidden", h, integer=True) for h in hidden]

    def build_model(self, seed: int) -> nn.Module:
        widths = [64, *self.hidden, 10]
        layers: list[nn.Module] = []
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
                if i:
                    layers.append(nn.ReLU())
                layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers).to(self.dtype)  # the data's dtype, whatever the default
