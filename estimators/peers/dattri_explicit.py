"""``dattri_explicit``: dattri's explicit inverse-Hessian influence (Koh & Liang 2017, eq. 2).

    score(q, m) = −∇θ f(z_q)ᵀ (H + (λ₂ + λ) I)⁻¹ ∇θ L(z_m)      ``[n_queries, n_train]``

with H the exact Hessian ``[P, P]`` of the mean training loss over the tracked parameters
(``torch.func.hessian`` on the whole training set as one batch: dattri sums per-batch
inverses otherwise), λ₂ the task's L2 coefficient and λ = ``damping`` (dattri's
``regularization`` = λ₂ + λ), computed by dattri 0.3.0's ``IFAttributorExplicit``.
tda-bench's counterpart is ``explicit`` with ``curvature: hessian`` (its default, the GGN,
equals the Hessian on a convex model such as ``digits_logreg``). dattri recomputes the
inverse for every (training batch, query batch) pair, so the training set and the queries
go to it as one batch each. The mapping from the problem is described in
:mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

from estimators.options import bounded, positive
from estimators.peers.common import require
from estimators.peers.dattri_base import Dattri, check_parameters, dattri_task
from estimators.problem import AttributionProblem


class DattriExplicit(Dattri):
    """dattri's explicit inverse Hessian.

    Args:
        damping: λ, added to the Hessian on top of the task's λ₂.
        max_params: refuse models with more tracked parameters (the Hessian is P × P and is
            formed by forward-over-reverse differentiation over the whole training set).
        modules: as for :class:`~estimators.peers.dattri_base.Dattri` (the training set and
            the queries go to dattri as one batch each).
    """

    name = "dattri_explicit"
    ours = "explicit"

    def __init__(self, damping: float = 1e-3, max_params: int = 20000,
                 modules: str | None = None):
        super().__init__(modules=modules, chunk_size=None)
        self.damping = bounded("damping", damping, 0)
        self.max_params = positive("max_params", max_params, integer=True)

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        check_parameters(problem, self.modules, self.max_params, self.name)
        influence = require("dattri.algorithm.influence_function", self.name)
        task, _ = dattri_task(problem, self.batches)
        return influence.IFAttributorExplicit(
            task=task, layer_name=layer_name, device=problem.device.type,
            regularization=problem.l2 + self.damping)
