"""``trackstar``: TrackStar (Chang et al. 2024, §3, eq. 2), every component a switch.

Each example is encoded by its loss gradient (the query by its measurement gradient),

    φ(z) = R^(-1/2) Pᵀ (∇θ L(z) / √(v̂ + ε))
    score(q, m) = −φ(z_q) · φ(z_m)         (optionally with φ scaled to unit length)

with the switches

* ``optimizer_correction``: divide the gradient element-wise by √(v̂ + ε), v̂ the
  (bias-corrected) Adam second moment of the final training checkpoint;
* ``projection_dim``: P, the shared seeded random projection (:mod:`estimators.projection`;
  dense, because the correction acts element-wise before it);
* ``hessian``: R, the second moment E[Pᵀg gᵀP] of encodings of the training set (``train``),
  of the queries (``task``: Chang et al.'s task-specific Hessian), or their mixture
  ``mix·R_task + (1 − mix)·R_train`` (``mixed``); ``none`` for R = I. R is damped by
  ``damping`` × its mean eigenvalue and inverted through a float64 eigendecomposition;
* ``unit_norm``: scale each φ to unit length (cosine similarity).

With every switch off the score is ``grad_dot``'s, with only ``unit_norm`` ``grad_cos``'s.
Sign: the query side is ∇f (f = log p(target) on facts, = −query loss), so a positive score
is a proponent as everywhere in the project. Training encodings (corrected, projected) go
into the on-disk gradient index once; R and the unit norms are applied at score time, so a
new query set costs its own gradients plus one or two passes over the d-dimensional index.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import GradientEstimator, check_positive
from estimators.gradients import GradientEngine, LayerGrads
from estimators.problem import AttributionProblem, adam_state

HESSIANS = ("none", "train", "task", "mixed")


class TrackStar(GradientEstimator):
    """TrackStar with ablation switches (see module docstring).

    Args:
        optimizer_correction: divide gradients by √(v̂ + ε) from the final Adam state.
        epsilon: ε of the optimizer correction.
        hessian: ``none``, ``train``, ``task`` or ``mixed``.
        mix: weight of the task (query) second moment in ``mixed``.
        damping: added to R's eigenvalues, relative to their mean.
        unit_norm: unit-normalise encodings.
        max_hessian_dim: refuse an R larger than this (set ``projection_dim`` instead).
        **kwargs: :class:`~estimators.base.GradientEstimator` arguments (``projection_dim``,
            ``projection_kind``, ``projection_seed``, ``index_dir``, ``chunk_size``,
            ``modules``, ``projection_structure``: ``dense`` (default; accurate per
            dimension, regenerates its P × d matrix per chunk) or ``kronecker`` (R_oᵀ G R_a per
            layer on the corrected gradient; much cheaper, less accurate per dimension)).
    """

    def __init__(self, optimizer_correction: bool = True, epsilon: float = 1e-8,
                 hessian: str = "mixed", mix: float = 0.5, damping: float = 1e-3,
                 unit_norm: bool = True, max_hessian_dim: int = 20_000, **kwargs):
        kwargs.setdefault("projection_structure", "dense")
        if kwargs.get("per_layer"):
            raise ValueError("trackstar mixes layers (projection, R); per_layer is not defined.")
        if kwargs.get("candidates"):
            raise ValueError("trackstar scores every training example; candidates is not "
                             "supported (it applies to grad_dot, grad_cos, tracin, ...).")
        super().__init__(**kwargs)
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        check_positive("epsilon", epsilon)
        check_positive("damping", damping)
        self.optimizer_correction = bool(optimizer_correction)
        self.epsilon = float(epsilon)
        self.hessian = hessian
        self.mix = float(mix)
        self.damping = float(damping)
        self.unit_norm = bool(unit_norm)
        self.max_hessian_dim = int(max_hessian_dim)
        self.diagnostics: dict[str, float] = {}

    # -- the optimizer correction: g / √(v̂ + ε), element-wise ------------------------------
    def correction(self, problem: AttributionProblem, engine: GradientEngine):
        if not self.optimizer_correction:
            return None
        adam = adam_state(problem.model, problem.checkpoints[-1].optimizer_state
                          if problem.checkpoints else None)
        if adam is None:
            raise ValueError(
                "trackstar's optimizer_correction needs the Adam second moment of the final "
                "training checkpoint, but this task's model was not trained with Adam; set "
                "estimator.optimizer_correction=false.")
        bias = 1.0 - adam["betas"][1] ** max(adam["step"], 1.0)
        v = adam["exp_avg_sq"]
        scales = {}
        for layer in engine.layers:
            weight = v[f"{layer.name}.weight"]
            parts = [weight.T if layer.transposed else weight]
            if layer.has_bias:
                parts.append(v[f"{layer.name}.bias"][:, None])
            v_hat = torch.cat(parts, dim=1).to(problem.device) / bias
            scales[layer.name] = (v_hat + self.epsilon).rsqrt()

        def correct(grads: LayerGrads) -> LayerGrads:
            return {n: g * scales[n].to(g.dtype) for n, g in grads.items()}

        return correct

    def correction_spec(self) -> dict:
        return {"optimizer_correction": self.optimizer_correction, "epsilon": self.epsilon}

    # -- encodings, R^(-1/2), unit norms ----------------------------------------------------
    def _flat(self, projector, engine: GradientEngine, grads: LayerGrads) -> Tensor:
        return (engine if projector is None else projector).flatten(grads).double()

    def _second_moment(self, problem, engine, projector) -> Tensor:
        """R_train ``[d, d]``: the mean outer product of the training encodings."""
        total = None
        for _, grads in self.training_gradients(problem, engine, projector):
            g = self._flat(projector, engine, grads)
            total = g.T @ g if total is None else total + g.T @ g
        return total / problem.n_train

    def _whitening(self, problem, engine, projector, queries: Tensor) -> Tensor | None:
        """R^(-1/2) ``[d, d]`` for the configured ``hessian``, or None for R = I."""
        if self.hessian == "none":
            return None
        d = queries.shape[1]
        if d > self.max_hessian_dim:
            raise ValueError(
                f"trackstar's hessian correction forms a {d} x {d} matrix, above "
                f"max_hessian_dim={self.max_hessian_dim}: set estimator.projection_dim "
                "(e.g. 4096), or hessian=none.")
        task = queries.T @ queries / queries.shape[0]
        if self.hessian == "task":
            r = task
        else:
            train = self._second_moment(problem, engine, projector)
            r = train if self.hessian == "train" else self.mix * task + (1 - self.mix) * train
        eigenvalues, vectors = torch.linalg.eigh(r)
        eigenvalues = eigenvalues.clamp_min(0) + self.damping * eigenvalues.clamp_min(0).mean()
        self.diagnostics["hessian_condition"] = float(eigenvalues.max() / eigenvalues.min())
        return (vectors * eigenvalues.rsqrt()) @ vectors.T

    def _encode(self, g: Tensor, whitening: Tensor | None) -> Tensor:
        if whitening is not None:
            g = g @ whitening
        if self.unit_norm:
            g = torch.nn.functional.normalize(g, dim=1)
        return g

    def score_model(self, problem: AttributionProblem, offset: int = 0) -> Tensor:
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        queries = self._flat(projector, engine, self.query_gradients(problem, engine, projector))
        whitening = self._whitening(problem, engine, projector, queries)
        phi_q = self._encode(queries, whitening)
        scores = torch.zeros(problem.n_queries, problem.n_train)
        for rows, grads in self.training_gradients(problem, engine, projector):
            phi_m = self._encode(self._flat(projector, engine, grads), whitening)
            scores[:, rows] = -(phi_q @ phi_m.T).float().cpu()
        return scores

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        raise NotImplementedError(
            "trackstar cannot compute self-influence (its R may depend on the queries); use "
            "grad_dot, explicit, tracin or trak for mislabel detection.")
