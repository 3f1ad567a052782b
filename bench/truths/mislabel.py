"""``mislabel``: mislabel detection (Koh & Liang 2017 §5.4; Pruthi et al. 2020 §4).

The task corrupts some training labels and says which (the problem's ``flipped_labels``
capability, bool ``[n_train]``); the estimator ranks training examples by self-influence
∇L(z_m)ᵀ H⁻¹ ∇L(z_m). A ``run`` kind that needs the estimator, with no settings; an
estimator without self-influence leaves it out with a warning. The metrics
``mislabel_auc``, ``mislabel_recall@10pct`` and ``@20pct`` read it
(:mod:`bench.metrics.mislabel`).
"""

from __future__ import annotations

import logging
import time

from bench.truths.base import GroundTruth, TruthContext, register_truth

log = logging.getLogger(__name__)


@register_truth
class Mislabel(GroundTruth):
    """Flipped labels against the estimator's self-influence (see module docstring)."""

    name = "mislabel"
    scope = "run"
    needs = "scores"
    sharded = False

    def active(self, ctx: TruthContext) -> bool:
        return ctx.problem.flipped_labels is not None

    def load(self, ctx: TruthContext) -> dict | None:
        """``{self_influence [n_train], flipped [n_train], seconds}``, or None."""
        start = time.perf_counter()
        try:
            values = ctx.estimator.self_influence(ctx.problem)
        except NotImplementedError as err:
            log.warning("%s; no mislabel metrics.", err)
            return None
        return {"self_influence": values.detach().float().cpu(),
                "flipped": ctx.problem.flipped_labels, "seconds": time.perf_counter() - start}
