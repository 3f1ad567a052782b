"""``digits_mlp_noisy``: ``digits_mlp`` with a seeded fraction of training labels flipped.

The mislabel-detection benchmark of Koh & Liang (2017, §5.4) and Pruthi et al. (2020, §4):
rank training examples by self-influence ∇L(z_m)ᵀ H⁻¹ ∇L(z_m) and count how many flipped
labels the top of the ranking holds. Each flipped label is replaced by a different class
drawn uniformly; which ones are flipped depends only on ``noise_seed`` (and the split), and
the problem exposes them as ``problem.flipped_labels`` (bool ``[n_train]``). Queries keep
their true labels. Ground truth: LDS on the noisy training set, as for ``digits_mlp``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from estimators.options import bounded, natural
from estimators.problem import AttributionProblem, Checkpoint
from tasks.digits_mlp import DigitsMLP


def flip_labels(y: torch.Tensor, fraction: float, seed: int, n_classes: int = 10):
    """``(noisy labels, flipped mask)``: ``round(fraction · n)`` labels moved to another class."""
    gen = torch.Generator().manual_seed(seed)
    n_flip = int(round(fraction * len(y)))
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[torch.randperm(len(y), generator=gen)[:n_flip]] = True
    shift = torch.randint(1, n_classes, (len(y),), generator=gen)
    return torch.where(flipped, (y + shift) % n_classes, y), flipped


class DigitsMLPNoisy(DigitsMLP):
    """Digits MLP trained on labels of which ``noise`` are flipped (see module docstring).

    Args:
        noise: fraction of training labels flipped (0 to 1).
        noise_seed: which labels are flipped, and to what.
        **task: see :class:`~tasks.digits_mlp.DigitsMLP`.
    """

    VERSION = 1

    def __init__(self, noise: float = 0.1, noise_seed: int = 0, **task):
        super().__init__(**task)
        noise = bounded("noise", noise, 0.0, 1.0)
        noise_seed = natural("noise_seed", noise_seed)
        x, y = self.train_set.tensors
        noisy, self.flipped = flip_labels(y, float(noise), int(noise_seed))
        self.train_set = TensorDataset(x, noisy)

    def problem(self, model: nn.Module, checkpoints: list[Checkpoint]) -> AttributionProblem:
        problem = super().problem(model, checkpoints)
        problem.flipped_labels = self.flipped.clone()
        return problem
