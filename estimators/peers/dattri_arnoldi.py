"""``dattri_arnoldi``: dattri's Arnoldi influence (Schioppa et al. 2022).

    score(q, m) = −Σᵢ (uᵢ · ∇θ f(z_q)) (uᵢ · ∇θ L(z_m)) / λᵢ      ``[n_queries, n_train]``

over the top-``rank`` eigenpairs (λᵢ, uᵢ) of H + (λ₂ + λ)I found by ``iterations`` Arnoldi
steps of Hessian-vector products on the whole training set (H: the Hessian of the mean
training loss over the tracked parameters), computed by dattri 0.3.0's
``IFAttributorArnoldi`` (its ``proj_dim`` = rank, ``max_iter`` = iterations,
``regularization`` = λ₂ + λ). tda-bench's counterpart is ``arnoldi`` with
``curvature: hessian``; the defaults are tda-bench's. The mapping from the problem is
described in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

import torch

from estimators.options import bounded, number, positive
from estimators.peers.common import require
from estimators.peers.dattri_base import Dattri, dattri_task
from estimators.problem import AttributionProblem


class DattriArnoldi(Dattri):
    """dattri's Arnoldi eigenspace influence.

    Args:
        rank: eigenpairs kept (dattri's ``proj_dim``).
        iterations: Arnoldi iterations, i.e. Hessian-vector products (dattri's ``max_iter``).
        damping: λ, on top of the task's λ₂.
        seed: the start vector's seed.
        modules, chunk_size: as for :class:`~estimators.peers.dattri_base.Dattri`.
    """

    name = "dattri_arnoldi"
    ours = "arnoldi"

    def __init__(self, rank: int = 200, iterations: int = 400, damping: float = 1e-3,
                 seed: int = 0, modules: str | None = None, chunk_size: int | None = 256):
        super().__init__(modules=modules, chunk_size=chunk_size)
        self.rank = positive("rank", rank, integer=True)
        self.iterations = positive("iterations", iterations, integer=True)
        if self.iterations < self.rank:
            raise ValueError(f"iterations must be >= rank, got iterations={iterations} and "
                             f"rank={rank}")
        self.damping = bounded("damping", damping, 0)
        self.seed = number("seed", seed, integer=True)

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        self.layer_name = layer_name
        influence = require("dattri.algorithm.influence_function", self.name)
        task, _ = dattri_task(problem, self.batches)
        return influence.IFAttributorArnoldi(
            task=task, layer_name=layer_name, device=problem.device.type,
            proj_dim=self.rank, max_iter=self.iterations,
            regularization=problem.l2 + self.damping, seed=self.seed)

    def cache(self, problem: AttributionProblem) -> None:
        """dattri's ``cache``, then its eigenspace (which dattri computes lazily, at the first
        projection): the Arnoldi iterations belong to ``fit``."""
        dtype = next(problem.model.parameters()).dtype
        # dattri draws its start vector and Hessenberg matrix in torch's default dtype: use
        # the model's while it iterates (a float64 model would otherwise mix dtypes)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.enable_grad(), torch.random.fork_rng():
                super().cache(problem)
                for project in self.attributor.arnoldi_projectors:
                    size = sum(dict(problem.model.named_parameters())[n].numel()
                               for n in self.layer_name)
                    project(torch.zeros(1, size, dtype=dtype))
        finally:
            torch.set_default_dtype(default)

    def attribute(self, train, queries):
        scores = super().attribute(train, queries)
        if not torch.isfinite(scores).all():
            raise FloatingPointError(
                f"{self.name} gave non-finite scores: dattri keeps the eigenvalues of largest "
                "magnitude and divides by their square roots, so a Hessian with negative "
                "eigenvalues (a non-convex model) breaks it; raise estimator.damping above "
                "the most negative eigenvalue, or use arnoldi (curvature: ggn).")
        return scores
