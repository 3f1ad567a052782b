"""``digits_cnn``: the architecture, vectorised retraining against one-by-one fits, and a run
through the harness with LDS (and its noise ceiling) and PBRF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bench import ground_truth as gt
from bench.cli import run
from estimators.gradients import GradientEngine
from tasks.digits_cnn import DigitsCNN
from tests.helpers import ground_truth_of


class DigitsCNN64(DigitsCNN):
    dtype = torch.float64
    precision = "64-true"


def test_architecture_is_tracked_convolutions():
    task = DigitsCNN(n_train=20, n_queries=4)
    model = task.build_model(0)
    engine = GradientEngine(model)
    assert [(layer.name, layer.is_conv2d, layer.shape) for layer in engine.layers] == [
        ("1", True, (8, 10)), ("3", True, (16, 73)), ("6", False, (10, 65))]
    assert engine.num_params == sum(p.numel() for p in model.parameters()) == 1898
    assert model(task.train_set.tensors[0][:3]).shape == (3, 10)
    with pytest.raises(ValueError, match="task.channels"):
        DigitsCNN(n_train=20, n_queries=4, channels=[])


@pytest.mark.parametrize("cls, atol", [(DigitsCNN64, 1e-10), (DigitsCNN, 1e-4)])
def test_vectorised_cnns_equal_cnns_trained_alone(cls, atol):
    """float64: the same models to rounding; float32 drifts (convolutions of a batched
    ensemble round differently, and SGD amplifies it: results/perf.md)."""
    task = cls(n_train=80, n_queries=10, epochs=2, batch_size=16,
               optim={"lr": 0.05, "momentum": 0.9})
    gen = torch.Generator().manual_seed(0)
    subsets = [torch.randperm(80, generator=gen)[:40].sort().values for _ in range(3)]
    seeds = [3, 4, 3]
    vectorised = task.fit_many(seeds, subsets)
    for m, (seed, subset) in enumerate(zip(seeds, subsets, strict=True)):
        model = task.build_model(seed)
        task.fit(model, seed=seed, indices=subset)
        torch.testing.assert_close(vectorised[m], task.measure_queries(model), atol=atol, rtol=0)
    assert (vectorised[0] - vectorised[1]).abs().max() > 1e-3


def test_batch_norm_models_do_not_vectorise():
    task = DigitsCNN(n_train=20, n_queries=4)
    assert task.vectorisable(task.build_model(0))
    assert not task.vectorisable(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))


def test_a_run_has_lds_with_its_ceiling_and_pbrf(make_cfg):
    record = run(make_cfg("digits_cnn", "estimator=ekfac", "task.lds.seeds=2"))
    assert -1 <= record["lds"] <= 1 and record["lds_ceiling"] is not None
    assert record["pbrf_pearson"] > 0.3  # EK-FAC follows the proximal response


def test_lds_agrees_between_vectorised_and_sequential_retraining(make_cfg, tmp_path):
    records, outputs = {}, {}
    for vectorise in (True, False):
        cfg = make_cfg("digits_cnn", "estimator=grad_dot", "task.pbrf=null",
                       f"cache_dir={tmp_path / f'cache-{vectorise}'}",
                       f"ground_truth.vectorise={vectorise}")
        records[vectorise] = run(cfg)
        ctx, kind, plan = ground_truth_of(cfg, "lds")
        outputs[vectorise] = kind.assemble(ctx, plan, gt.join(plan, Path(cfg.cache_dir), 1))[
            "outputs"]
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-3, rtol=0)
    sem = max(records[True]["lds_sem"], records[False]["lds_sem"])
    assert abs(records[True]["lds"] - records[False]["lds"]) <= sem
