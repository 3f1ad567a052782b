"""``trackstar``: TrackStar (Chang et al. 2024, §3, eq. 2), every component a switch.

Each example is encoded by its loss gradient (the query by its measurement gradient),

    φ(z) = R^(-1/2) Pᵀ (∇θ L(z) / √(v̂ + ε))
    score(q, m) = −φ(z_q) · φ(z_m)         (optionally with φ scaled to unit length)

with the switches

* ``optimizer_correction``: divide the gradient element-wise by √(v̂ + ε), v̂ the
  (bias-corrected) Adam second moment of the final training checkpoint;
* ``projection_dim``: P, the shared seeded random projection (:mod:`estimators.projection`),
  applied after the element-wise correction;
* ``hessian``: R, the second moment E[Pᵀg gᵀP] of encodings of the training set (``train``),
  of the queries (``task``: Chang et al.'s task-specific Hessian), or their mixture
  ``mix·R_task + (1 − mix)·R_train`` (``mixed``); ``none`` for R = I. R is damped by
  ``damping`` × its mean eigenvalue; R_train's eigendecomposition (float64) is computed once
  per index and the query part enters by the Woodbury identity;
* ``unit_norm``: scale each φ to unit length (cosine similarity).

With every switch off the score is ``grad_dot``'s, with only ``unit_norm`` ``grad_cos``'s.
Sign: the query side is ∇f (f = log p(target) on facts, = −query loss), so a positive score
is a proponent as everywhere in the project. Training encodings (corrected, projected) go
into the on-disk gradient index once, with R_train's eigenbasis and the encodings rotated
into it; R and the unit norms are applied at score time, so a new query set costs its own
gradients plus one pass over the d-dimensional rotated index (O(n·d·Q), no d × d work).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from estimators.atomic import load_checked, save_checked
from estimators.base import GradientEstimator
from estimators.gradients import GradientEngine, LayerGrads
from estimators.index import GradientIndex, read_rows
from estimators.options import OptionError, bounded, choice, flag, positive
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
            ``modules``, ``projection_structure``: ``kronecker`` (default; R_oᵀ G R_a per layer
            on the corrected gradient) or ``dense`` (one P × d matrix, regenerated per chunk)).
    """

    unsupported = {
        "per_layer": "trackstar mixes layers (projection, R), so it has no layer-wise scores; "
                     "set per_layer=false.",
        "candidates": "trackstar scores every training example; set candidates=null (lexical "
                      "candidates apply to grad_dot, grad_cos and tracin).",
    }

    def __init__(self, optimizer_correction: bool = True, epsilon: float = 1e-8,
                 hessian: str = "mixed", mix: float = 0.5, damping: float = 1e-3,
                 unit_norm: bool = True, max_hessian_dim: int = 20_000, **kwargs):
        super().__init__(**kwargs)
        self.optimizer_correction = flag("optimizer_correction", optimizer_correction)
        self.epsilon = positive("epsilon", epsilon)
        self.hessian = choice("hessian", hessian, HESSIANS)
        self.mix = bounded("mix", mix, 0, 1)
        self.damping = positive("damping", damping)
        self.unit_norm = flag("unit_norm", unit_norm)
        self.max_hessian_dim = positive("max_hessian_dim", max_hessian_dim, integer=True)
        self.diagnostics: dict[str, float] = {}

    # -- the optimizer correction: g / √(v̂ + ε), element-wise ------------------------------
    def correction(self, problem: AttributionProblem, engine: GradientEngine):
        if not self.optimizer_correction:
            return None
        adam = adam_state(problem.model, problem.checkpoints[-1].optimizer_state
                          if problem.checkpoints else None)
        if adam is None:
            raise OptionError(
                "trackstar's {optimizer_correction} needs the Adam second moment of the final "
                "training checkpoint, but this task's model was not trained with Adam; set "
                "{optimizer_correction=false}.")
        bias = 1.0 - adam["betas"][1] ** max(adam["step"], 1.0)
        v = adam["exp_avg_sq"]
        scales = {}
        for layer in engine.layers:
            v_hat = layer.join(v[f"{layer.name}.weight"], v.get(f"{layer.name}.bias"))
            v_hat = v_hat.to(problem.device) / bias
            scales[layer.name] = (v_hat + self.epsilon).rsqrt()

        def correct(grads: LayerGrads) -> LayerGrads:
            return {n: g * scales[n].to(g.dtype) for n, g in grads.items()}

        return correct

    def correction_spec(self) -> dict:
        return {"optimizer_correction": self.optimizer_correction, "epsilon": self.epsilon}

    # -- encodings, R⁻¹, unit norms ---------------------------------------------------------
    # φ_q·φ_m = qᵀR⁻¹m and ‖φ‖² = gᵀR⁻¹g (R^(-1/2) is symmetric), so only R⁻¹ is needed. With
    # R_train = V diag(λ) Vᵀ cached beside the index together with the rotated encodings
    # Z = M V, a query set costs O(n·d·Q): R = A + (w/Q) q̂ᵀq̂ with A = (1 − w) diag(λ) + δI
    # diagonal in that basis, inverted by the Woodbury identity (a Q × Q solve).
    def _flat(self, projector, engine: GradientEngine, grads: LayerGrads) -> Tensor:
        return (engine if projector is None else projector).flatten(grads).double()

    def _encodings(self, problem, engine, projector) -> Iterator[tuple[slice, Tensor]]:
        """Training encodings ``(rows, [B, d] float64)``: corrected, projected."""
        for rows, grads in self.training_gradients(problem, engine, projector):
            yield rows, self._flat(projector, engine, grads)

    def _train_basis(self, problem, engine, projector) -> tuple[Tensor, Tensor, Iterator]:
        """``(V [d, d], λ [d], rows)``: R_train's eigenbasis and eigenvalues (float64), and
        the training encodings rotated into it, ``(rows, Z [B, d])``. With a gradient index,
        V, λ and Z are stored beside it, so later query sets skip the eigendecomposition."""
        key = self.index_key(problem, engine, projector)
        store = GradientIndex(self.index_dir) if key else None
        path = store.path(f"{key}-rtrain").with_suffix(".pt") if key else None
        basis = load_checked(path, key, "rtrain basis") if key else None
        if basis is None:
            total = None
            for _, g in self._encodings(problem, engine, projector):
                total = g.T @ g if total is None else total + g.T @ g
            eigenvalues, vectors = torch.linalg.eigh(total / problem.n_train)
            basis = {"key": key, "eigenvalues": eigenvalues, "vectors": vectors}
            if key:
                save_checked(basis, path, "rtrain basis")
        vectors, eigenvalues = basis["vectors"], basis["eigenvalues"]
        rotated = ((r, g @ vectors) for r, g in self._encodings(problem, engine, projector))
        if key:
            array = store.load_or_build(f"{key}-rotated", (problem.n_train, len(eigenvalues)),
                                        rotated)
            rotated = ((r, z.double()) for r, z in read_rows(array, self.chunk_size))
        return vectors, eigenvalues, rotated

    def _scores_whitened(self, problem, engine, projector, queries: Tensor) -> Tensor:
        """``[Q, n]`` scores −qᵀR⁻¹m (unit-normalised in the R⁻¹ metric if ``unit_norm``)."""
        n_q, d = queries.shape
        if d > self.max_hessian_dim:
            raise OptionError(
                f"trackstar's hessian correction forms a {d} x {d} matrix, above "
                f"{{max_hessian_dim}}={self.max_hessian_dim}: set {{projection_dim}} "
                "(e.g. 4096), or {hessian=none}.")
        w = {"train": 0.0, "task": 1.0, "mixed": self.mix}[self.hessian]
        if w < 1:
            vectors, eigenvalues, encodings = self._train_basis(problem, engine, projector)
            q_hat = queries @ vectors
        else:
            eigenvalues = torch.zeros(d, dtype=torch.float64)
            encodings, q_hat = self._encodings(problem, engine, projector), queries
        trace = (1 - w) * eigenvalues.clamp_min(0).sum() + w * q_hat.pow(2).sum() / n_q
        delta = self.damping * trace / d  # damping × the mean eigenvalue of R
        a = (1 - w) * eigenvalues.clamp_min(0) + delta  # A's diagonal in the basis
        q_a = q_hat / a
        gram = q_a @ q_hat.T  # [Q, Q] qᵀA⁻¹q
        # R⁻¹ = A⁻¹ − A⁻¹q̂ᵀ K⁻¹ q̂A⁻¹ with K = (Q/w) I + q̂A⁻¹q̂ᵀ (no correction when w = 0)
        k_inv = (torch.linalg.inv(n_q / w * torch.eye(n_q, dtype=gram.dtype) + gram)
                 if w > 0 else torch.zeros_like(gram))
        q_norm = (gram.diagonal() - (gram * (k_inv @ gram)).sum(0)).sqrt()
        self.diagnostics["hessian_damping"] = float(delta)
        scores = torch.zeros(n_q, problem.n_train, dtype=torch.float32)
        for rows, z in encodings:
            b = q_a @ z.T  # [Q, B] qᵀA⁻¹m
            k_b = k_inv @ b
            dots = b - gram @ k_b
            if self.unit_norm:
                m_norm = ((z.pow(2) / a).sum(1) - (b * k_b).sum(0)).clamp_min(0).sqrt()
                dots = dots / (q_norm[:, None] * m_norm[None]).clamp_min(1e-300)
            scores[:, rows] = -dots.float().cpu()
        return scores

    def score_model(self, problem: AttributionProblem, offset: int = 0) -> Tensor:
        engine = self.engine(problem)
        projector = self.projector(engine, offset)
        queries = self._flat(projector, engine, self.query_gradients(problem, engine, projector))
        if self.hessian != "none":
            return self._scores_whitened(problem, engine, projector, queries)
        normalize = torch.nn.functional.normalize
        phi_q = normalize(queries, dim=1) if self.unit_norm else queries
        scores = torch.zeros(problem.n_queries, problem.n_train, dtype=torch.float32)
        for rows, g in self._encodings(problem, engine, projector):
            phi_m = normalize(g, dim=1) if self.unit_norm else g
            scores[:, rows] = -(phi_q @ phi_m.T).float().cpu()
        return scores

    def self_influence(self, problem: AttributionProblem) -> Tensor:
        raise NotImplementedError(
            "trackstar cannot compute self-influence (its R may depend on the queries); use "
            "grad_dot, explicit, tracin or trak for mislabel detection.")
