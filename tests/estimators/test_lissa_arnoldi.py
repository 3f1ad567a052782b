"""LiSSA and Arnoldi against the exact damped inverse of ``explicit`` on tiny float64 problems."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn.functional import cosine_similarity
from torch.utils.data import TensorDataset

from bench.cli import run
from estimators.arnoldi import Arnoldi
from estimators.explicit import Explicit
from estimators.lissa import LiSSA
from estimators.problem import AttributionProblem, cross_entropy_sum
from tasks.digits import margin


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the many tiny curvature products are slower with more on a busy host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_problem():
    """A 6-5-3 tanh MLP (53 parameters) on 40 random points, trained briefly, float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=gen, dtype=torch.float64)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1).long()) % 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        cross_entropy_sum(model(x[:40]), y[:40]).mean().backward()
        opt.step()
    return AttributionProblem(
        model=model, train=TensorDataset(x[:40], y[:40]), queries=TensorDataset(x[40:], y[40:]),
        collate_fn=None, outputs=lambda m, b: m(b[0]), loss=lambda o, b: cross_entropy_sum(o, b[1]),
        measure=margin, l2=1e-3,
    )


def exact_inverse_hvps(problem, curvature, damping):
    explicit = Explicit(curvature=curvature, damping=damping)
    explicit.fit(problem)
    engine = explicit.engine(problem)
    q = engine.flatten(engine.all_gradients(problem, "queries", 64))
    return engine, q, torch.cholesky_solve(q.T.double(), explicit.cholesky).T, explicit


@pytest.mark.parametrize("hvp, damping, batch_size, depth, repeat", [
    ("ggn", 1e-2, 40, 400, 1),       # full batch: the Neumann series itself
    ("ggn", 1e-2, 10, 300, 2),       # stochastic mini-batches, averaged
    ("hessian", 0.5, 20, 150, 2),    # Hessian with damping above −λ_min
])
def test_lissa_converges_to_explicit(small_problem, hvp, damping, batch_size, depth, repeat):
    engine, q, exact, _ = exact_inverse_hvps(small_problem, hvp, damping)
    lissa = LiSSA(hvp=hvp, damping=damping, depth=depth, batch_size=batch_size, repeat=repeat)
    estimates = lissa.inverse_hvp(small_problem, engine, q, [depth])
    cos = cosine_similarity(estimates[depth].double(), exact)
    assert cos.min() >= 0.99, cos
    error = (estimates[depth].double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert error.max() < 0.15, error  # the scale 1/s is right too, not just the direction
    assert lissa.diagnostics["lissa_rel_change"] < 0.2
    assert lissa.scale_used > 0


def test_lissa_scores_match_explicit(small_problem):
    _, _, _, explicit = exact_inverse_hvps(small_problem, "ggn", 1e-2)
    expected = explicit.score(small_problem)
    lissa = LiSSA(hvp="ggn", damping=1e-2, depth=300, batch_size=40)
    lissa.fit(small_problem)
    scores = lissa.score(small_problem)
    assert scores.shape == expected.shape
    assert torch.corrcoef(torch.stack([scores.flatten(), expected.flatten()]))[0, 1] > 0.999


def test_lissa_diverges_loudly_with_a_small_scale(small_problem):
    engine, q, _, _ = exact_inverse_hvps(small_problem, "ggn", 1e-2)
    lissa = LiSSA(damping=1e-2, scale=1e-3, depth=50, batch_size=40)
    with pytest.raises(FloatingPointError, match="raise estimator.scale"):
        lissa.inverse_hvp(small_problem, engine, q)


@pytest.mark.parametrize("curvature, damping", [("ggn", 1e-2), ("hessian", 0.5)])
def test_arnoldi_full_rank_matches_explicit(small_problem, curvature, damping):
    _, _, _, explicit = exact_inverse_hvps(small_problem, curvature, damping)
    expected = explicit.score(small_problem)
    p = explicit.engine(small_problem).num_params
    arnoldi = Arnoldi(rank=p, iterations=p, curvature=curvature, damping=damping)
    arnoldi.fit(small_problem)
    scores = arnoldi.score(small_problem)
    assert torch.allclose(scores, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    exact = torch.linalg.eigvalsh(explicit.cholesky @ explicit.cholesky.T)
    assert torch.allclose(arnoldi.eigenvalues.sort().values, exact, rtol=1e-6, atol=1e-9)


def test_arnoldi_low_rank_finds_top_eigenpairs(small_problem):
    _, _, _, explicit = exact_inverse_hvps(small_problem, "ggn", 1e-2)
    exact = torch.linalg.eigvalsh(explicit.cholesky @ explicit.cholesky.T).flip(0)
    arnoldi = Arnoldi(rank=5, iterations=30, curvature="ggn", damping=1e-2)
    arnoldi.fit(small_problem)
    assert torch.allclose(arnoldi.eigenvalues, exact[:5], rtol=1e-6)
    u = arnoldi.eigenvectors
    assert torch.allclose(u @ u.T, torch.eye(5, dtype=u.dtype), atol=1e-8)


def test_constructor_errors():
    with pytest.raises(ValueError, match="hvp|curvature"):
        LiSSA(hvp="fisher")
    with pytest.raises(ValueError, match="depth"):
        LiSSA(depth=0)
    with pytest.raises(ValueError, match="cannot exceed iterations"):
        Arnoldi(rank=10, iterations=5)


def test_configs_run_end_to_end(make_cfg):
    """Both configs through the harness (one cache: the ground truth is computed once)."""
    written = {}
    for estimator, overrides in [("lissa", ["estimator.depth=20"]),
                                 ("arnoldi", ["estimator.iterations=20", "estimator.rank=10"])]:
        cfg = make_cfg("digits_mlp", f"estimator={estimator}", "seed=3", *overrides)
        assert instantiate(cfg.estimator).seed == 3
        record = run(cfg)
        assert record["estimator"] == estimator and np.isfinite(record["lds"])
        assert np.isfinite(record["pbrf_pearson"])
        out = Path(cfg.hydra.runtime.output_dir)
        written[estimator] = json.loads((out / "metrics.json").read_text())
        assert {"pbrf_pearson", "pbrf_spearman"} <= set(written[estimator])
        assert "pbrf_spearman" in (out / "per_query.csv").read_text().splitlines()[0]
    assert written["lissa"]["lissa_rel_change"] >= 0 and written["lissa"]["lissa_scale"] > 0
    arnoldi = written["arnoldi"]
    assert 0 < arnoldi["arnoldi_kth_eigenvalue"] <= arnoldi["arnoldi_top_eigenvalue"]
