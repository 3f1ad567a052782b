"""``proponents``: the attribution side of fact tracing (Chang et al. 2024).

For factual queries the training documents that state the fact are known; the task gives
them as the problem's ``proponents`` capability (per query, training indices; empty: the
query is left out). Nothing is computed or cached. A ``run`` kind configured by
``fact_metrics:`` (``k``: the cut-off of recall@k and of tail-patch; ``tail_patch_k``,
``seed`` and ``with_tail_patch``: see :mod:`bench.truths.tail_patch`). The metrics ``mrr``,
``recall@{k}`` and ``proponent_share`` read it (:mod:`bench.metrics.fact_tracing`).
"""

from __future__ import annotations

from bench.metrics.fact_tracing import proponents_truth
from bench.truths.base import GroundTruth, TruthContext, register_truth
from estimators.options import flag, natural, positive

FACT_DEFAULTS = {"k": 10, "seed": 0, "tail_patch_k": None, "with_tail_patch": True}


class FactTracing(GroundTruth):
    """What the fact-tracing kinds share: the ``fact_metrics:`` block, checked once; they
    compute in the run that needs them, never as ``stage=ground_truth`` jobs."""

    scope = "run"
    config_key = "fact_metrics"
    defaults = FACT_DEFAULTS
    sharded = False

    def validate(self) -> None:
        """Refuses a bad ``fact_metrics`` value, naming its key (in the caller's terms: the
        kind's construction gives the error its owner and the ``fact_metrics`` prefix)."""
        positive("k", self.spec["k"], integer=True)
        positive("tail_patch_k", self.spec["tail_patch_k"], integer=True, allow_none=True)
        natural("seed", self.spec["seed"])
        flag("with_tail_patch", self.spec["with_tail_patch"])


@register_truth
class Proponents(FactTracing):
    """The documents that state each query's fact (see module docstring)."""

    name = "proponents"
    needs = "model"

    def active(self, ctx: TruthContext) -> bool:
        return ctx.problem is not None and ctx.problem.proponents is not None

    def load(self, ctx: TruthContext) -> dict:
        """``{proponents: [Q lists], k, params: {k}}``."""
        return proponents_truth(ctx.problem, int(self.spec["k"]))
