"""``dattri_lissa``: dattri's LiSSA influence (Agarwal et al. 2017; Koh & Liang 2017).

dattri's recursion, per query gradient v, over mini-batch Hessian-vector products H_t:

    h ← v + (1 − d) h − H_t h / s,  returning h / s  →  (H + d·s I)⁻¹ v

so with dattri's ``damping`` d = (λ₂ + λ)/s and ``scaling`` s it estimates
(H + (λ₂ + λ) I)⁻¹ ∇f(z_q), the same fixed point as tda-bench's ``lissa`` with
``hvp: hessian`` (H: the Hessian of the mean training loss over the tracked parameters), and

    score(q, m) = −[(H + (λ₂ + λ) I)⁻¹ ∇θ f(z_q)] · ∇θ L(z_m)      ``[n_queries, n_train]``

computed by dattri 0.3.0's ``IFAttributorLiSSA``. ``scale: null`` sets s as tda-bench's
``lissa`` does: ``scale_margin`` × the top eigenvalue of H + (λ₂ + λ)I, from
``power_iterations`` full-data products of dattri's own ``hvp``. dattri samples each query's
mini-batches independently and recomputes every inverse for each training batch, so the
training set and the queries go to it as one batch each. The mapping from the problem is described
in :mod:`estimators.peers.dattri_base`.
"""

from __future__ import annotations

import torch

from estimators.options import bounded, number, positive
from estimators.peers.common import require
from estimators.peers.dattri_base import Dattri, dattri_task
from estimators.problem import AttributionProblem


class DattriLiSSA(Dattri):
    """dattri's LiSSA.

    Args:
        depth: recursion steps (dattri's ``recursion_depth``).
        batch_size: examples per mini-batch product.
        repeat: independent recursions averaged (dattri's ``num_repeat``).
        damping: λ, on top of the task's λ₂.
        scale: s (dattri's ``scaling``); None: ``scale_margin`` × the top eigenvalue.
        scale_margin: safety factor on that estimate.
        power_iterations: steps of the estimate.
        seed: seeds the mini-batch sampling and the power iteration.
        modules: as for :class:`~estimators.peers.dattri_base.Dattri` (the training set and
            the queries go to dattri as one batch each).
    """

    name = "dattri_lissa"
    ours = "lissa"

    def __init__(self, depth: int = 2000, batch_size: int = 128, repeat: int = 1,
                 damping: float = 1e-3, scale: float | None = None, scale_margin: float = 1.2,
                 power_iterations: int = 20, seed: int = 0, modules: str | None = None):
        super().__init__(modules=modules, chunk_size=None)
        self.depth = positive("depth", depth, integer=True)
        self.batch_size = positive("batch_size", batch_size, integer=True)
        self.repeat = positive("repeat", repeat, integer=True)
        self.damping = bounded("damping", damping, 0)
        self.scale = positive("scale", scale, allow_none=True)
        self.scale_margin = bounded("scale_margin", scale_margin, 1)
        self.power_iterations = positive("power_iterations", power_iterations, integer=True)
        self.seed = number("seed", seed, integer=True)
        self.diagnostics: dict[str, float] = {}

    def top_eigenvalue(self, problem: AttributionProblem, task, layer_name: list[str]) -> float:
        """The top eigenvalue of H + (λ₂ + λ)I by power iteration on dattri's ``hvp``."""
        hessian = require("dattri.func.hessian", self.name)
        params, _ = task.get_param(0, layer_name=layer_name)
        data = tuple(self.batches.flatten(self.batches.collate(
            [problem.train[i] for i in range(problem.n_train)])))
        loss = task.get_loss_func(layer_name=layer_name, ckpt_idx=0)
        product = hessian.hvp(lambda p: loss(p, data))
        generator = torch.Generator().manual_seed(self.seed)
        v = torch.randn(params.shape, generator=generator, dtype=params.dtype)
        value = 0.0
        for _ in range(self.power_iterations):
            v = v / v.norm()
            hv = product((params.detach(),), v) + (problem.l2 + self.damping) * v
            value = float(v @ hv)
            v = hv.detach()
        return value

    def attributor_for(self, problem: AttributionProblem, layer_name: list[str]):
        influence = require("dattri.algorithm.influence_function", self.name)
        task, _ = dattri_task(problem, self.batches)
        scale = self.scale
        if scale is None:
            with torch.enable_grad():
                scale = self.scale_margin * self.top_eigenvalue(problem, task, layer_name)
        self.diagnostics = {"lissa_scale": scale}
        return influence.IFAttributorLiSSA(
            task=task, layer_name=layer_name, device=problem.device.type,
            batch_size=self.batch_size, num_repeat=self.repeat, recursion_depth=self.depth,
            damping=(problem.l2 + self.damping) / scale, scaling=scale)

    def attribute(self, train, queries):
        with torch.random.fork_rng():  # dattri samples mini-batches from the global RNG
            torch.manual_seed(self.seed)
            scores = super().attribute(train, queries)
        if not torch.isfinite(scores).all():
            raise FloatingPointError(f"{self.name} diverged (non-finite scores): raise "
                                     "estimator.scale (or estimator.damping).")
        return scores
