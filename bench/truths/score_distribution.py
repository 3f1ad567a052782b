"""``score_distribution``: the scores themselves, for metrics of their shape (no ground truth).

Grosse et al. 2023 (§5.2) find influence heavy-tailed and ask how its concentration changes
with model scale. A ``run`` kind that needs the scores, with no settings, computing nothing:
it is there so that metrics of the score distribution (``top1pct_share``,
:mod:`bench.metrics.sparsity`) are specs like every other metric.
"""

from __future__ import annotations

from bench.truths.base import GroundTruth, TruthContext, register_truth


@register_truth
class ScoreDistribution(GroundTruth):
    """The estimator's scores, for shape metrics (see module docstring)."""

    name = "score_distribution"
    scope = "run"
    needs = "scores"
    sharded = False

    def load(self, ctx: TruthContext) -> dict:
        return {}
