"""LDS on a language model (``facts_lds``): the ground truth is the LM retrained on document
subsets by the task's own fit, and a run reports it per query group with its ceilings."""

from __future__ import annotations

import pytest
import torch

from bench.cli import run
from bench.truths.retraining import RETRAIN_SEED_BASE
from tests.helpers import ground_truth_of


def test_lds_units_are_the_lm_retrained_on_their_documents(make_cfg):
    cfg = make_cfg("facts_lds", "estimator=grad_dot")
    ctx, kind, plan = ground_truth_of(cfg, "lds")
    assert plan.meta["masks"].shape == (4, ctx.task.n_train)
    payload = kind.compute(ctx, plan, [3], "unit 3")  # subset 1, second seed
    kept = plan.meta["masks"][1].nonzero().flatten()
    model = ctx.task.build_model(RETRAIN_SEED_BASE + 1)
    ctx.task.fit(model, seed=RETRAIN_SEED_BASE + 1, indices=kept)
    torch.testing.assert_close(payload["values"][0], ctx.task.measure_queries(model))


def test_a_run_reports_lds_and_ceilings_per_query_group(make_cfg):
    record = run(make_cfg("facts_lds", "estimator=grad_dot", "fact_metrics.with_tail_patch=false"))
    for key in ("lds", "flipped_lds", "lds_ceiling", "flipped_lds_ceiling", "mrr"):
        assert record[key] is not None and -1 <= record[key] <= 1, key


def test_facts_still_refuses_leave_one_out(make_cfg):
    from hydra.utils import instantiate

    from bench import stages

    cfg = make_cfg("facts_lds", "task.loo={n: 3}")
    with pytest.raises(ValueError, match="not convex"):
        stages.configured_kinds(cfg, instantiate(cfg.task))
