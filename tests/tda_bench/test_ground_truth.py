"""``tda_bench.ground_truth``: LDS and LOO from a user's ``train_fn`` through the harness's
planning, shards and cache — the CLI's numbers for a shipped task, the exact-influence
reference on a convex model and a data set the project never uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

import tda_bench
from tests.helpers import TINY, _composed, cli

# --- the convex check, through the public API only --------------------------------------


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def convex_fit(x, y, l2, outputs, objective):
    """``train_fn`` of a linear model ``x -> [outputs]`` minimising the mean of
    ``objective(pred, y)`` + (l2/2)‖θ‖² by full-batch L-BFGS to convergence (warm-started
    from ``init`` where given)."""

    def train_fn(indices, seed, init=None):
        torch.manual_seed(seed)
        model = nn.Linear(x.shape[1], outputs, dtype=x.dtype)
        if init is not None:
            model.load_state_dict(init)
        xs, ys = x[indices], y[indices]
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=0, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = objective(model(xs), ys)
            loss = loss + l2 / 2 * sum(p.pow(2).sum() for p in model.parameters())
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        return model

    return train_fn


def logistic_regression(x, y, l2):
    return convex_fit(x, y, l2, int(y.max()) + 1, nn.functional.cross_entropy)


def standardised(data):
    x = torch.tensor(data.data)
    return (x - x.mean(0)) / x.std(0), torch.tensor(data.target)


def breast_cancer_one_logit():
    from sklearn.datasets import load_breast_cancer

    x, y = standardised(load_breast_cancer())
    return x, y.double(), convex_fit(  # float 0/1 labels, as BCE wants them
        x, y.double(), 1e-2, 1,
        lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t))


def diabetes_ridge():
    from sklearn.datasets import load_diabetes

    x, y = standardised(load_diabetes())
    y = (y - y.mean()) / y.std()
    return x, y, convex_fit(x, y, 1e-2, 1, lambda out, t: nn.functional.mse_loss(out[:, 0], t))


def attributed(x, y, train_fn, n_train, n_queries):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, queries = perm[:n_train], perm[n_train:n_train + n_queries]
    fit = lambda indices, seed, init=None: train_fn(train[indices], seed, init)  # noqa: E731
    return fit(torch.arange(n_train), 0), (x[train], y[train]), (x[queries], y[queries]), fit


def test_explicit_influence_matches_leave_one_out_on_breast_cancer(float64_default):
    """Breast cancer (569 × 30, never used by the project), float64 default dtype: explicit
    influence against LOO retraining, Pearson ≥ 0.97, scores in float64."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, queries = perm[:300], perm[300:320]
    train_fn = logistic_regression(x[train], y[train], l2=1e-2)

    model = train_fn(torch.arange(300), seed=0)
    problem = tda_bench.classification_problem(model, (x[train], y[train]),
                                               (x[queries], y[queries]), l2=1e-2)
    estimator = tda_bench.estimator("explicit")
    estimator.fit(problem)
    scores = estimator.score(problem)
    truth = tda_bench.ground_truth.loo(train_fn, problem, n=40)

    assert scores.dtype == torch.float64 and scores.shape == (20, 300)
    assert truth["effects"].dtype == torch.float64 and truth["effects"].shape == (40, 20)
    pearson = tda_bench.metrics.loo(scores, truth)
    assert pearson >= 0.97, pearson
    assert tda_bench.metrics.loo(scores, truth, "spearman") >= 0.95


@pytest.mark.parametrize("case", ["one_logit", "ridge_loss", "ridge_prediction"])
def test_explicit_influence_matches_leave_one_out_beyond_softmax(case, float64_default):
    """The same check for a one-logit (BCE) classifier on breast cancer and for ridge
    regression on diabetes (442 × 10), its measurement the negative squared error or the
    prediction."""
    x, y, train_fn = breast_cancer_one_logit() if case == "one_logit" else diabetes_ridge()
    model, train, queries, fit = attributed(x, y, train_fn, 250, 15)
    if case == "one_logit":
        problem = tda_bench.classification_problem(model, train, queries, l2=1e-2)
    else:
        problem = tda_bench.regression_problem(model, train, queries, l2=1e-2,
                                               measure=case.split("_")[1])
    estimator = tda_bench.estimator("explicit")
    estimator.fit(problem)
    scores = estimator.score(problem)
    truth = tda_bench.ground_truth.loo(fit, problem, n=30)
    assert scores.dtype == torch.float64 and scores.shape == (15, 250)
    if case == "ridge_loss":
        # A query the model fits almost exactly (residual 0.003) has a vanishing first-order
        # effect on its squared error, so influence cannot follow it (Pearson 0.14 there);
        # every other query's is above 0.99.
        per_query = tda_bench.metrics.per_query("loo_pearson", scores, truth)
        assert np.median(per_query) >= 0.99 and np.mean(per_query > 0.99) >= 0.9, per_query
    else:
        pearson = tda_bench.metrics.loo(scores, truth)
        assert pearson >= 0.97, pearson


# --- the same LDS as the command line -----------------------------------------------------


