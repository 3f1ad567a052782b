"""Vectorised ensemble retraining (tasks/ensemble.py) against one-by-one Lightning fits."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from bench import ground_truth as gt
from bench.cli import run
from bench.truths import retraining
from tasks.base import lightning_fit
from tasks.digits_logreg import DigitsLogReg
from tasks.digits_mlp import DigitsMLP
from tasks.ensemble import ensemble_batches
from tests.helpers import ground_truth_of


class DigitsMLP64(DigitsMLP):
    dtype = torch.float64
    precision = "64-true"

    def build_model(self, seed):
        return super().build_model(seed).double()


class _Recorder(L.LightningModule):
    """Records the (index-valued) batches a Lightning fit draws; never updates."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].flatten().long())
        return self.model(batch[0]).sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("n_subset, batch_size", [(34, 8), (32, 8), (5, 8)])
def test_batches_are_those_of_a_seeded_lightning_fit(n_subset, batch_size):
    data = TensorDataset(torch.arange(100, dtype=torch.float32)[:, None])
    gen = torch.Generator().manual_seed(1)
    subsets = [torch.randperm(100, generator=gen)[:n_subset] for _ in range(3)]
    seeds = [7, 8, 7]
    steps = ensemble_batches(seeds, subsets, batch_size, epochs=3)
    for m, (seed, subset) in enumerate(zip(seeds, subsets, strict=True)):
        recorder = _Recorder()
        lightning_fit(recorder, data, indices=subset, batch_size=batch_size, epochs=3,
                      seed=seed, device="cpu")
        assert len(recorder.seen) == len(steps)
        for seen, step in zip(recorder.seen, steps, strict=True):
            assert torch.equal(seen, step[m])


def _subsets(n: int, size: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randperm(n, generator=gen)[:size].sort().values for _ in range(count)]


@pytest.mark.parametrize("cls, atol", [(DigitsMLP64, 1e-10), (DigitsMLP, 1e-4)])
def test_vectorised_models_equal_models_trained_alone(cls, atol):
    task = cls(n_train=80, n_queries=10, hidden=[16], epochs=3, batch_size=16,
               optim={"lr": 0.05, "momentum": 0.9})
    seeds, subsets = [3, 4, 3], _subsets(80, 40, 3)
    vectorised = task.fit_many(seeds, subsets)
    assert vectorised.shape == (3, 10)
    for m, (seed, subset) in enumerate(zip(seeds, subsets, strict=True)):
        model = task.build_model(seed)
        task.fit(model, seed=seed, indices=subset)
        alone = task.measure_queries(model)
        torch.testing.assert_close(vectorised[m], alone, atol=atol, rtol=0)
    # distinct subsets and seeds give distinct models: the check above is not vacuous
    assert (vectorised[0] - vectorised[1]).abs().max() > 1e-3


def test_ensemble_passes_split_as_configured():
    task = DigitsMLP64(n_train=60, n_queries=5, hidden=[8], epochs=2, batch_size=16)
    seeds, subsets = [1, 2, 3], _subsets(60, 30, 3)
    whole = task.fit_many(seeds, subsets)
    task.ensemble_size = 2
    torch.testing.assert_close(task.fit_many(seeds, subsets), whole, atol=1e-12, rtol=0)


def test_tasks_that_cannot_vectorise_fall_back():
    logreg = DigitsLogReg(n_train=60, n_queries=5)
    assert logreg.fit_many([1], _subsets(60, 30, 1)) is None  # L-BFGS is not per coordinate
    mlp = DigitsMLP(n_train=60, n_queries=5, hidden=[8], epochs=1)
    unequal = [torch.arange(30), torch.arange(31)]
    assert mlp.fit_many([1, 2], unequal) is None


def _fail(*args, **kwargs):
    raise AssertionError("ground truth fell back to sequential retraining")


def test_lds_ground_truth_agrees_between_paths(make_cfg, tmp_path, monkeypatch):
    records, truths, keys = {}, {}, set()
    sequential = retraining.fit_one
    for vectorise in (True, False):
        if vectorise:  # the vectorised path must not fall back to one-by-one fits
            monkeypatch.setattr(retraining, "fit_one", _fail)
        else:
            monkeypatch.setattr(retraining, "fit_one", sequential)
        cache = tmp_path / f"cache-{vectorise}"
        cfg = make_cfg("digits_mlp", "estimator=grad_dot", f"cache_dir={cache}", "task.lds.seeds=2",
                       f"ground_truth.vectorise={vectorise}")
        records[vectorise] = run(cfg)
        ctx, kind, plan = ground_truth_of(cfg, "lds")
        truths[vectorise] = kind.assemble(ctx, plan, gt.join(plan, cache, 1))["outputs"]
        keys.add(plan.key)
    assert len(keys) == 1  # one cache entry serves both paths
    torch.testing.assert_close(truths[True], truths[False], atol=1e-4, rtol=0)
    lds_sem = max(records[True]["lds_sem"], records[False]["lds_sem"])
    assert abs(records[True]["lds"] - records[False]["lds"]) <= lds_sem
