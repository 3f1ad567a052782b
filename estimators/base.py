"""The estimator interface: ``fit(problem)`` then ``score(problem) -> [n_queries, n_train]``.

:class:`GradientEstimator` is the shape shared by every influence estimator of the form

    score(q, m) = −(P ∇θ f(z_q)) · T(∇θ L(z_m))                  (DESIGN.md, sign convention)

where P replaces H⁻¹ (identity for ``grad_dot``, the exact damped inverse for ``explicit``,
EK-FAC, LiSSA, ...) and T is an optional per-example transform of training gradients (unit
normalisation for ``grad_cos``). Query gradients are preconditioned once; the training set is
streamed through the shared :class:`~estimators.gradients.GradientEngine` in chunks of
``chunk_size`` examples, so memory is O(chunk_size × P), never O(n_train × P).

With ``projection_dim`` set, every gradient is first randomly projected to about that many
numbers (:mod:`estimators.projection`; Kronecker-structured unless the estimator corrects
gradients element-wise), and with ``index_dir`` set the projected training gradients are
stored once on disk and memory-mapped by later runs (:mod:`estimators.index`).

Self-influence ∇L(z_m)ᵀ P ∇L(z_m) ``[n_train]`` (mislabel detection, Koh & Liang 2017 §5.4;
Pruthi et al. 2020 §4) comes from the same P and T: :meth:`GradientEstimator.self_influence`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor

from estimators import candidates as lexical
from estimators.gradients import GradientEngine, LayerGrads, dot, score_dtype
from estimators.index import GradientIndex, fingerprint, read_rows
from estimators.options import (
    GradientOptions,
    Option,
    OptionError,
    ProjectionOptions,
    names_arguments,
    positive,
)
from estimators.problem import AttributionProblem, eval_mode, move_to
from estimators.projection import Projector

GRADIENT_COPIES = 3  # [B, P] float32 buffers alive at once while a chunk is scored


class Estimator(ABC):
    """A training-data attribution method.

    Subclasses validate their arguments in ``__init__`` (plain, Hydra-friendly types, checked
    with :mod:`estimators.options`) and keep expensive state built by :meth:`fit` for any
    number of :meth:`score` calls. An :class:`~estimators.options.OptionError` leaving
    ``__init__``, ``fit``, ``score`` or ``self_influence`` names the estimator's class (and
    ``estimator.<key>`` on the command line).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        names_arguments(cls, "estimator", ("__init__", "fit", "score", "self_influence"))

    def fit(self, problem: AttributionProblem) -> None:  # noqa: B027 - optional step
        """Builds reusable state (factors, eigendecompositions, an index). Default: none."""

    @abstractmethod
    def score(self, problem: AttributionProblem) -> Tensor:
        """Returns scores ``[n_queries, n_train]``; positive means up-weighting helps."""

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """Self-influence ∇L(z_m)ᵀ H⁻¹ ∇L(z_m) of every training example, ``[n_train]``.

        High self-influence flags examples the model finds surprising (mislabelled ones).
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot compute self-influence; use grad_dot, explicit, "
            "tracin or trak for mislabel detection.")


# What the estimators that precondition exact gradients with a curvature (explicit, kfac,
# ekfac, lissa, arnoldi) refuse: before the shared arguments were forwarded as **kwargs they
# did not take these at all.
EXACT_GRADIENTS = {
    "projection_dim": "{name} preconditions exact gradients with its curvature; set "
                      "{{projection_dim=null}} (grad_dot, grad_cos, tracin, trak and trackstar "
                      "project).",
    "candidates": "{name} scores every training example; set {{candidates=null}} (lexical "
                  "candidates apply to grad_dot, grad_cos and tracin).",
}


class GradientEstimator(Estimator):
    """Influence as −(preconditioned query gradient) · (training gradient), streamed.

    Subclasses take their own arguments and forward ``**kwargs`` (these shared ones) here;
    they become :attr:`gradient_options` and :attr:`projection_options`, validated values
    whose fields stay readable under their config keys (``self.chunk_size``, ...).

    Args:
        modules: which linear layers to attribute through (``all``, ``mlp_only`` or a regex).
        chunk_size: training examples per gradient chunk; bounds scoring memory.
        per_layer: also keep layer-wise scores ``[n_layers, n_queries, n_train]`` in
            ``self.layer_scores`` (they sum exactly to the total).
        projection_dim: project every gradient to about this many numbers (None: exact).
        projection_kind: ``rademacher`` or ``gaussian`` projection entries.
        projection_seed: the projection's seed.
        index_dir: with a projection, keep projected training gradients in this directory
            and reuse them (None: recompute every time).
        projection_structure: ``kronecker`` (per layer, from the factored gradient; cheap,
            for estimators that apply no element-wise correction) or ``dense`` (per-example
            gradients times a block-generated dense matrix; more accurate per dimension).
        candidates: ``{retriever: tfidf|bm25, k}``: score each query only against its top-k
            lexical candidates (the rest NaN; :mod:`estimators.candidates`), or None.
    """

    # Shared arguments a subclass refuses when set, each with the sentence that says why
    # ("{name}" is the estimator's config name).
    unsupported: ClassVar[dict[str, str]] = {}

    modules = Option("gradient_options")
    chunk_size = Option("gradient_options")
    per_layer = Option("gradient_options")
    projection_dim = Option("projection_options", "dim")
    projection_kind = Option("projection_options", "kind")
    projection_seed = Option("projection_options", "seed")
    projection_structure = Option("projection_options", "structure")
    index_dir = Option("projection_options")

    def __init__(self, *, modules: str | None = None, chunk_size: int = 256,
                 per_layer: bool = False, projection_dim: int | None = None,
                 projection_kind: str = "rademacher", projection_seed: int = 0,
                 index_dir: str | None = None, projection_structure: str = "kronecker",
                 candidates: dict | None = None):
        self.gradient_options = GradientOptions(modules, chunk_size, per_layer)
        self.projection_options = ProjectionOptions(projection_dim, projection_kind,
                                                    projection_seed, projection_structure,
                                                    index_dir)
        self.candidates = lexical.check_candidates(candidates)
        name = type(self).__name__.lower()
        for key, why in self.unsupported.items():
            if getattr(self, key):
                raise OptionError(why.format(name=name))
        if self.per_layer and self.projection_options.enabled and projection_structure == "dense":
            raise OptionError("a dense projection mixes layers, so {per_layer} scores need "
                              "{projection_structure=kronecker} (or no projection).")
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
        memory_budget_mb = positive("memory_budget_mb", memory_budget_mb)
        per_example = GRADIENT_COPIES * 4 * self.engine(problem).num_params
        fits = int(memory_budget_mb * 2**20 // per_example)
        self.chunk_size = max(1, min(self.chunk_size, fits))
        return self.chunk_size

    def projector(self, engine: GradientEngine, offset: int = 0) -> Projector | None:
        """The seeded projection of ``engine``'s layers (seed + ``offset``), or None."""
        if not self.projection_options.enabled:
            return None
        return Projector(engine, self.projection_dim, self.projection_kind,
                         self.projection_seed + offset, self.projection_structure)

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        """Maps query gradients ``{layer: [Q, o, i]}`` to P ∇f. Default: identity."""
        return query_grads

    def transform_train(self, grads: LayerGrads) -> LayerGrads:
        """A per-example transform of a chunk of training gradients. Default: identity."""
        return grads

    def correction(self, problem: AttributionProblem,
                   engine: GradientEngine) -> Callable[[LayerGrads], LayerGrads] | None:
        """An element-wise map of full per-example gradients ``{layer: [B, o, i]}``, applied
        to query and training gradients before any projection (TrackStar's optimizer
        correction; needs ``projection_structure: dense``). Default: None."""
        return None

    def correction_spec(self) -> dict:
        """What determines :meth:`correction`'s numbers (part of the gradient-index key)."""
        return {}

    # Gradients, exact or projected, of the loss ("train") or the measurement ("queries").
    def gradient_stream(self, problem: AttributionProblem, engine: GradientEngine,
                        projector: Projector | None, which: str,
                        split: str | None = None) -> Iterator[tuple[slice, LayerGrads]]:
        """Streams ``(rows, {layer: [B, o, i]})`` (projected: ``[B, d_o, d_a]``).

        Args:
            which: ``train`` differentiates ``problem.loss``, ``queries`` ``problem.measure``.
            split: the examples, ``train`` or ``queries`` (default: the same as ``which``).
        """
        split = split or which
        correct = self.correction(problem, engine)
        if projector is None and split == which and correct is None:
            yield from engine.stream(problem, which, self.chunk_size)
            return
        fn = problem.train_loss if which == "train" else problem.query_measure
        start = 0
        with eval_mode(problem.model):
            for batch in problem.loader(split, self.chunk_size):
                batch = move_to(batch, problem.device)
                if projector is None:
                    grads = engine.gradients(fn, batch)
                    grads = correct(grads) if correct is not None else grads
                else:
                    grads = projector.project(fn, batch, correct)
                size = next(iter(grads.values())).shape[0]
                yield slice(start, start + size), grads
                start += size

    def index_key(self, problem: AttributionProblem, engine: GradientEngine,
                  projector: Projector | None, which: str = "train") -> str | None:
        """The gradient index's key for these training gradients (None: no index is kept,
        because gradients are exact or ``index_dir`` is null)."""
        if projector is None or self.index_dir is None:
            return None
        spec = {"projection": projector.describe(), "modules": self.modules, "fn": which,
                "dtype": "float32", "correction": self.correction_spec()}
        return fingerprint(problem, engine, spec)

    def training_gradients(self, problem: AttributionProblem, engine: GradientEngine,
                           projector: Projector | None,
                           which: str = "train") -> Iterator[tuple[slice, LayerGrads]]:
        """Training-set gradients, read from the on-disk index when there is one."""
        key = self.index_key(problem, engine, projector, which)
        if key is None:
            yield from self.gradient_stream(problem, engine, projector, which, "train")
            return
        flat = ((rows, projector.flatten(g))
                for rows, g in self.gradient_stream(problem, engine, projector, which, "train"))
        array = GradientIndex(self.index_dir).load_or_build(
            key, (problem.n_train, projector.dim), flat)
        for rows, values in read_rows(array, self.chunk_size):
            yield rows, projector.unflatten(values.to(problem.device))

    def query_gradients(self, problem: AttributionProblem, engine: GradientEngine,
                        projector: Projector | None) -> LayerGrads:
        """All query gradients ``{layer: [Q, ...]}``."""
        chunks = [g for _, g in self.gradient_stream(problem, engine, projector, "queries")]
        return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}

    def score(self, problem: AttributionProblem) -> Tensor:
        scores = self.score_model(problem)
        if self.per_layer:
            self.layer_scores = scores
            return scores.sum(0)
        return scores

    def score_model(self, problem: AttributionProblem, offset: int = 0) -> Tensor:
        """Scores of ``problem.model``: ``[n_queries, n_train]``, or per layer
        ``[n_layers, n_queries, n_train]`` when ``per_layer``."""
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        query_grads = self.query_gradients(problem, engine, projector)
        pre = self.precondition(problem, engine, query_grads)
        dtype = score_dtype(problem.model)
        pre = {n: g.to(dtype) for n, g in pre.items()}
        shape = (len(pre), problem.n_queries, problem.n_train)
        scores = torch.zeros(shape if self.per_layer else shape[1:], dtype=dtype)
        columns, train_problem, mask = torch.arange(problem.n_train), problem, None
        if self.candidates:  # gradients only for the union of the queries' candidates
            mask = lexical.candidate_mask(problem, **self.candidates)
            columns = mask.any(0).nonzero().flatten()
            train_problem = lexical.restricted(problem, columns)
        for idx, grads in self.training_gradients(train_problem, engine, projector):
            grads = {n: g.to(dtype) for n, g in self.transform_train(grads).items()}
            scores[..., columns[idx]] = -dot(pre, grads, per_layer=self.per_layer).cpu()
            del grads  # one chunk alive at a time
        if mask is not None:
            scores = lexical.fill_unscored(scores, mask)
        return scores

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        return self.self_influence_model(problem)

    def self_influence_model(self, problem: AttributionProblem, offset: int = 0) -> Tensor:
        """``[n_train]``: T(∇L(z_m)) · P ∇L(z_m) for ``problem.model`` (H = I: ‖∇L‖²)."""
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        dtype = score_dtype(problem.model)
        values = torch.zeros(problem.n_train, dtype=dtype)
        for idx, grads in self.training_gradients(problem, engine, projector):
            pre = self.precondition(problem, engine, grads)
            pre = {n: g.to(dtype) for n, g in pre.items()}
            train = {n: g.to(dtype) for n, g in self.transform_train(grads).items()}
            values[idx] = sum((pre[n].flatten(1) * train[n].flatten(1)).sum(1)
                              for n in train).cpu()
        return values