def test_lds_of_a_user_train_fn_equals_the_cli(tmp_path):
    """``digits_mlp`` (tiny) through ``python -m bench``, and through
    ``tda_bench.ground_truth.lds`` with a train_fn that calls the task's own training: the
    same subsets, the same retrained measurements, the same LDS."""
    overrides = ["task=digits_mlp", *TINY["digits_mlp"], "task.pbrf=null",
                 "ground_truth.vectorise=false"]  # one model per fit, as a user's train_fn
    run = cli(*overrides, "estimator=grad_dot", "logger=none", "progress=false",
              f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cli_scores = torch.load(tmp_path / "run" / "scores.pt")
    (shard,) = (tmp_path / "cache" / "ground_truth" / "digits_mlp").glob("lds-*/shard-*.pt")
    cli_values = torch.load(shard)["values"]  # [M·K, Q] in unit order

    cfg = _composed(tuple(overrides))
    task = instantiate(cfg.task, device="cpu")

    def train_fn(indices, seed):  # the user's routine: here, the task's own training
        model = task.build_model(seed)
        task.fit(model, seed=seed, indices=indices)
        return model

    problem = task.problem(task.build_model(0), [])
    settings = dict(cfg.task.lds)
    truth = tda_bench.ground_truth.lds(train_fn, problem, cache_dir=tmp_path / "api",
                                       **settings)
    assert truth["outputs"].shape == (settings["subsets"], 12)
    torch.testing.assert_close(truth["values"].reshape(cli_values.shape), cli_values,
                               rtol=0, atol=0)
    assert tda_bench.metrics.lds(cli_scores, truth) == pytest.approx(record["lds"], abs=1e-12)
    assert tda_bench.metrics.evaluate(cli_scores, {"lds": truth})["lds_sem"] == pytest.approx(
        record["lds_sem"], abs=1e-12)


# --- cache, shards, errors ------------------------------------------------------------


class Counted:
    """A cheap convex ``train_fn`` (logistic regression on 30 random points) that counts
    its calls."""

    def __init__(self):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
        self.y = (self.x[:, 0] > 0).long()
        self.fit = logistic_regression(self.x, self.y, l2=1e-1)
        self.calls = 0

    def __call__(self, indices, seed):
        self.calls += 1
        return self.fit(indices, seed)

    def problem(self):
        model = self.fit(torch.arange(30), 0)
        return tda_bench.classification_problem(model, (self.x, self.y),
                                                (self.x[:3], self.y[:3]), l2=1e-1)


def test_the_cache_is_reused_and_keyed(tmp_path):
    fn = Counted()
    problem = fn.problem()
    first = tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path, subsets=4)
    assert fn.calls == 4 and first["masks"].shape == (4, 30)
    again = tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path, subsets=4)
    assert fn.calls == 4 and torch.equal(again["outputs"], first["outputs"])
    tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path, subsets=4, key="v2")
    assert fn.calls == 8  # a new key retrains
    tda_bench.ground_truth.lds(fn, problem, subsets=4)  # no cache_dir: nothing kept
    tda_bench.ground_truth.lds(fn, problem, subsets=4)
    assert fn.calls == 16
    assert list((tmp_path / "ground_truth").iterdir()) == [tmp_path / "ground_truth" / "Counted"]


def test_shards_join_to_the_unsharded_result(tmp_path):
    fn = Counted()
    problem = fn.problem()
    whole = tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path / "a", subsets=4)
    only = tda_bench.ground_truth.Options(on_missing="error")
    path = tda_bench.ground_truth.shard("lds", fn, problem, 0, 2, cache_dir=tmp_path / "b",
                                        subsets=4)
    assert path.exists() and fn.calls == 4 + 2
    with pytest.raises(tda_bench.ground_truth.GroundTruthMissing,
                       match=r"missing shards \[1\] of 2.*tda_bench\.ground_truth\.shard"):
        tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path / "b", options=only,
                                   subsets=4)
    tda_bench.ground_truth.shard("lds", fn, problem, 1, 2, cache_dir=tmp_path / "b", subsets=4)
    joined = tda_bench.ground_truth.lds(fn, problem, cache_dir=tmp_path / "b", options=only,
                                        subsets=4)
    assert fn.calls == 4 + 4
    torch.testing.assert_close(joined["outputs"], whole["outputs"], rtol=0, atol=0)


def test_loo_warm_starts_only_a_train_fn_that_takes_init():
    fn = Counted()
    problem = fn.problem()
    starts = []

    def warm(indices, seed, init=None):
        starts.append(init)
        return fn.fit(indices, seed, init)

    tda_bench.ground_truth.loo(warm, problem, n=3)
    assert starts[0] is None and all(s is not None for s in starts[1:]) and len(starts) == 4
    truth = tda_bench.ground_truth.loo(fn, problem, n=3)  # no init: every fit from scratch
    assert fn.calls == 4 and truth["effects"].shape == (3, 3)


def test_errors_name_the_argument():
    fn = Counted()
    problem = fn.problem()
    with pytest.raises(ValueError, match=r"^lds has no setting subset; its settings are "):
        tda_bench.ground_truth.lds(fn, problem, subset=4)
    with pytest.raises(ValueError, match=r"^LDS: fraction must be in \(0, 1\), got 2"):
        tda_bench.ground_truth.lds(fn, problem, fraction=2)
    with pytest.raises(ValueError, match=r"^kind must be a retraining ground truth"):
        tda_bench.ground_truth.truth("mislabel", fn, problem)
    with pytest.raises(ValueError, match=r"^train_fn must return the trained nn.Module"):
        tda_bench.ground_truth.lds(lambda indices, seed: None, problem, subsets=2)
    with pytest.raises(ValueError, match=r"^ground_truth must be the result of "
                                         r"tda_bench.ground_truth.lds"):
        tda_bench.metrics.lds(torch.zeros(3, 30), {"effects": 1})
