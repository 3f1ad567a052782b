"""``digits_logreg``: multinomial logistic regression with L2 on the digits.

Convex, trained to convergence in float64 by full-batch L-BFGS with tight tolerances, so
the optimum is unique, leave-one-out retraining is well defined, and its tiny effects
(about 1/n of a margin) stand above numerical noise (Koh & Liang 2017, Fig. 2).
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.digits import DigitsTask


class DigitsLogReg(DigitsTask):
    """Logistic regression ``x -> W x + b`` (see module docstring).

    Args:
        optim: L-BFGS keyword arguments (``max_iter``, ``tolerance_grad``,
            ``tolerance_change``, ``history_size``, ``lr``); ``epochs`` counts L-BFGS calls.
        **task: see :class:`~tasks.digits.DigitsTask`.
    """

    VERSION = 1
    convex = True
    dtype = torch.float64
    optimizer = "lbfgs"
    precision = "64-true"

    def __init__(self, **task):
        task.setdefault("batch_size", 100_000)  # full batch
        super().__init__(**task)

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Linear(64, 10).to(self.dtype)
