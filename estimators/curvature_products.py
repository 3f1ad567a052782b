"""Curvature-vector products of the training objective, batched over many vectors.

Shared by the iterative estimators (``lissa``, ``arnoldi``) and built on
:func:`estimators.explicit.functional_outputs`, so every curvature in the project is the
same one ``explicit`` forms:

* ``hessian``: H v = (1/N) Σₙ ∇²θ L(zₙ) v + λ₂ v (forward-over-reverse: ``jvp`` of ``grad``);
* ``ggn``: G v = (1/N) Σₙ Jₙᵀ ∇²ₒℓₙ Jₙ v + λ₂ v (``jvp`` through the model, the loss's
  output-space Hessian by ``jvp`` of its gradient, then ``vjp`` back).

Vectors live in the engine's flat layout ``[K, P]`` (:meth:`GradientEngine.flatten`); all K
are multiplied together with ``torch.func.vmap``, never one by one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from torch.utils.data import Subset

from estimators.explicit import functional_outputs
from estimators.gradients import GradientEngine
from estimators.options import CURVATURES, choice
from estimators.problem import AttributionProblem, Batch, move_to


def summed_products(problem: AttributionProblem, engine: GradientEngine,
                    kind: str) -> Callable[[Tensor, Batch], Tensor]:
    """``(vectors [K, P], batch) -> [K, P]``: Σ over the batch's examples of C_n v (no λ₂).

    The model should be in eval mode while the returned function is used.
    """
    choice("curvature", kind, CURVATURES)
    outputs = functional_outputs(problem, engine)
    theta = engine.parameters()

    def products(vectors: Tensor, batch: Batch) -> Tensor:
        vectors = vectors.to(theta)
        if kind == "hessian":
            gradient = grad(lambda t: problem.loss(outputs(t, batch), batch).sum())
            return vmap(lambda v: jvp(gradient, (theta,), (v,))[1])(vectors).detach()
        model_out = lambda t: outputs(t, batch)  # noqa: E731
        out, pullback = vjp(model_out, theta)
        loss_grad = grad(lambda o: problem.loss(o, batch).sum())

        def ggn_vector(v: Tensor) -> Tensor:
            jv = jvp(model_out, (theta,), (v,))[1]
            return pullback(jvp(loss_grad, (out.detach(),), (jv,))[1])[0]

        # detached: iterative solvers must not chain autograd graphs across their steps
        return vmap(ggn_vector)(vectors).detach()

    return products


def full_products(problem: AttributionProblem, engine: GradientEngine, kind: str,
                  batch_size: int) -> Callable[[Tensor], Tensor]:
    """``vectors [K, P] -> [K, P]``: the full-data curvature (1/N) Σₙ C_n v + λ₂ v.

    Streams the training set in batches of ``batch_size`` (memory O(batch × K × outputs)).
    """
    products = summed_products(problem, engine, kind)
    batches = [move_to(b, problem.device) for b in problem.loader("train", batch_size)]

    def full(vectors: Tensor) -> Tensor:
        total = sum(products(vectors, b) for b in batches)
        return (total / problem.n_train + problem.l2 * vectors.to(total)).detach()

    return full


def curvature_sample(problem: AttributionProblem, size: int | None,
                     seed: int) -> AttributionProblem:
    """The problem whose training set is a fixed random sample of ``size`` examples (drawn
    with ``seed``): the curvature of its mean objective estimates the full one's at
    ``size / n_train`` of the cost per product. ``size`` None, or at least ``n_train``: the
    problem itself."""
    if size is None or size >= problem.n_train:
        return problem
    generator = torch.Generator().manual_seed(int(seed))
    keep = torch.randperm(problem.n_train, generator=generator)[:size].sort().values
    return dataclasses.replace(problem, train=Subset(problem.train, keep.tolist()),
                               train_text=None)


def top_eigenvalue(matvec: Callable[[Tensor], Tensor], size: int, iterations: int,
                   generator: torch.Generator) -> float:
    """The largest eigenvalue of a PSD operator by power iteration (Rayleigh quotient)."""
    v = torch.randn(1, size, generator=generator, dtype=torch.float64)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = matvec(v).double().cpu()
        value = float((v * w).sum())
        v = w / w.norm().clamp_min(1e-300)
    return value
