"""``trak``: Tracing with the Randomly-projected After Kernel (Park et al. 2023, Alg. 1).

For each model θ_k of an ensemble trained on the same task with different seeds:

    φ_k(z) = Pᵀ ∇θ f(z; θ_k)                         projected gradient of the model output f
    Φ_k = [φ_k(z_1); ...; φ_k(z_N)]                  ``[n_train, d]``
    Q_k = diag(1 − p_k(z_m))                         p = the model's probability of z_m's label

and the scores are

    τ(z_q, z_m) = [ (1/K) Σ_k φ_k(z_q)ᵀ (Φ_kᵀΦ_k + λI)⁻¹ φ_k(z_m) ] · [ (1/K) Σ_k (1 − p_k(z_m)) ]

(eq. 17 and Alg. 1 of the paper, ensemble averages taken separately). The model output f is
the task's measurement (for classification the margin log p/(1−p), the paper's choice), used
for training examples too; p = exp(−L(z_m)), exact for a cross-entropy loss. Since
∇L = −(1−p)∇f for that loss, τ follows the sign convention of DESIGN.md (positive =
proponent). λ = ``damping`` × tr(ΦᵀΦ)/d keeps the d × d solve well posed when d ≥ n_train.
Self-influence is the averaged leverage φ_mᵀ(ΦᵀΦ + λI)⁻¹φ_m times the averaged (1 − p_m).

The first ensemble member is the attributed model; the others come from the problem's
``model_factory(seed)`` capability (seeds ``seed + 1, ...``; the harness trains and caches
them like the attributed model). A task that cannot train more models (a given checkpoint)
has no factory, and ``n_models > 1`` is refused rather than one model repeated. Projected
training features are stored in the gradient index when ``index_dir`` is set, so each
(model, projection) pair is differentiated once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from estimators.base import GradientEstimator
from estimators.gradients import GradientEngine
from estimators.options import OptionError, bounded, natural, positive
from estimators.problem import AttributionProblem, eval_mode, move_to
from estimators.projection import Projector


@dataclass
class _Member:
    """One fitted ensemble member: its problem, engine, projection, kernel and 1 − p."""

    problem: AttributionProblem
    engine: GradientEngine
    projector: Projector
    cholesky: Tensor  # [d, d] float64, of Φᵀ Φ + λI
    one_minus_p: Tensor  # [n_train]


class TRAK(GradientEstimator):
    """TRAK with an ensemble of ``n_models`` (see module docstring).

    Args:
        n_models: ensemble size K (the attributed model and K − 1 more seeds).
        damping: λ relative to the mean eigenvalue tr(ΦᵀΦ)/d of the kernel.
        seed: seed of the attributed model; the others use ``seed + 1, ..., seed + K − 1``.
        projection_dim: d (required; TRAK always projects).
        **kwargs: ``modules``, ``chunk_size``, ``projection_kind``, ``projection_seed``,
            ``projection_structure``, ``index_dir`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    unsupported = {"per_layer": "trak has no layer-wise scores; set per_layer=false."}

    def __init__(self, n_models: int = 5, damping: float = 1e-3, seed: int = 0,
                 projection_dim: int = 512, **kwargs):
        positive("projection_dim", projection_dim, integer=True)  # required: TRAK projects
        super().__init__(projection_dim=projection_dim, **kwargs)
        self.n_models = positive("n_models", n_models, integer=True)
        self.damping = bounded("damping", damping, 0)
        self.seed = natural("seed", seed)
        self.members: list[_Member] = []

    def ensemble(self, problem: AttributionProblem) -> list[AttributionProblem]:
        """The problem for each ensemble member; the first is ``problem`` itself."""
        if self.n_models > 1 and problem.model_factory is None:
            raise OptionError(
                "trak with {n_models} > 1 needs more models trained on the same task, but this "
                "problem has no model_factory (the task cannot train them, or the problem was "
                "built outside the harness); set {n_models=1}.")
        problems = [problem]
        for k in range(1, self.n_models):
            model = problem.model_factory(self.seed + k)
            problems.append(dataclasses.replace(problem, model=model))
        return problems

    def _one_minus_p(self, problem: AttributionProblem) -> Tensor:
        """``[n_train]``: 1 − exp(−L(z_m)), from a forward pass without gradients."""
        values = []
        with eval_mode(problem.model), torch.no_grad():
            for batch in problem.loader("train", self.chunk_size):
                loss = problem.train_loss(problem.model, move_to(batch, problem.device))
                values.append(-torch.expm1(-loss.double()).cpu())
        return torch.cat(values)

    def fit(self, problem: AttributionProblem) -> None:
        self.members = []
        for k, member in enumerate(self.ensemble(problem)):
            engine = self.engine(member)
            projector = self.projector(engine, offset=k)
            kernel = torch.zeros(projector.dim, projector.dim, dtype=torch.float64)
            for _, feats in self.training_gradients(member, engine, projector, "queries"):
                phi = projector.flatten(feats).double().cpu()
                kernel += phi.T @ phi
            damping = self.damping * kernel.diagonal().mean()
            kernel += damping * torch.eye(projector.dim, dtype=torch.float64)
            chol, info = torch.linalg.cholesky_ex(kernel)
            if info != 0:
                raise OptionError("trak's kernel ΦᵀΦ + λI is not positive definite; raise "
                                  "{damping}.")
            self.members.append(_Member(member, engine, projector, chol,
                                        self._one_minus_p(member)))

    def _kernel_scores(self, m: _Member, phi_q: Tensor | None) -> Tensor:
        """``[Q, n_train]`` φ_qᵀ(ΦᵀΦ + λI)⁻¹φ_m, or the leverages ``[n_train]`` if no queries."""
        solved = None if phi_q is None else torch.cholesky_solve(phi_q.T, m.cholesky).T.float()
        shape = (m.problem.n_train,) if phi_q is None else (phi_q.shape[0], m.problem.n_train)
        out = torch.zeros(shape, dtype=torch.float32)
        for rows, feats in self.training_gradients(m.problem, m.engine, m.projector, "queries"):
            phi = m.projector.flatten(feats).cpu()
            if phi_q is None:
                out[rows] = (torch.cholesky_solve(phi.double().T, m.cholesky).T * phi).sum(1)
            else:
                out[:, rows] = solved @ phi.T
        return out

    def score(self, problem: AttributionProblem) -> Tensor:
        if not self.members:
            self.fit(problem)
        kernel = torch.zeros(problem.n_queries, problem.n_train, dtype=torch.float32)
        for m in self.members:
            q = self.query_gradients(m.problem, m.engine, m.projector)
            kernel += self._kernel_scores(m, m.projector.flatten(q).double().cpu())
        one_minus_p = torch.stack([m.one_minus_p for m in self.members]).mean(0)
        return kernel / len(self.members) * one_minus_p.float()[None, :]

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        if not self.members:
            self.fit(problem)
        leverage = torch.stack([self._kernel_scores(m, None) for m in self.members]).mean(0)
        one_minus_p = torch.stack([m.one_minus_p for m in self.members]).mean(0)
        return leverage * one_minus_p.float()
