"""``digits_mlp``: a small ReLU MLP on the digits, trained with SGD.

Non-convex, so its ground truth is LDS (Park et al. 2023), not leave-one-out. SGD with a
constant learning rate (momentum configurable) makes TracIn's learning-rate weighting apply.
"""

from __future__ import annotations

from torch import nn

from estimators.options import OptionError, literal, positive
from tasks.digits import DigitsTask
from tasks.supervised import relu_mlp


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
        return relu_mlp([64, *self.hidden, 10], seed, self.dtype)
