"""``loo``: leave-one-out retraining, for convex tasks (Koh & Liang 2017).

``n`` training points drawn by a seeded generator are each removed in turn and the model is
retrained, warm-started from the full-data optimum (unique for a convex objective); the
truth is the actual effect f(θ) − f(θ₋ₘ) per query. The metrics ``loo_pearson`` and
``loo_spearman`` read it (:mod:`bench.metrics.correlation`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench import ground_truth as driver
from bench.truths.base import GroundTruth, TruthContext, register_truth
from bench.truths.retraining import RETRAIN_SEED_BASE, check_retrainable, fit_one, stacked
from estimators.options import natural, positive
from tasks.base import Task


@register_truth
class LOO(GroundTruth):
    """Leave-one-out retraining (see module docstring).

    Settings (``task.loo``): ``n`` points removed one at a time, ``seed`` of their generator.
    """

    name = "loo"
    defaults = {"n": 50, "seed": 0}

    def validate(self) -> None:
        positive("n", self.spec["n"], integer=True)
        natural("seed", self.spec["seed"])

    def check(self, task: Task) -> None:
        if not task.convex:
            raise ValueError(
                f"{type(task).__name__} is not convex: removing one training point moves a "
                "non-convex model less than a change of seed, so LOO is not offered; set "
                "task.loo=null and use LDS.")
        check_retrainable(task, "task.loo")

    def plan(self, ctx: TruthContext) -> driver.Plan:
        gen = torch.Generator().manual_seed(int(self.spec["seed"]))
        indices = torch.randperm(ctx.task.n_train, generator=gen)[: int(self.spec["n"])]
        return self.make_plan(ctx, list(range(len(indices))), {"indices": indices})

    def compute(self, ctx: TruthContext, plan: driver.Plan, units: list[int],
                desc: str) -> dict[str, Tensor]:
        task = ctx.task
        model = task.build_model(RETRAIN_SEED_BASE)  # the full-data optimum, seed-independent
        task.fit(model, seed=RETRAIN_SEED_BASE)
        init, reference = model.state_dict(), task.measure_queries(model)
        values = []
        for unit in tqdm(units, desc=desc, disable=None):
            keep = torch.ones(task.n_train, dtype=torch.bool)
            keep[plan.meta["indices"][unit]] = False
            values.append(fit_one(task, RETRAIN_SEED_BASE, keep.nonzero().flatten(), init))
        return {"values": stacked(values), "reference": reference}

    def assemble(self, ctx: TruthContext, plan: driver.Plan, shards: driver.Shards) -> dict:
        """``indices [L]``, ``reference [Q]`` = f(θ), ``effects [L, Q]`` = f(θ) − f(θ₋ₘ)."""
        reference = shards.payloads[0]["reference"]
        return {"indices": plan.meta["indices"], "reference": reference,
                "effects": reference[None, :] - shards.values}
