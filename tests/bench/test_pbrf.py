"""PBRF ground truth: agreement with its linearisation (``explicit``, GGN, same damping),
caching keyed by the attributed model, and sharding. (A whole run's ``pbrf_*`` metrics are
checked in ``test_lissa_arnoldi.py::test_configs_run_end_to_end``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import ground_truth as gt
from bench.cli import run
from bench.truths import TruthContext
from bench.truths.pbrf import PBRF
from estimators.explicit import Explicit
from tasks.digits_logreg import DigitsLogReg

SPEC = {"n": 8, "epsilon": 1e-3, "damping": 1e-3}


@pytest.fixture(scope="module")
def logreg():
    """A tiny trained ``digits_logreg`` (float64, L-BFGS): ``(task, problem)``."""
    task = DigitsLogReg(n_train=100, n_queries=10, pbrf=SPEC)
    model = task.build_model(0)
    checkpoints = task.fit(model, seed=0)
    return task, task.problem(model, checkpoints)


def context(task, problem, cache, task_cfg=None) -> TruthContext:
    return TruthContext(task, "digits_logreg", task_cfg or {}, cache, problem=problem)


def test_pbrf_agrees_with_explicit_ggn(logreg, tmp_path):
    task, problem = logreg
    truth = PBRF(**SPEC).load(context(task, problem, tmp_path, {"n_train": 100}))
    explicit = Explicit(curvature="ggn", damping=SPEC["damping"])
    explicit.fit(problem)
    predicted = explicit.score(problem)[:, truth["indices"]].T.double()  # [L, Q]
    actual = truth["effects"]
    assert actual.shape == predicted.shape == (SPEC["n"], 10)
    pearson = np.corrcoef(predicted.flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert pearson > 0.999, pearson
    rel = (predicted - actual).norm() / actual.norm()
    assert rel < 0.05, rel  # the O(ε) nonlinearity of the response is small


def test_pbrf_cache_is_keyed_by_model_and_sharded(logreg, tmp_path):
    task, problem = logreg
    kind, ctx = PBRF(**SPEC), context(task, problem, tmp_path)
    plan = kind.plan(ctx)
    ctx.options = gt.GroundTruthOptions(num_shards=2, shard=1)
    for shard in range(2):
        kind.compute_shard(ctx, shard, 2)
    sharded = kind.load(ctx)
    whole = kind.load(context(task, problem, tmp_path / "other"))
    assert torch.allclose(sharded["effects"], whole["effects"])
    other = task.build_model(1)  # another seed's model: another key
    ctx_b = context(task, task.problem(other, []), tmp_path)
    assert kind.plan(ctx_b).key != plan.key
    ctx_b.options = gt.GroundTruthOptions(on_missing="error")
    with pytest.raises(gt.GroundTruthMissing, match="stage=ground_truth"):
        kind.load(ctx_b)


def test_stage_ground_truth_computes_this_seeds_pbrf_shard(make_cfg):
    cfg = make_cfg("digits_mlp", "stage=ground_truth", "ground_truth.num_shards=2",
                   "ground_truth.shard=1", "seed=2")
    shards = run(cfg)["shards"]
    pbrf_shards = [s for s in shards if "/pbrf-" in s]
    assert len(pbrf_shards) == 1 and pbrf_shards[0].endswith("shard-0001-of-0002.pt")
    payload = torch.load(pbrf_shards[0], weights_only=True)
    assert payload["values"].shape == (2, 12)  # units 1 and 3 of task.pbrf.n=4; 12 queries
