"""The estimator interface: ``fit(problem)`` then ``score(problem) -> [n_queries, n_train]``.

:class:`GradientEstimator` is the shape shared by every influence estimator of the form

    score(q, m) = −(P ∇θ f(z_q)) · T(∇θ L(z_m))                  (DESIGN.md, sign convention)

where P replaces H⁻¹ (identity for ``grad_dot``, the exact damped inverse for ``explicit``,
EK-FAC, LiSSA, ...) and T is an optional per-example transform of training gradients (unit
normalisation for ``grad_cos``). Query gradients are preconditioned once; the training set is
streamed through the shared :class:`~estimators.gradients.GradientEngine` in chunks of
``chunk_size`` examples, so memory is O(chunk_size × P), never O(n_train × P).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from estimators import candidates as lexical
from estimators.gradients import GradientEngine, LayerGrads, dot
from estimators.problem import AttributionProblem

GRADIENT_COPIES = 3  # [B, P] float32 buffers alive at once while a chunk is scored


class Estimator(ABC):
    """A training-data attribution method.

    Subclasses validate their arguments in ``__init__`` (plain, Hydra-friendly types) and
    keep expensive state built by :meth:`fit` for any number of :meth:`score` calls.
    """

    def fit(self, problem: AttributionProblem) -> None:  # noqa: B027 - optional step
        """Builds reusable state (factors, eigendecompositions, an index). Default: none."""

    @abstractmethod
    def score(self, problem: AttributionProblem) -> Tensor:
        """Returns scores ``[n_queries, n_train]``; positive means up-weighting helps."""


def check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    """Raises a readable error unless ``value`` > 0 (or None when allowed)."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


class GradientEstimator(Estimator):
    """Influence as −(preconditioned query gradient) · (training gradient), streamed.

    Args:
        modules: which linear layers to attribute through (``all``, ``mlp_only`` or a regex).
        chunk_size: training examples per gradient chunk; bounds scoring memory.
        per_layer: also keep layer-wise scores ``[n_layers, n_queries, n_train]`` in
            ``self.layer_scores`` (they sum exactly to the total).
        candidates: ``{retriever: tfidf|bm25, k}``: score each query only against its top-k
            lexical candidates (the rest NaN; :mod:`estimators.candidates`), or None.
    """

    def __init__(self, modules: str | None = None, chunk_size: int = 256, per_layer: bool = False,
                 candidates: dict | None = None):
        check_positive("chunk_size", chunk_size)
        self.candidates = lexical.check_candidates(candidates)
        self.modules = modules
        self.chunk_size = int(chunk_size)
        self.per_layer = bool(per_layer)
        self.layer_scores: Tensor | None = None

    def engine(self, problem: AttributionProblem) -> GradientEngine:
        return GradientEngine(problem.model, self.modules)

    def fit_chunk_to_budget(self, problem: AttributionProblem, memory_budget_mb: float) -> int:
        """Lowers ``chunk_size`` so that a chunk's gradients fit in ``memory_budget_mb``.

        A chunk of B examples holds about ``GRADIENT_COPIES`` float32 copies of its ``[B, P]``
        gradients (the per-example gradients, a transformed or cast copy, finiteness masks);
        activations, the query gradients and the ``[n_queries, n_train]`` scores are not
        counted. Never raises ``chunk_size``; at least one example per chunk.

        Returns:
            the chunk size now in use.
        """
        check_positive("memory_budget_mb", memory_budget_mb)
        per_example = GRADIENT_COPIES * 4 * self.engine(problem).num_params
        fits = int(memory_budget_mb * 2**20 // per_example)
        self.chunk_size = max(1, min(self.chunk_size, fits))
        return self.chunk_size

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        """Maps query gradients ``{layer: [Q, o, i]}`` to P ∇f. Default: identity."""
        return query_grads

    def transform_train(self, grads: LayerGrads) -> LayerGrads:
        """A per-example transform of a chunk of training gradients. Default: identity."""
        return grads

    def score(self, problem: AttributionProblem) -> Tensor:
        engine = self.engine(problem)
        query_grads = engine.all_gradients(problem, "queries", self.chunk_size)
        pre = self.precondition(problem, engine, query_grads)
        pre = {n: g.to(torch.float32) for n, g in pre.items()}
        shape = (len(engine.layers), problem.n_queries, problem.n_train)
        scores = torch.zeros(shape if self.per_layer else shape[1:])
        columns, train_problem, mask = torch.arange(problem.n_train), problem, None
        if self.candidates:  # gradients only for the union of the queries' candidates
            mask = lexical.candidate_mask(problem, **self.candidates)
            columns = mask.any(0).nonzero().flatten()
            train_problem = lexical.restricted(problem, columns)
        for idx, grads in engine.stream(train_problem, "train", self.chunk_size, "scoring"):
            grads = {n: g.to(torch.float32) for n, g in self.transform_train(grads).items()}
            scores[..., columns[idx]] = -dot(pre, grads, per_layer=self.per_layer).cpu()
            del grads  # one chunk alive at a time
        if mask is not None:
            scores = lexical.fill_unscored(scores, mask)
        if self.per_layer:
            self.layer_scores = scores
            return scores.sum(0)
        return scores
