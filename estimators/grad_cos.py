"""``grad_cos``: cosine similarity of gradients.

    score(q, m) = −∇f(z_q) · ∇L(z_m) / (‖∇f(z_q)‖ ‖∇L(z_m)‖)

Unit normalisation removes the dominance of high-loss (large-gradient) training examples;
the all-but-``unit_norm``-off corner of TrackStar (Chang et al. 2024, §3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import GradientEstimator
from estimators.gradients import GradientEngine, LayerGrads, scale, score_dtype, squared_norm
from estimators.problem import AttributionProblem


def unit_normalise(grads: LayerGrads, eps: float = 1e-12) -> LayerGrads:
    """Scales each example's gradient ``{layer: [B, o, i]}`` to unit norm over all layers."""
    return scale(grads, squared_norm(grads).clamp_min(eps).rsqrt())


class GradCos(GradientEstimator):
    """Cosine of query and training gradients (see module docstring). Layer-wise scoring
    divides by both norms itself (``unit_norm``); :meth:`precondition` and
    :meth:`transform_train` normalise dense and projected gradients."""

    unit_norm = True

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        return unit_normalise(query_grads)

    def transform_train(self, grads: LayerGrads) -> LayerGrads:
        return unit_normalise(grads)

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """``[n_train]`` ones: the cosine of a gradient with itself (no mislabel signal)."""
        return torch.ones(problem.n_train, dtype=score_dtype(problem.model))
