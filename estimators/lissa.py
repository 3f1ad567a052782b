"""``lissa``: inverse-HVPs by a stochastic truncated Neumann series (Agarwal et al. 2017;
Koh & Liang 2017, §3).

For each query gradient v = ∇θ f(z_q) the recursion (Koh & Liang's eq. after (3)) is

    h₀ = v,    h_t = v + (I − (H_t + λI)/s) h_{t−1},    t = 1 … depth,

with H_t the curvature of a fresh mini-batch of training examples (mean over the batch,
plus the task's λ₂I), λ the damping and s the scale. Its fixed point is s (H + λI)⁻¹ v, so
h_depth / s ≈ (H + λI)⁻¹ v. It converges when s is above the largest eigenvalue of H + λI
(``scale: null`` estimates that by power iteration) and H + λI is positive definite (always
for ``hvp: ggn``; for ``hvp: hessian``, λ must exceed minus the smallest eigenvalue).
``repeat`` independent recursions (different mini-batch sequences) are averaged.

score(q, m) = −(h_depth(∇f(z_q)) / s) · ∇L(z_m). All queries' recursions run together: each
step is one mini-batch curvature product, ``vmap``-ed over the ``[n_queries, P]`` stack.

``self.diagnostics`` records the convergence: ``lissa_rel_change``, the largest over queries
of ‖h_T − h_{T−k}‖ / ‖h_T‖ over the last k = ⌈depth/10⌉ steps (small = converged), and the
scale s used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import default_collate

from estimators.base import EXACT_GRADIENTS, GradientEstimator
from estimators.curvature_products import (
    curvature_sample,
    full_products,
    summed_products,
    top_eigenvalue,
)
from estimators.gradients import GradientEngine, LayerGrads
from estimators.options import CURVATURES, bounded, choice, natural, positive
from estimators.problem import AttributionProblem, eval_mode, move_to


class LiSSA(GradientEstimator):
    """Influence through LiSSA's stochastic inverse-HVPs of the query gradients.

    Args:
        hvp: ``ggn`` (Gauss-Newton-vector products, default) or ``hessian`` (exact HVPs).
        damping: λ added to the curvature (on top of the task's λ₂).
        scale: s, or None to use ``scale_margin`` × the largest eigenvalue of H + λI.
        scale_margin: safety factor over the estimated largest eigenvalue.
        power_iterations: power-iteration steps of that estimate (products over the whole
            curvature sample).
        depth: recursion steps.
        batch_size: training examples per mini-batch curvature product.
        repeat: independent recursions averaged.
        sample: estimate the curvature on a fixed random sample of this many training
            examples (the mini-batches are drawn from it, the power iteration runs on it);
            None: the whole training set.
        seed: seeds the mini-batch sampling, the curvature sample and the power iteration.
        **kwargs: ``modules``, ``chunk_size``, ``per_layer`` (see
            :class:`~estimators.base.GradientEstimator`).
    """

    unsupported = EXACT_GRADIENTS

    def __init__(self, hvp: str = "ggn", damping: float = 1e-3, scale: float | None = None,
                 scale_margin: float = 1.2, power_iterations: int = 20, depth: int = 2000,
                 sample: int | None = None,
                 batch_size: int = 128, repeat: int = 1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.hvp = choice("hvp", hvp, CURVATURES)
        self.damping = bounded("damping", damping, 0)
        self.scale = positive("scale", scale, allow_none=True)
        self.scale_margin = bounded("scale_margin", scale_margin, 1)
        self.power_iterations = positive("power_iterations", power_iterations, integer=True)
        self.depth = positive("depth", depth, integer=True)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.repeat = positive("repeat", repeat, integer=True)
        self.sample = positive("sample", sample, integer=True, allow_none=True)
        self.seed = natural("seed", seed)
        self.scale_used: float | None = None
        self.diagnostics: dict[str, float] = {}

    def fit(self, problem: AttributionProblem) -> None:
        """Fixes the scale s (estimating the top eigenvalue of H + λI when ``scale`` is None)."""
        if self.scale is not None:
            self.scale_used = self.scale
            return
        engine = self.engine(problem)
        full = full_products(curvature_sample(problem, self.sample, self.seed), engine,
                             self.hvp, self.chunk_size)
        generator = torch.Generator().manual_seed(self.seed)
        with eval_mode(problem.model):
            top = top_eigenvalue(full, engine.num_params, self.power_iterations, generator)
        self.scale_used = self.scale_margin * (top + self.damping)

    def precondition(self, problem: AttributionProblem, engine: GradientEngine,
                     query_grads: LayerGrads) -> LayerGrads:
        flat = engine.flatten(query_grads)
        return engine.unflatten(self.inverse_hvp(problem, engine, flat)[self.depth])

    def inverse_hvp(self, problem: AttributionProblem, engine: GradientEngine, vectors: Tensor,
                    depths: list[int] | None = None) -> dict[int, Tensor]:
        """(H + λI)⁻¹ v for every row of ``vectors`` ``[K, P]``.

        Args:
            depths: recursion depths at which to report the estimate (all ≤ ``depth``);
                default just ``depth``.

        Returns:
            ``{depth: [K, P]}``, each averaged over ``repeat`` recursions.
        """
        if self.scale_used is None:
            self.fit(problem)
        depths = sorted(set(depths or [self.depth]))
        if depths[-1] > self.depth or depths[0] < 1:
            raise ValueError(f"report depths must lie in [1, depth={self.depth}], got {depths}")
        s = self.scale_used
        products = summed_products(problem, engine, self.hvp)
        generator = torch.Generator().manual_seed(self.seed)
        sampler = _MiniBatches(curvature_sample(problem, self.sample, self.seed),
                               self.batch_size, generator)
        window = max(1, math.ceil(self.depth / 10))
        v = vectors.detach()
        totals = {d: torch.zeros_like(v) for d in depths}
        changes = []
        with eval_mode(problem.model):
            for _ in range(self.repeat):
                h, earlier = v.clone(), None
                for step in range(1, self.depth + 1):
                    batch = sampler.next()
                    hv = products(h, batch) / sampler.size + (problem.l2 + self.damping) * h
                    h = v + h - hv.to(h) / s
                    if step == self.depth - window:
                        earlier = h.clone()
                    if step in totals:
                        totals[step] += h / s
                if not torch.isfinite(h).all() or h.norm() > 1e12 * max(v.norm(), 1e-30):
                    raise FloatingPointError(
                        f"LiSSA diverged (scale s={s:.3g}): raise estimator.scale (s must exceed"
                        " the largest eigenvalue of the damped curvature) or, for hvp=hessian,"
                        " raise estimator.damping above minus its smallest eigenvalue."
                    )
                earlier = v if earlier is None else earlier
                rel = (h - earlier).norm(dim=1) / h.norm(dim=1).clamp_min(1e-30)
                changes.append(float(rel.max()))
        self.diagnostics = {"lissa_rel_change": max(changes), "lissa_scale": float(s)}
        return {d: t / self.repeat for d, t in totals.items()}


class _MiniBatches:
    """Seeded mini-batches of the training set, without replacement within an epoch."""

    def __init__(self, problem: AttributionProblem, batch_size: int, generator: torch.Generator):
        self.problem = problem
        self.size = min(batch_size, problem.n_train)
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self):
        if len(self.order) < self.size:
            self.order = torch.randperm(self.problem.n_train, generator=self.generator)
        idx, self.order = self.order[:self.size], self.order[self.size:]
        collate = self.problem.collate_fn or default_collate
        batch = collate([self.problem.train[i] for i in idx.tolist()])
        return move_to(batch, self.problem.device)
