"""PBRF ground truth: agreement with its linearisation (``explicit``, GGN, same damping),
caching keyed by the attributed model, and sharding. (A whole run's ``pbrf_*`` metrics are
checked in ``test_lissa_arnoldi.py::test_configs_run_end_to_end``.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import ground_truth as gt
from bench import pbrf
from bench.cli import run
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


def test_pbrf_agrees_with_explicit_ggn(logreg, tmp_path):
    task, problem = logreg
    plan = pbrf.plan(task, "digits_logreg", {"n_train": 100}, problem)
    truth = gt.load_or_compute(pbrf.responses(problem, plan), plan, tmp_path,
                               gt.GroundTruthOptions())
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
    plan = pbrf.plan(task, "digits_logreg", {}, problem)
    options = gt.GroundTruthOptions(num_shards=2, shard=1)
    for shard in range(2):
        gt.compute_shard(pbrf.responses(problem, plan), plan, tmp_path, shard, 2)
    sharded = gt.load_or_compute(pbrf.responses(problem, plan), plan, tmp_path, options)
    whole = gt.load_or_compute(pbrf.responses(problem, plan), plan, tmp_path / "other",
                               gt.GroundTruthOptions())
    assert torch.allclose(sharded["effects"], whole["effects"])
    other = task.build_model(1)  # another seed's model: another key
    problem_b = task.problem(other, [])
    assert pbrf.plan(task, "digits_logreg", {}, problem_b).key != plan.key
    with pytest.raises(gt.GroundTruthMissing, match="stage=ground_truth"):
        plan_b = pbrf.plan(task, "digits_logreg", {}, problem_b)
        gt.load_or_compute(pbrf.responses(problem_b, plan_b), plan_b, tmp_path,
                           gt.GroundTruthOptions(on_missing="error"))


def test_stage_ground_truth_computes_this_seeds_pbrf_shard(make_cfg):
    cfg = make_cfg("digits_mlp", "stage=ground_truth", "ground_truth.num_shards=2",
                   "ground_truth.shard=1", "seed=2")
    shards = run(cfg)["shards"]
    pbrf_shards = [s for s in shards if "/pbrf-" in s]
    assert len(pbrf_shards) == 1 and pbrf_shards[0].endswith("shard-0001-of-0002.pt")
    payload = torch.load(pbrf_shards[0], weights_only=True)
    assert payload["values"].shape == (2, 12)  # units 1 and 3 of task.pbrf.n=4; 12 queries
