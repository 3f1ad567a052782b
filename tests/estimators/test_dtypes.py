"""Scores in the model's dtype under any torch default dtype (issue #18, item 1).

Every gradient estimator of the config group, on a tiny classifier built here in float32,
float64 and bfloat16, with torch's default dtype float32 and float64: no error, finite
scores, float64 scores and self-influence for a float64 model, float32 for the others (a
bf16 model accumulates in float32); TRAK and TrackStar always float32. The default dtype
does not change the numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tda_bench
from estimators.problem import Checkpoint

GRADIENT = [n for n in tda_bench.estimator_names()
            if issubclass(tda_bench.estimator_class(n), tda_bench.GradientEstimator)]
FLOAT32_ALWAYS = {"trak", "trackstar"}  # projected kernels are float32 by design
SMALL = {"lissa": {"depth": 20, "power_iterations": 5, "batch_size": 16},
         "arnoldi": {"rank": 5, "iterations": 10},
         "trak": {"n_models": 1, "projection_dim": 16},
         "trackstar": {"projection_dim": 16, "optimizer_correction": False},
         "ekfac": {"batch_size": 16}, "kfac": {"batch_size": 16}}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@pytest.fixture
def default_dtype(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


def tiny_problem(dtype: torch.dtype):
    """A 5-6-3 tanh classifier in ``dtype`` on 40 random points, 4 queries, one checkpoint."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.Tanh(),
                              nn.Linear(6, 3, dtype=torch.float64)).to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return tda_bench.classification_problem(model, (x, y), (x[:4], y[:4]), l2=1e-2,
                                            checkpoints=[Checkpoint(state, lr=0.1, step=1)])


def scores_of(name: str, dtype: torch.dtype):
    problem = tiny_problem(dtype)
    estimator = tda_bench.estimator(name, **SMALL.get(name, {}))
    estimator.fit(problem)
    scores = estimator.score(problem)
    try:
        self_influence = estimator.self_influence(problem)
    except NotImplementedError:
        self_influence = None
    return scores, self_influence


def test_every_gradient_estimator_is_checked():
    assert {"explicit", "ekfac", "kfac", "lissa", "arnoldi", "tracin", "grad_dot", "grad_cos",
            "trak", "trackstar"} <= set(GRADIENT)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], indirect=True,
                         ids=["default_float32", "default_float64"])
@pytest.mark.parametrize("model_dtype", list(DTYPES))
@pytest.mark.parametrize("name", GRADIENT)
def test_scores_follow_the_model_dtype(name, model_dtype, default_dtype):
    scores, self_influence = scores_of(name, DTYPES[model_dtype])
    expected = (torch.float64 if model_dtype == "float64" and name not in FLOAT32_ALWAYS
                else torch.float32)
    assert scores.shape == (4, 40)
    assert scores.dtype == expected
    assert torch.isfinite(scores).all()
    if self_influence is not None:
        assert self_influence.dtype == expected and self_influence.shape == (40,)
        assert torch.isfinite(self_influence).all()


@pytest.mark.parametrize("name", GRADIENT)
def test_the_default_dtype_does_not_change_the_numbers(name):
    """A float64 model's scores are the same under either default dtype, and a float32
    model's agree with them to float32 precision."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        under_64, _ = scores_of(name, torch.float64)
        torch.set_default_dtype(torch.float32)
        under_32, _ = scores_of(name, torch.float64)
        single, _ = scores_of(name, torch.float32)
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(under_32, under_64, rtol=1e-9, atol=1e-12)
    scale = under_64.abs().max().item()
    assert (single.double() - under_64.double()).abs().max().item() <= 1e-3 * scale
