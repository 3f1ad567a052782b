"""``random``: seeded Gaussian scores, the floor every leaderboard shows.

Any estimator whose metrics do not beat this row has found nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import Estimator
from estimators.problem import AttributionProblem


class RandomScores(Estimator):
    """I.i.d. standard normal scores ``[n_queries, n_train]`` from a seeded generator.

    Args:
        seed: the generator's seed (``${seed}`` in the config).
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def score(self, problem: AttributionProblem) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(problem.n_queries, problem.n_train, generator=gen)
