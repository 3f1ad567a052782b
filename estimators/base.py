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
from estimators import memory, scoring
from estimators.accumulate import FitPass
from estimators.gradients import GradientEngine, LayerGrads, dot, score_dtype
from estimators.index import GradientIndex, fingerprint, read_rows
from estimators.layerwise import IDENTITY, LayerPreconditioner
from estimators.options import (
    GradientOptions,
    Option,
    OptionError,
    ProjectionOptions,
    names_arguments,
)
from estimators.problem import AttributionProblem, eval_mode, move_to
from estimators.projection import Projector


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

    def fit(self, problem: AttributionProblem) -> None:
        """Builds reusable state (factors, eigendecompositions, an index): runs every pass of
        :meth:`fit_passes` over all blocks in this process. Default: nothing to fit."""
        for fit_pass in self.fit_passes(problem):
            fit_pass.finish([fit_pass.compute(list(range(fit_pass.n_blocks)))])

    def fit_passes(self, problem: AttributionProblem) -> Iterator[FitPass]:
        """The fit as passes whose statistics are sums over blocks of training examples, so
        that the harness can run shards of blocks as separate jobs (``stage=factors``); a
        pass is taken once the previous one has finished. Default: none."""
        return iter(())

    @abstractmethod
    def score(self, problem: AttributionProblem) -> Tensor:
        """Returns scores ``[n_queries, n_train]``; positive means up-weighting helps."""

    def score_columns(self, problem: AttributionProblem, columns: Tensor) -> Tensor:
        """Scores of the training examples ``columns`` only, ``[n_queries, len(columns)]``
        (``[n_layers, ...]`` with per-layer scores), equal to those columns of
        :meth:`score`. Default: all scores, sliced."""
        return self.score(problem)[..., columns]

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        """Self-influence ∇L(z_m)ᵀ H⁻¹ ∇L(z_m) of every training example, ``[n_train]``.

        High self-influence flags examples the model finds surprising (mislabelled ones).
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot compute self-influence; use grad_dot, explicit, "
            "tracin or trak for mislabel detection.")


# The inherited fit runs a subclass's fit passes (generators): it names the estimator too.
names_arguments(Estimator, "estimator", ("fit",))

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
        modules: which linear layers to attribute through (``all``, ``blocks``, ``mlp_only``
            or a regex); None: the problem's default (``problem.modules``), else all.
        chunk_size: training examples per gradient chunk; bounds scoring memory.
        per_layer: also keep layer-wise scores ``[n_layers, n_queries, n_train]`` in
            ``self.layer_scores`` (they sum exactly to the total).
        projection_dim: project every gradient to about this many numbers (None: exact).
        projection_kind: ``rademacher`` or ``gaussian`` projection entries.
        projection_seed: the projection's seed.
        index_dir: with a projection, keep projected training gradients in this directory
            and reuse them (None: recompute every time).
        projection_structure: ``kronecker`` (per layer, from the factored gradient; cheap,
            for estimators that apply no element-wise correction), ``dense`` (per-example
            gradients times a block-generated dense matrix; more accurate per dimension) or
            ``sparse`` (CountSketch of the per-example gradients; O(P) whatever the dim).
        candidates: ``{retriever: tfidf|bm25, k}``: score each query only against its top-k
            lexical candidates (the rest NaN; :mod:`estimators.candidates`), or None.
    """

    # Shared arguments a subclass refuses when set, each with the sentence that says why
    # ("{name}" is the estimator's config name).
    unsupported: ClassVar[dict[str, str]] = {}
    # Whether query and training gradients are scaled to unit length over all layers
    # (grad_cos): the layer-wise path divides each score by both norms.
    unit_norm: ClassVar[bool] = False

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
        if (self.per_layer and self.projection_options.enabled
                and projection_structure != "kronecker"):
            raise OptionError(f"a {projection_structure} projection mixes layers, so "
                              "{per_layer} scores need {projection_structure=kronecker} (or no "
                              "projection).")
        self.layer_scores: Tensor | None = None
        self.memory_budget: memory.Budget | None = None  # set by the harness (memory_budget_mb)
        self.plan: scoring.ScorePlan | None = None
        self._planned: int | None = None  # id() of the problem self.plan was made for

    def engine(self, problem: AttributionProblem) -> GradientEngine:
        """The gradient engine over the tracked layers: ``modules``, else the problem's
        default (``problem.modules``: hf_lm's transformer blocks), else every linear layer."""
        return GradientEngine(problem.model, self.modules or problem.modules)

    def plan_memory(self, problem: AttributionProblem,
                    budget: memory.Budget | None = None) -> scoring.ScorePlan:
        """Sizes scoring to the memory budget (:mod:`estimators.scoring`): lowers (never
        raises) ``chunk_size`` to what fits and keeps the plan for :meth:`score`; refuses a
        setting that cannot fit, naming the key to change.

        Args:
            budget: the budget; default :attr:`memory_budget` (set by the harness from
                ``memory_budget_mb``), else the default fraction of available memory.
        """
        budget = budget or self.memory_budget or memory.budget(None, problem.device)
        engine = self.engine(problem)
        self.plan = scoring.plan(self, problem, engine, budget, self.state_bytes(engine))
        self.chunk_size, self.memory_budget, self._planned = \
            self.plan.chunk_size, budget, id(problem)
        return self.plan

    def plan_for(self, problem: AttributionProblem) -> scoring.ScorePlan:
        """The plan made for ``problem`` (:meth:`plan_memory`), made now if there is none."""
        return self.plan if self._planned == id(problem) else self.plan_memory(problem)

    def state_bytes(self, engine: GradientEngine) -> float:
        """Bytes of fitted state held while scoring (factors). Default: none."""
        return 0.0

    def layer_preconditioners(self, problem: AttributionProblem,
                              engine: GradientEngine) -> dict[str, LayerPreconditioner] | None:
        """P as one :class:`~estimators.layerwise.LayerPreconditioner` per layer, for the
        layer-wise, factored scoring path; None for an estimator whose P mixes layers (it
        overrides :meth:`precondition`, and scores from dense query gradients). Default: the
        identity, unless :meth:`precondition` is overridden."""
        overridden = type(self).precondition is not GradientEstimator.precondition
        if overridden and not self.unit_norm:  # (grad_cos's override is the unit norm,
            return None                        # which the layer-wise path applies itself)
        return {name: IDENTITY for name in engine.names}

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

    def score_columns(self, problem: AttributionProblem, columns: Tensor) -> Tensor:
        if type(self).score is not GradientEstimator.score:  # its own score: all, sliced
            return super().score_columns(problem, columns)
        return self.score_model(problem, columns=columns)

    def score_model(self, problem: AttributionProblem, offset: int = 0,
                    columns: Tensor | None = None) -> Tensor:
        """Scores of ``problem.model``: ``[n_queries, n_train]``, or per layer
        ``[n_layers, n_queries, n_train]`` when ``per_layer``; only the training examples
        ``columns`` (in that order) when given."""
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        pres = None if projector is not None else self.layer_preconditioners(problem, engine)
        self._check_all_parameters(engine, pres)
        dtype = score_dtype(problem.model)
        everything = columns is None and not self.candidates
        columns = torch.arange(problem.n_train) if columns is None else torch.as_tensor(columns)
        position = torch.arange(len(columns))  # where each scored column goes in the output
        mask = None
        if self.candidates:  # gradients only for the union of the queries' candidates
            mask = lexical.candidate_mask(problem, **self.candidates)[:, columns]
            position = mask.any(0).nonzero().flatten()
        train = problem if everything else lexical.restricted(problem, columns[position])
        n_layers = len(engine.layers) if self.per_layer else None
        shape = (problem.n_queries, len(columns))
        out = torch.zeros((n_layers, *shape) if n_layers else shape, dtype=dtype)
        if pres is None:
            chunks = self._dense_scores(problem, train, engine, projector)
        else:
            sizes = self.plan_for(problem)
            store = scoring.query_store(self, problem, engine, pres, sizes, self.memory_budget)
            chunks = scoring.scores(self, problem, train, engine, store, sizes)
        for idx, values in chunks:
            out[..., position[idx]] = values.to(dtype).cpu()
        return lexical.fill_unscored(out, mask) if mask is not None else out

    def _check_all_parameters(self, engine: GradientEngine,
                              pres: dict[str, LayerPreconditioner] | None) -> None:
        if engine.extras is not None and (pres is None or self.per_layer
                                          or any(not p.identity for p in pres.values())):
            raise ValueError(
                f"modules=all_parameters is for gradient similarity (grad_dot, grad_cos, tracin "
                f"without projection or per_layer); {type(self).__name__.lower()} as configured "
                "attributes through linear layers only: set estimator.modules to null, all, "
                "blocks or a regex.")

    def _dense_scores(self, problem: AttributionProblem, train: AttributionProblem,
                      engine: GradientEngine, projector: Projector | None) -> Iterator:
        """Scores from dense (or projected) query gradients ``{layer: [Q, ...]}``, for
        estimators whose P mixes layers, and for projected gradients."""
        query_grads = self.query_gradients(problem, engine, projector)
        pre = self.precondition(problem, engine, query_grads)
        dtype = score_dtype(problem.model)
        pre = {n: g.to(dtype) for n, g in pre.items()}
        for idx, grads in self.training_gradients(train, engine, projector):
            grads = {n: g.to(dtype) for n, g in self.transform_train(grads).items()}
            yield idx, -dot(pre, grads, per_layer=self.per_layer)
            del grads  # one chunk alive at a time

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        return self.self_influence_model(problem)

    def self_influence_model(self, problem: AttributionProblem, offset: int = 0) -> Tensor:
        """``[n_train]``: T(∇L(z_m)) · P ∇L(z_m) for ``problem.model`` (H = I: ‖∇L‖²)."""
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        pres = None if projector is not None else self.layer_preconditioners(problem, engine)
        self._check_all_parameters(engine, pres)
        if pres is not None:
            self.plan_for(problem)
            return scoring.self_influence(problem, engine, pres, self.chunk_size,
                                          self.unit_norm)
        dtype = score_dtype(problem.model)
        values = torch.zeros(problem.n_train, dtype=dtype)
        for idx, grads in self.training_gradients(problem, engine, projector):
            pre = self.precondition(problem, engine, grads)
            pre = {n: g.to(dtype) for n, g in pre.items()}
            train = {n: g.to(dtype) for n, g in self.transform_train(grads).items()}
            values[idx] = sum((pre[n].flatten(1) * train[n].flatten(1)).sum(1)
                              for n in train).cpu()
        return values
