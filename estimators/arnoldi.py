"""``arnoldi``: influence in the top-k eigenspace of the curvature (Schioppa et al. 2022,
"Scaling Up Influence Functions", Algorithms 1-2).

Arnoldi iterations build an orthonormal basis Q of the Krylov space {v₀, Hv₀, H²v₀, …}
from a seeded random start v₀ with one full-data curvature product per iteration
(HVPs or GGN-vector products of the damped training objective H + λI, H including the
task's λ₂I), and the small Hessenberg matrix Qᵀ(H + λI)Q. Its eigenpairs give Ritz
approximations (λᵢ, uᵢ = Q wᵢ) of the top of the spectrum; the k largest are kept and

    score(q, m) = −Σᵢ₌₁ᵏ (uᵢᵀ∇f(z_q)) (uᵢᵀ∇L(z_m)) / λᵢ            (Schioppa et al. eq. 5)

i.e. the query gradients are preconditioned with Σᵢ (1/λᵢ) uᵢuᵢᵀ on the top-k subspace
(the rest of the spectrum is dropped, as in the paper). With k = ``iterations`` = P the
Krylov basis spans everything and this is the exact damped inverse of ``explicit``. If the
Krylov space becomes invariant early (repeated eigenvalues), iteration continues from a
fresh random vector orthogonal to the basis. The basis and the eigenproblem are float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import EXACT_GRADIENTS, GradientEstimator
from estimators.curvature_products import curvature_sample, full_products
from estimators.gradients import GradientEngine, LayerGrads
from estimators.options import CURVATURES, OptionError, bounded, choice, natural, positive
from estimators.problem import AttributionProblem, eval_mode

BREAKDOWN = 1e-10  # a new Krylov direction shorter than this (relative) means an invariant space


class Arnoldi(GradientEstimator):
    """Influence through the top-``rank`` Ritz pairs of the damped curvature.

    Args:
        rank: k, eigenpairs kept (at most ``iterations``).
        iterations: Arnoldi iterations (curvature products); capped at the number of
            tracked parameters.
        curvature: ``ggn`` (default) or ``hessian``.
        damping: λ added to the curvature (on top of the task's λ₂).
        batch_size: training examples per curvature-product batch.
        sample: run the iterations on the curvature of a fixed random sample of this many
            training examples (Schioppa et al. 2022 iterate on a subsample); None: the whole
            training set.
        seed: seeds the start vector and the sample.
        **kwargs: ``modules``, ``chunk_size``, ``per_layer`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    unsupported = EXACT_GRADIENTS

    def __init__(self, rank: int = 200, iterations: int = 400, curvature: str = "ggn",
                 damping: float = 1e-3, batch_size: int = 256, sample: int | None = None,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.rank = positive("rank", rank, integer=True)
        self.iterations = positive("iterations", iterations, integer=True)
        if self.rank > self.iterations:
            raise OptionError(f"{{rank}} ({rank}) cannot exceed {{iterations}} ({iterations}): "
                              "Arnoldi finds at most one eigenpair per iteration.")
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.damping = bounded("damping", damping, 0)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.sample = positive("sample", sample, integer=True, allow_none=True)
        self.seed = natural("seed", seed)
        self.eigenvalues: Tensor | None = None  # [k] float64, descending
        self.eigenvectors: Tensor | None = None  # [k, P] float64, orthonormal rows
        self.diagnostics: dict[str, float] = {}

    def fit(self, problem: AttributionProblem) -> None:
        engine = self.engine(problem)
        full = full_products(curvature_sample(problem, self.sample, self.seed), engine,
                             self.curvature, self.batch_size)
        p = engine.num_params
        n = min(self.iterations, p)
        generator = torch.Generator().manual_seed(self.seed)
        with eval_mode(problem.model):
            damped = lambda v: full(v[None])[0].double().cpu() + self.damping * v  # noqa: E731
            basis, hessenberg = arnoldi(damped, p, n, generator)
        # The operator is symmetric, so QᵀAQ is too (tridiagonal up to rounding): eigh of its
        # symmetric part gives the real Ritz pairs without eig's spurious complex pairs.
        values, vectors = torch.linalg.eigh((hessenberg + hessenberg.T) / 2)
        order = torch.argsort(values, descending=True)[: min(self.rank, n)]
        values = values[order]
        if values[-1] <= 0:
            advice = "" if self.curvature == "ggn" else ", or use {curvature=ggn}, which is PSD"
            raise OptionError(
                f"The top-{len(values)} Ritz values of the damped {self.curvature} include "
                f"{values[-1].item():.3g} <= 0: lower {{rank}} or raise {{damping}}{advice}."
            )
        ritz = (basis.T @ vectors[:, order]).T  # [k, P]
        self.eigenvectors = ritz / ritz.norm(dim=1, keepdim=True)
        self.eigenvalues = values
        self.diagnostics = {"arnoldi_top_eigenvalue": float(values[0]),
                            "arnoldi_kth_eigenvalue": float(values[-1])}

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        if self.eigenvectors is None:
            self.fit(problem)
        flat = engine.flatten(query_grads).double().cpu()
        u, lam = self.eigenvectors, self.eigenvalues
        projected = (flat @ u.T) / lam  # [Q, k]
        return engine.unflatten((projected @ u).to(problem.device))


def arnoldi(matvec, size: int, iterations: int,
            generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``iterations`` steps of Arnoldi with full (twice-repeated) Gram-Schmidt.

    Args:
        matvec: ``[P] float64 -> [P] float64``, the operator.

    Returns:
        ``(Q [n, P], H [n, n])``: orthonormal basis rows and the Hessenberg matrix QᵀAQ.
    """
    basis = torch.zeros(iterations + 1, size, dtype=torch.float64)
    hess = torch.zeros(iterations + 1, iterations, dtype=torch.float64)
    start = torch.randn(size, generator=generator, dtype=torch.float64)
    basis[0] = start / start.norm()
    scale = 0.0
    for j in range(iterations):
        w = matvec(basis[j])
        scale = max(scale, float(w.norm()))
        for _ in range(2):  # re-orthogonalise: keeps Q orthonormal in floating point
            coeffs = basis[: j + 1] @ w
            w = w - coeffs @ basis[: j + 1]
            hess[: j + 1, j] += coeffs
        norm = w.norm()
        if j + 1 == iterations:
            break
        if norm > BREAKDOWN * max(scale, 1e-300):
            hess[j + 1, j] = norm
            basis[j + 1] = w / norm
        else:  # invariant subspace: continue from a fresh direction (H[j+1, j] = 0)
            for _ in range(3):
                fresh = torch.randn(size, generator=generator, dtype=torch.float64)
                for _ in range(2):
                    fresh = fresh - (basis[: j + 1] @ fresh) @ basis[: j + 1]
                if fresh.norm() > 1e-8:
                    break
            basis[j + 1] = fresh / fresh.norm()
    return basis[:iterations], hess[:iterations, :iterations]
