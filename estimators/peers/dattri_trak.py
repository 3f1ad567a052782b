"""``dattri_trak``: dattri's TRAK (Park et al. 2023, Alg. 1).

For each model θ_k of an ensemble, φ_k(z) = Pᵀ ∇θ f(z; θ_k) / √P (dattri's normal random
projection P to d = ``projection_dim`` numbers of the gradient of the model output f, the
task's measurement, over the tracked parameters) and

    τ(z_q, z_m) = [(1/K) Σ_k φ_k(z_q)ᵀ (Φ_kᵀΦ_k + rI)⁻¹ φ_k(z_m)] · [(1/K) Σ_k (1 − p_k(z_m))]

``[n_queries, n_train]``, p = exp(−L(z_m)), computed by dattri 0.3.0's ``TRAKAttributor``
(``loss_func`` = ``target_func`` = −f: the two signs cancel in τ, which is positive for a
proponent as tda-bench's ``trak``). The ensemble is the attributed model and models of seeds
``seed + 1, ...`` from the problem's ``model_factory`` (as tda-bench's ``trak``);
``regularization`` r is dattri's, absolute (tda-bench's ``trak`` scales its λ by
tr(ΦᵀΦ)/d). The mapping from the problem is described in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.options import bounded, number, positive
from estimators.peers.common import functional_outputs, require
from estimators.peers.dattri_base import Dattri, dattri_task
from estimators.problem import AttributionProblem


def ensemble(problem: AttributionProblem, n_models: int, seed: int, name: str) -> list[dict]:
    """State dicts of the attributed model and ``n_models − 1`` more from the factory."""
    if n_models > 1 and problem.model_factory is None:
        raise ValueError(f"{name} with n_models={n_models} needs more trained models of this "
                         "task, but the problem has no model_factory; set "
                         "estimator.n_models=1.")
    models = [problem.model] + [problem.model_factory(seed + k) for k in range(1, n_models)]
    return [m.state_dict() for m in models]


class DattriTRAK(Dattri):
    """dattri's TRAK.

    Args:
        n_models: ensemble size K.
        projection_dim: d.
        regularization: r added to Φᵀ Φ (absolute, dattri's).
        seed: the attributed model's seed (the ensemble's first member) and the projection's.
        modules, chunk_size: as for :class:`~estimators.peers.dattri_base.Dattri`.
    """

    name = "dattri_trak"
    ours = "trak"

    def __init__(self, n_models: int = 5, projection_dim: int = 512,
                 regularization: float = 0.0, seed: int = 0, modules: str | None = None,
                 chunk_size: int | None = 256):
        super().__init__(modules=modules, chunk_size=chunk_size)
        self.n_models = positive("n_models", n_models, integer=True)
        self.projection_dim = positive("projection_dim", projection_dim, integer=True)
        self.regularization = bounded("regularization", regularization, 0)
        self.seed = number("seed", seed, integer=True)

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        trak = require("dattri.algorithm.trak", self.name)
        states = ensemble(problem, self.n_models, self.seed, self.name)
        task, model = dattri_task(problem, self.batches, states, train_fn="measure")
        outputs = functional_outputs(problem, model)

        def correct_probability(params: dict[str, Tensor], data: list[Tensor]) -> Tensor:
            batch = self.batches.rebuild(data)
            return torch.exp(-problem.loss(outputs(params, batch), batch)).sum()

        attributor = trak.TRAKAttributor(
            task=task, correct_probability_func=correct_probability, layer_name=layer_name,
            device=problem.device.type, regularization=self.regularization)
        attributor.projector_kwargs = {  # a fresh dict: dattri's default is module-level
            "proj_dim": self.projection_dim, "proj_max_batch_size": 32,
            "proj_seed": self.seed, "device": problem.device.type}
        return attributor

    def cache(self, problem: AttributionProblem) -> None:
        with torch.enable_grad():
            self.attributor.cache(self.batches.loader(problem, "train", self.chunk_size))

    def attribute(self, train, queries) -> Tensor:
        return self.attributor.attribute(queries)  # dattri's TRAK takes the queries first

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """``[n_train]``: dattri's ``self_attribute``, given the training loader (dattri 0.3.0's
        TRAK cannot self-attribute from its cache, so the cache is set aside meanwhile)."""
        if self.attributor is None:
            self.fit(problem)
        cached, self.attributor.full_train_dataloader = self.attributor.full_train_dataloader, None
        try:
            with torch.enable_grad():
                train = self.batches.loader(problem, "train", self.chunk_size)
                return self.attributor.self_attribute(train).detach().cpu().reshape(-1)
        finally:
            self.attributor.full_train_dataloader = cached
