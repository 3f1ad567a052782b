"""TrackStar: each ablation switch against its closed form on a tiny model (float64)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from estimators.grad_cos import GradCos
from estimators.grad_dot import GradDot
from estimators.gradients import GradientEngine
from estimators.problem import Checkpoint
from estimators.trackstar import TrackStar

OFF = dict(optimizer_correction=False, hessian="none", unit_norm=False, projection_dim=None)


@pytest.fixture(scope="module")
def adam_problem(tiny_mlp):
    """The tiny MLP problem with a final checkpoint holding a real Adam state."""
    problem, _ = tiny_mlp
    model = copy.deepcopy(problem.model)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    x, y = problem.train.tensors
    for step in range(3):
        adam.zero_grad()
        problem.train_loss(model, (x[step::3], y[step::3])).mean().backward()
        adam.step()
    checkpoint = Checkpoint(problem.model.state_dict(), lr=1e-3, step=3,
                            optimizer_state=adam.state_dict())
    return dataclasses.replace(problem, checkpoints=[checkpoint]), adam, model


def flat_gradients(problem):
    engine = GradientEngine(problem.model)
    q = engine.flatten(engine.all_gradients(problem, "queries", 16)).double()
    m = engine.flatten(engine.all_gradients(problem, "train", 16)).double()
    return q, m


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)


def test_all_switches_off_is_grad_dot(tiny_mlp):
    problem, _ = tiny_mlp
    close(TrackStar(**OFF).score(problem), GradDot().score(problem))


def test_only_unit_norm_is_grad_cos(tiny_mlp):
    problem, _ = tiny_mlp
    close(TrackStar(**{**OFF, "unit_norm": True}).score(problem), GradCos().score(problem))


def test_only_optimizer_correction_divides_by_root_second_moment(adam_problem):
    problem, adam, adam_model = adam_problem
    q, m = flat_gradients(problem)
    engine = GradientEngine(problem.model)
    v = {name: adam.state[p]["exp_avg_sq"] for name, p in adam_model.named_parameters()}
    v_layers = {layer.name: torch.cat([v[f"{layer.name}.weight"],
                                       v[f"{layer.name}.bias"][:, None]], 1)[None]
                for layer in engine.layers}
    v_hat = engine.flatten(v_layers)[0].double() / (1 - 0.99 ** 3)
    scale = (v_hat + 1e-8).rsqrt()
    expected = -((q * scale) @ (m * scale).T)
    close(TrackStar(**{**OFF, "optimizer_correction": True}).score(problem), expected)


def test_only_projection_is_projected_grad_dot(tiny_mlp):
    problem, _ = tiny_mlp
    ts = TrackStar(**{**OFF, "projection_dim": 64, "projection_seed": 3,
                      "projection_structure": "dense"})
    gd = GradDot(projection_dim=64, projection_seed=3, projection_structure="dense")
    close(ts.score(problem), gd.score(problem))


@pytest.mark.parametrize("hessian", ["train", "task", "mixed"])
def test_hessian_correction_is_the_damped_inverse_second_moment(tiny_mlp, hessian):
    problem, _ = tiny_mlp
    q, m = flat_gradients(problem)
    r = {"train": m.T @ m / len(m), "task": q.T @ q / len(q)}
    r["mixed"] = 0.3 * r["task"] + 0.7 * r["train"]
    r = r[hessian]
    damped = r + 1e-2 * torch.linalg.eigvalsh(r).clamp_min(0).mean() * torch.eye(len(r),
                                                                                   dtype=r.dtype)
    expected = -(q @ torch.linalg.solve(damped, m.T))
    estimator = TrackStar(**{**OFF, "hessian": hessian, "mix": 0.3, "damping": 1e-2})
    close(estimator.score(problem), expected)
    assert estimator.diagnostics["hessian_damping"] > 0


def test_full_trackstar_with_index_reuses_training_encodings(adam_problem, tmp_path, monkeypatch):
    problem = adam_problem[0]
    kwargs = dict(projection_dim=32, index_dir=str(tmp_path / "index"))
    first = TrackStar(**kwargs).score(problem)
    # the encodings, and (hessian=mixed) R_train's eigenbasis with the rotated encodings
    assert len(list((tmp_path / "index").glob("*.npy"))) == 2
    assert len(list((tmp_path / "index").glob("*-rtrain.pt"))) == 1
    calls = []
    original = GradientEngine.gradients
    monkeypatch.setattr(GradientEngine, "gradients",
                        lambda self, fn, batch: calls.append(len(batch[0])) or
                        original(self, fn, batch))
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a: pytest.fail("eigh on a built index"))
    again = TrackStar(**kwargs).score(problem)
    close(again, first)
    assert sum(calls) == 0  # projected gradients come from capture, train from disk
    monkeypatch.undo()
    TrackStar(**{**kwargs, "optimizer_correction": False}).score(problem)
    assert len(list((tmp_path / "index").glob("*.npy"))) == 4  # another correction, new index
    assert torch.isfinite(first).all() and first.abs().max() <= 1 + 1e-5  # unit norm


def test_clear_errors(tiny_mlp):
    problem, _ = tiny_mlp  # trained with SGD: no Adam state
    with pytest.raises(ValueError, match=r"set TrackStar\(optimizer_correction=False\)"):
        TrackStar(projection_dim=16).score(problem)
    with pytest.raises(ValueError, match="max_hessian_dim"):
        TrackStar(**{**OFF, "hessian": "train", "max_hessian_dim": 10}).score(problem)
    with pytest.raises(ValueError, match="hessian"):
        TrackStar(hessian="fisher")


def test_kronecker_projection_of_corrected_gradients(adam_problem):
    from estimators.projection import Projector

    problem = adam_problem[0]
    engine = GradientEngine(problem.model)
    projector = Projector(engine, 40, seed=5, structure="kronecker")
    x, y = problem.train.tensors
    batch = (x[:5], y[:5])
    factored = projector.project(problem.train_loss, batch)
    identity = projector.project(problem.train_loss, batch, correct=lambda grads: grads)
    for name in factored:  # materialised R_oᵀ G R_a == the factored Σ_t (R_oᵀ g)(R_aᵀ a)ᵀ
        torch.testing.assert_close(identity[name], factored[name], rtol=1e-4, atol=1e-6)
    doubled = projector.project(problem.train_loss, batch,
                                correct=lambda grads: {n: 2 * g for n, g in grads.items()})
    for name in factored:
        torch.testing.assert_close(doubled[name], 2 * factored[name], rtol=1e-4, atol=1e-6)
    scores = TrackStar(projection_dim=40, projection_structure="kronecker").score(problem)
    assert torch.isfinite(scores).all()
