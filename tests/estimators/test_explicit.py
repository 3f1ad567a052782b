"""``explicit`` against closed forms, and against leave-one-out retraining."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bench.cli import run
from estimators.explicit import Explicit
from estimators.problem import AttributionProblem


def linear_regression_problem(l2: float) -> AttributionProblem:
    """Least squares ``y ≈ w·x + b`` with loss ½(ŷ − y)² and measurement ŷ, float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        25, generator=gen, dtype=torch.float64)
    xq = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.9, -1.7, 0.4]]))
        model.bias.fill_(0.1)
    return AttributionProblem(
        model=model, train=TensorDataset(x, y), queries=TensorDataset(xq, torch.zeros(4)),
        collate_fn=None, outputs=lambda m, b: m(b[0]).squeeze(-1),
        loss=lambda out, b: 0.5 * (out - b[1]) ** 2, measure=lambda out, b: out, l2=l2)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_explicit_matches_closed_form_least_squares(curvature):
    l2, damping = 0.1, 0.05
    problem = linear_regression_problem(l2)
    x, y = problem.train.tensors
    xbar = torch.cat([x, torch.ones(25, 1, dtype=torch.float64)], 1)  # homogeneous input
    qbar = torch.cat([problem.queries.tensors[0], torch.ones(4, 1, dtype=torch.float64)], 1)
    residual = problem.model(x).squeeze(-1).detach() - y
    h = xbar.T @ xbar / 25 + (l2 + damping) * torch.eye(4, dtype=torch.float64)
    expected = -(qbar @ torch.linalg.solve(h, (xbar * residual[:, None]).T))
    estimator = Explicit(curvature=curvature, damping=damping, batch_size=10)
    estimator.fit(problem)
    torch.testing.assert_close(estimator.score(problem).double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_ggn_equals_hessian_for_logistic_regression():
    from tasks.digits_logreg import DigitsLogReg

    task = DigitsLogReg(n_train=80, n_queries=5)
    model = task.build_model(0)
    problem = task.problem(model, task.fit(model, seed=0))
    scores = {}
    for curvature in ("ggn", "hessian"):
        estimator = Explicit(curvature=curvature, damping=0.0)
        estimator.fit(problem)
        scores[curvature] = estimator.score(problem)
    # the model is linear in θ, so the Gauss-Newton matrix is the exact Hessian
    torch.testing.assert_close(scores["ggn"], scores["hessian"], rtol=1e-4, atol=1e-6)


def test_explicit_agrees_with_leave_one_out_retraining(make_cfg):
    # 1 of 300 points removed at a time; the influence function is near-exact (Koh & Liang
    # 2017, Fig. 2): the acceptance run at n_train=1000 gives loo_pearson ≈ 0.98.
    record = run(make_cfg("digits_logreg", "estimator=explicit", "estimator.damping=0.0",
                          "task.n_train=300", "task.loo.n=16", "task.lds=null"))
    assert record["loo_pearson"] >= 0.9, record


def test_parameter_limit_names_estimators_that_scale(tiny_mlp):
    problem, _ = tiny_mlp
    with pytest.raises(ValueError, match=r"above max_params=100.*ekfac.*lissa"):
        Explicit(max_params=100).fit(problem)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="curvature"):
        Explicit(curvature="fisher")
    with pytest.raises(ValueError, match="damping"):
        Explicit(damping=-1.0)
