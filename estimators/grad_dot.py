"""``grad_dot``: the first-order baseline, H⁻¹ replaced by the identity.

    score(q, m) = −∇θ f(z_q) · ∇θ L(z_m)

The change of f after one gradient step on z_m, up to the learning rate (Pruthi et al. 2020
with a single checkpoint; DESIGN.md).
"""

from __future__ import annotations

from estimators.base import GradientEstimator


class GradDot(GradientEstimator):
    """Dot product of query and training gradients (see module docstring)."""
