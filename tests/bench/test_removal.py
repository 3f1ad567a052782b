"""Counterfactual proponent removal (bench.truths.removal): removal sets, caching, pairing by seed,
vectorised vs sequential retraining, and a ranking that beats random removal."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bench import ground_truth as gt
from bench.cli import run
from bench.truths import TruthContext, removal
from estimators.grad_dot import GradDot
from tests.helpers import float64_digits_mlp

TASK_CFG = {"what": "tiny removal test task"}  # stands for the task's config in cache keys


@pytest.fixture(scope="module")
def tiny():
    """``(task, scores)``: a float64 digits MLP (120 train, 6 queries) and grad_dot scores
    of its attributed model."""
    task = float64_digits_mlp(n_train=120, n_queries=6, hidden=[16], epochs=3, batch_size=16,
                              optim={"lr": 0.05, "momentum": 0.9},
                              lds=None, pbrf=None)
    model = task.build_model(0)
    problem = task.problem(model, task.fit(model, seed=0))
    estimator = GradDot()
    estimator.fit(problem)
    return task, estimator.score(problem).detach()


def context(task, cache_dir, scores=None, vectorise=True) -> TruthContext:
    return TruthContext(task, "tiny", TASK_CFG, cache_dir,
                        gt.GroundTruthOptions(vectorise=vectorise), scores=scores)


def compute(task, scores, cache_dir, vectorise=True, **settings):
    kind = removal.Removal(**{"enabled": True, "fraction": 0.1, "seeds": 2, "n_queries": 4,
                              **settings})
    return kind.load(context(task, cache_dir, scores, vectorise))


def test_removal_sets_are_the_top_k_and_random_sets_are_seeded():
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    queries = torch.tensor([0, 2, 4])
    sets = removal.top_proponents(scores, queries, 3)
    assert sets.shape == (3, 3)
    for row, q in zip(sets, queries, strict=True):
        assert set(row.tolist()) == set(torch.topk(scores[q], 3).indices.tolist())
        assert scores[q, row].min() > scores[q].sort(descending=True).values[3]
    assert removal.top_proponents(scores, queries, 0).shape == (3, 0)
    first = removal.random_sets(40, 4, 5, seed=1)
    assert first.shape == (4, 5)
    assert all(len(set(r.tolist())) == 5 for r in first)
    assert torch.equal(first, removal.random_sets(40, 4, 5, seed=1))
    assert not torch.equal(first, removal.random_sets(40, 4, 5, seed=2))
    settings = removal.Removal(fraction=0.001, n_queries=3)
    assert settings.size(100) == 1  # at least one example
    assert settings.size(1000) == 1 and removal.Removal(fraction=0.05).size(1000) == 50
    assert settings.queries(10).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"^Removal: fraction must be in \(0, 1\), got 0.0"):
        removal.Removal(fraction=0.0)


def test_cache_is_reused_and_keyed_by_the_ranking(tiny, tmp_path, monkeypatch):
    task, scores = tiny
    first = compute(task, scores, tmp_path)
    k = first["proponents"].shape[1]
    assert k == 12
    assert torch.equal(first["proponents"], removal.top_proponents(scores, torch.arange(4), k))

    def no_training(*args, **kwargs):
        raise AssertionError("a cached removal retrained a model")

    with monkeypatch.context() as patch:
        patch.setattr(task, "fit", no_training)
        patch.setattr(task, "fit_many", no_training)
        again = compute(task, scores, tmp_path)
    for name in ("drop", "drop_random", "proponents", "random"):
        assert torch.equal(first[name], again[name])

    spec = {"seeds": 2, "k": k, "queries": [0, 1, 2, 3]}
    kind, ctx = removal.Removal(enabled=True), context(task, tmp_path)
    keys = [kind.removal_plan(ctx, "removal", removal.top_proponents(s, torch.arange(4), k),
                              spec).key
            for s in (scores, scores.clone(), -scores)]
    assert keys[0] == keys[1] != keys[2]
    # A different ranking retrains its proponent models only; the random baseline is shared.
    calls = []
    real_fit_many = task.fit_many
    monkeypatch.setattr(task, "fit_many", lambda seeds, subsets, progress=False: (
        calls.append(len(seeds)), real_fit_many(seeds, subsets))[1])
    other = compute(task, -scores, tmp_path)
    assert calls == [4 * 2]
    assert torch.equal(other["drop_random"], first["drop_random"])


def test_proponent_removal_beats_random_and_an_empty_removal_drops_nothing(tiny, tmp_path):
    task, scores = tiny
    found = compute(task, scores, tmp_path, n_queries=6)
    # grad_dot's proponents lower the measurement far more than random examples do
    assert found["drop"].mean() > found["drop_random"].mean() + 0.3
    assert (found["drop"] > found["drop_random"]).float().mean() >= 5 / 6

    # Removing nothing, paired by seed, retrains the full-data models exactly: drop 0.
    spec = {"seeds": 2, "k": 0, "queries": [0, 1]}
    kind, ctx = removal.Removal(enabled=True), context(task, tmp_path, vectorise=False)
    empty = kind.removal_plan(ctx, "removal", torch.zeros(2, 0, dtype=torch.long), spec)
    baseline = kind.removal_plan(ctx, "removal_random", torch.zeros(0, 0, dtype=torch.long), spec)
    values = {}
    for name, p in (("empty", empty), ("full", baseline)):
        values[name] = gt.load_or_compute(kind.work(ctx, p), p, tmp_path, ctx.options).values
    drops = removal.paired_drops(values["full"], values["empty"].view(2, 2, -1),
                                 torch.tensor([0, 1]))
    torch.testing.assert_close(drops, torch.zeros(2, dtype=drops.dtype), atol=1e-10, rtol=0)
    # ... whereas pairing with the other seed's model would not
    assert (values["full"][0] - values["full"][1]).abs().max() > 1e-2


def test_vectorised_and_sequential_paths_agree(tiny, tmp_path):
    task, scores = tiny
    runs = [compute(task, scores, tmp_path / str(v), vectorise=v, n_queries=2) for v in
            (True, False)]
    for name in ("drop", "drop_random"):
        torch.testing.assert_close(runs[0][name], runs[1][name], atol=1e-8, rtol=0)


def test_cli_records_removal_metrics(make_cfg):
    cfg = make_cfg("digits_mlp", "estimator=grad_dot", "task.pbrf=null", "removal.enabled=true",
                   "removal.seeds=1", "removal.n_queries=3", "removal.fraction=0.05")
    record = run(cfg)
    assert record["removal_k"] == 6 and record["removal_queries"] == 3
    assert math.isfinite(record["removal_drop"]) and math.isfinite(record["removal_drop_random"])
    frame = pd.read_csv(f"{cfg.hydra.runtime.output_dir}/per_query.csv")
    assert frame["removal_drop"].notna().sum() == 3
    assert frame["removal_drop"][:3].mean() == pytest.approx(record["removal_drop"])
    assert frame["removal_drop_random"][:3].mean() == pytest.approx(record["removal_drop_random"])
    default = make_cfg("digits_mlp", "estimator=grad_dot", "task.pbrf=null")
    assert not default.removal.enabled and "removal_drop" not in run(default)
