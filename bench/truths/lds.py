"""``lds``: the linear datamodeling score's ground truth (Park et al. 2023).

``subsets`` random subsets S_j of a ``fraction`` α of the training set (a seeded generator),
each retrained with ``seeds`` seeds; the truth is the seed-averaged measurement
f(z_q; θ_{S_j}) of every query. A unit is one (subset, seed) model; a shard's models train as
one vectorised ensemble where the task can (:meth:`~tasks.base.Task.fit_many`). The metrics
``lds`` and ``lds_ceiling`` read it (:mod:`bench.metrics.correlation`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench import ground_truth as driver
from bench.truths.base import GroundTruth, TruthContext, register_truth
from bench.truths.retraining import RETRAIN_SEED_BASE, check_retrainable, fit_and_measure, stacked
from estimators.options import bounded, natural, positive
from tasks.base import Task


@register_truth
class LDS(GroundTruth):
    """Retraining on random subsets (see module docstring).

    Settings (``task.lds``): ``subsets`` M, ``fraction`` α, ``seeds`` K retraining seeds per
    subset, ``seed`` of the subsets' generator.
    """

    name = "lds"
    defaults = {"subsets": 50, "fraction": 0.5, "seeds": 1, "seed": 0}

    def validate(self) -> None:
        positive("subsets", self.spec["subsets"], integer=True)
        positive("seeds", self.spec["seeds"], integer=True)
        natural("seed", self.spec["seed"])
        bounded("fraction", self.spec["fraction"], 0.0, 1.0, open_low=True, open_high=True)

    def check(self, task: Task) -> None:
        check_retrainable(task, "task.lds")

    def plan(self, ctx: TruthContext) -> driver.Plan:
        n, spec = ctx.task.n_train, self.spec
        gen = torch.Generator().manual_seed(int(spec["seed"]))
        size = int(round(spec["fraction"] * n))
        masks = torch.zeros(spec["subsets"], n, dtype=torch.bool)
        for j in range(spec["subsets"]):
            masks[j, torch.randperm(n, generator=gen)[:size]] = True
        return self.make_plan(ctx, list(range(spec["subsets"] * spec["seeds"])),
                              {"masks": masks})

    def compute(self, ctx: TruthContext, plan: driver.Plan, units: list[int],
                desc: str) -> dict[str, Tensor]:
        jobs = []
        for unit in units:
            subset, k = divmod(unit, plan.spec["seeds"])
            jobs.append((RETRAIN_SEED_BASE + k, plan.meta["masks"][subset].nonzero().flatten()))
        return {"values": stacked(fit_and_measure(ctx.task, jobs, ctx.options.vectorise, desc))}

    def assemble(self, ctx: TruthContext, plan: driver.Plan, shards: driver.Shards) -> dict:
        """``masks [M, N]``, ``values [M, K, Q]`` (per seed), ``outputs [M, Q]`` (averaged)."""
        per_seed = shards.values.view(plan.spec["subsets"], plan.spec["seeds"], -1)
        return {"masks": plan.meta["masks"], "values": per_seed, "outputs": per_seed.mean(1)}
