"""``dattri_grad_dot``: dattri's Grad-Dot (TracIn at the final checkpoint, weight 1).

    score(q, m) = −∇θ f(z_q) · ∇θ L(z_m)      ``[n_queries, n_train]``

tda-bench's ``grad_dot``, computed by dattri 0.3.0's ``TracInAttributor`` with one
checkpoint, weight 1 and exact gradients (dattri projects to 512 dimensions unless its
``projector_kwargs`` is None, which this peer sets). The mapping from the problem is
described in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

import torch

from estimators.peers.common import require
from estimators.peers.dattri_base import Dattri, dattri_task
from estimators.problem import AttributionProblem


class DattriGradDot(Dattri):
    """dattri's gradient dot product (arguments: :class:`~estimators.peers.dattri_base.Dattri`)."""

    name = "dattri_grad_dot"
    normalized = False

    def checkpoints(self, problem: AttributionProblem) -> tuple[list[dict], list[float]]:
        """``(state dicts, weights)``: the attributed model, weight 1."""
        return [problem.model.state_dict()], [1.0]

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        tracin = require("dattri.algorithm.tracin", self.name)
        states, weights = self.checkpoints(problem)
        task, _ = dattri_task(problem, self.batches, states)
        attributor = tracin.TracInAttributor(
            task=task, weight_list=torch.tensor(weights), normalized_grad=self.normalized,
            layer_name=layer_name, device=problem.device.type)
        attributor.projector_kwargs = None  # exact gradients, as tda-bench's
        return attributor

    def cache(self, problem: AttributionProblem) -> None:
        self.attributor.cache()
