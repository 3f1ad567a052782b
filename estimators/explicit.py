"""``explicit``: the exact damped inverse curvature (Koh & Liang 2017).

    score(q, m) = −∇θ f(z_q)ᵀ (H + λI)⁻¹ ∇θ L(z_m)        (Grosse et al. 2023, eq. 1)

with H the curvature of the whole training objective (1/N) Σₙ L(zₙ; θ) + (λ₂/2)‖θ‖²:

* ``curvature: hessian``: H = (1/N) Σₙ ∇²θ L(zₙ) + λ₂I (exact; may be indefinite off the optimum);
* ``curvature: ggn``: H = (1/N) Σₙ Jₙᵀ ∇²ₒℓₙ Jₙ + λ₂I, the Gauss-Newton matrix (Jₙ the
  Jacobian of the model's outputs, ∇²ₒℓₙ the loss Hessian in output space; PSD, and the
  curvature that EK-FAC, K-FAC and PBRF approximate).

The P × P matrix is formed with ``torch.func`` over the tracked parameters, accumulated and
factorised (Cholesky) in float64. Only for small models: ``max_params`` guards memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from estimators.base import EXACT_GRADIENTS, GradientEstimator
from estimators.gradients import GradientEngine, LayerGrads
from estimators.options import CURVATURES, OptionError, bounded, choice, positive
from estimators.problem import AttributionProblem, Batch, eval_mode, move_to

SCALABLE = "ekfac, kfac, lissa, arnoldi, tracin, trackstar, grad_dot or grad_cos"


class _Outputs(nn.Module):
    """Wraps ``problem.outputs`` so ``functional_call`` can substitute parameters."""

    def __init__(self, model: nn.Module, outputs):
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, batch: Batch) -> Tensor:
        return self.outputs(self.model, batch)


def functional_outputs(problem: AttributionProblem, engine: GradientEngine):
    """``θ [P], batch -> outputs``: the model's outputs as a function of the tracked θ
    (transformers' attention through SDPA's math backend, which is twice differentiable)."""
    wrapper = _Outputs(problem.model, problem.outputs)

    def outputs(theta: Tensor, batch: Batch) -> Tensor:
        params = {f"model.{k}": v for k, v in engine.as_named_parameters(theta).items()}
        # Curvature products differentiate twice, partly in forward mode; the fused attention
        # kernels (flash, memory-efficient) support neither, the math backend both.
        with sdpa_kernel(SDPBackend.MATH):
            return functional_call(wrapper, params, (batch,))

    return outputs


def curvature_matrix(problem: AttributionProblem, engine: GradientEngine, kind: str,
                     batch_size: int) -> Tensor:
    """The curvature of the training objective over the tracked parameters, ``[P, P]`` float64.

    Args:
        kind: ``"ggn"`` or ``"hessian"`` (see module docstring).
        batch_size: training examples per torch.func call (bounds memory).
    """
    outputs = functional_outputs(problem, engine)
    theta = engine.parameters()
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    with eval_mode(problem.model):
        for batch in tqdm(problem.loader("train", batch_size), desc=f"{kind} matrix",
                          leave=False, disable=None):
            batch = move_to(batch, problem.device)
            if kind == "hessian":
                objective = lambda t, b=batch: problem.loss(outputs(t, b), b).sum()  # noqa: E731
                block = jacrev(grad(objective), chunk_size=512)(theta)
            else:
                out = outputs(theta, batch).detach()
                jac = jacrev(lambda t, b=batch: outputs(t, b), chunk_size=512)(theta)
                h_out = hessian(lambda o, b=batch: problem.loss(o, b).sum())(out)
                jac = jac.reshape(out.numel(), -1).double()
                block = jac.T @ h_out.reshape(out.numel(), out.numel()).double() @ jac
            total += block.double().cpu()
    return total / problem.n_train + problem.l2 * torch.eye(theta.numel(), dtype=torch.float64)


class Explicit(GradientEstimator):
    """Influence through the exact damped Gauss-Newton or Hessian inverse.

    Args:
        curvature: ``ggn`` (default) or ``hessian``.
        damping: λ added to the curvature's diagonal (on top of the task's λ₂).
        max_params: refuse models with more tracked parameters than this (the matrix takes
            P² × 8 bytes).
        batch_size: training examples per curvature block.
        **kwargs: ``modules``, ``chunk_size``, ``per_layer`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    unsupported = EXACT_GRADIENTS

    def __init__(self, curvature: str = "ggn", damping: float = 1e-3, max_params: int = 20_000,
                 batch_size: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.curvature = choice("curvature", curvature, CURVATURES)
        self.damping = bounded("damping", damping, 0)
        self.max_params = positive("max_params", max_params, integer=True)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.cholesky: Tensor | None = None

    def fit(self, problem: AttributionProblem) -> None:
        engine = self.engine(problem)
        p = engine.num_params
        if p > self.max_params:
            raise OptionError(
                f"explicit forms the full {p} x {p} curvature matrix ({p * p * 8 / 2**30:.1f} GiB "
                f"in float64), but this model has {p} tracked parameters, above "
                f"{{max_params}}={self.max_params}. Use an estimator that scales ({SCALABLE}), "
                "or raise {max_params} if you have the memory."
            )
        h = curvature_matrix(problem, engine, self.curvature, self.batch_size)
        h += self.damping * torch.eye(p, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(h)
        if info != 0:
            raise OptionError(self._not_positive_definite(torch.linalg.eigvalsh(h)[0].item()))
        self.cholesky = chol

    def _not_positive_definite(self, smallest: float) -> str:
        """Why the damped matrix (smallest eigenvalue ``smallest``) cannot be factorised, and
        what to change: the damping; for the Hessian also the curvature (the GGN is PSD, so a
        singular damped GGN needs damping, never another curvature)."""
        need = max(self.damping - smallest, 0.0)
        suggest = float(f"{max(10 * need, 1e-3):.1g}")
        advice = f"raise {{damping}} above {need:.3g} (e.g. {{damping={suggest:g}}})"
        if self.curvature == "ggn":
            why = "; the GGN is positive semi-definite, so only damping makes it definite"
        else:
            why = ""
            advice += ", or use {curvature=ggn}, which is positive semi-definite"
        return (f"The damped {self.curvature} matrix is not positive definite (smallest "
                f"eigenvalue {smallest:.3g}{why}): {advice}.")

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        if self.cholesky is None:
            self.fit(problem)
        flat = engine.flatten(query_grads).double().cpu()
        solved = torch.cholesky_solve(flat.T, self.cholesky).T
        return engine.unflatten(solved.to(problem.device))
