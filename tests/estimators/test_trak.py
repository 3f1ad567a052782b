"""TRAK, the on-disk gradient index, self-influence and mislabel detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.cli import run
from bench.metrics import mislabel_metrics
from estimators.explicit import Explicit
from estimators.grad_dot import GradDot
from estimators.gradients import GradientEngine
from estimators.random_baseline import RandomScores
from estimators.trak import TRAK
from tasks.digits_mlp_noisy import DigitsMLPNoisy, flip_labels


def test_second_scoring_run_reads_the_index(tiny_mlp, tmp_path, monkeypatch):
    problem, _ = tiny_mlp
    calls = {"train": 0}
    original = problem.train_loss

    def counting(model, batch):
        calls["train"] += 1
        return original(model, batch)

    monkeypatch.setattr(problem, "train_loss", counting)
    kwargs = dict(projection_dim=64, index_dir=str(tmp_path / "index"), chunk_size=16)
    first = GradDot(**kwargs).score(problem)
    assert calls["train"] == 4  # 60 examples in chunks of 16
    assert len(list((tmp_path / "index").glob("*.npy"))) == 1
    second = GradDot(**kwargs).score(problem)
    assert calls["train"] == 4  # training gradients came from the memory-mapped index
    assert torch.equal(first, second)
    # A different projection seed is a different index.
    GradDot(**{**kwargs, "projection_seed": 1}).score(problem)
    assert calls["train"] == 8 and len(list((tmp_path / "index").glob("*.npy"))) == 2
    # And the indexed scores equal the ones streamed without an index.
    assert torch.allclose(first, GradDot(projection_dim=64, chunk_size=16).score(problem))


def test_corrupt_index_is_rebuilt(tiny_mlp, tmp_path):
    problem, _ = tiny_mlp
    kwargs = dict(projection_dim=64, index_dir=str(tmp_path), chunk_size=32)
    first = GradDot(**kwargs).score(problem)
    (path,) = tmp_path.glob("*.npy")
    path.write_bytes(b"not an index")
    assert torch.equal(GradDot(**kwargs).score(problem), first)


def test_trak_one_model_closed_form(tiny_mlp):
    """TRAK with one model and the identity projection (d ≥ P) is φ_qᵀ(ΦᵀΦ+λI)⁻¹φ_m(1−p_m)."""
    problem, _ = tiny_mlp
    engine = GradientEngine(problem.model)
    p = engine.num_params  # 8·65 + 10·9 = 610
    trak = TRAK(n_models=1, projection_dim=10 * p, damping=1e-2, projection_structure="dense")
    scores = trak.score(problem)
    phi = engine.flatten(engine.all_gradients(problem, "queries", 64)).double()
    fn = problem.query_measure
    train = engine.flatten({n: torch.cat([engine.gradients(fn, b)[n]
                                          for b in problem.loader("train", 64)])
                            for n in engine.names}).double()
    kernel = train.T @ train
    kernel += 1e-2 * kernel.diagonal().mean() * torch.eye(p, dtype=torch.float64)
    with torch.no_grad():
        loss = torch.cat([problem.train_loss(problem.model, b)
                          for b in problem.loader("train", 64)])
    expected = phi @ torch.linalg.solve(kernel, train.T) * (1 - torch.exp(-loss))[None, :]
    assert torch.allclose(scores.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    leverage = (train @ torch.linalg.solve(kernel, train.T)).diagonal()
    assert torch.allclose(trak.self_influence(problem).double(),
                          leverage * (1 - torch.exp(-loss)), rtol=1e-3, atol=1e-8)


def test_trak_needs_more_models():
    problem_like = type("P", (), {"model_factory": None})()
    with pytest.raises(ValueError, match="model_factory"):
        TRAK(n_models=2).ensemble(problem_like)


def test_explicit_self_influence(tiny_mlp):
    problem, _ = tiny_mlp
    est = Explicit(damping=1e-2)
    est.fit(problem)
    engine = GradientEngine(problem.model)
    grads = engine.flatten(engine.all_gradients(problem, "train", 64)).double()
    solved = torch.cholesky_solve(grads.T, est.cholesky).T
    assert torch.allclose(est.self_influence(problem).double(), (grads * solved).sum(1),
                          rtol=1e-4)


def test_estimators_without_self_influence_say_so():
    with pytest.raises(NotImplementedError, match="RandomScores cannot compute self-influence"):
        RandomScores(seed=0).self_influence(None)


def test_mislabel_metrics_closed_form():
    flipped = torch.tensor([True, False, False, True, False, False, False, False, False, False])
    perfect = mislabel_metrics(flipped.float(), flipped)
    assert perfect == {"mislabel_auc": 1.0, "mislabel_recall@10pct": 0.5,
                       "mislabel_recall@20pct": 1.0}
    reverse = mislabel_metrics(-flipped.float(), flipped)
    assert reverse["mislabel_auc"] == 0.0 and reverse["mislabel_recall@20pct"] == 0.0
    values = torch.arange(10.0)  # flipped at ranks 1 and 4 of 10: AUC = (0 + 2) / 16
    assert mislabel_metrics(values, flipped)["mislabel_auc"] == pytest.approx(2 / 16)
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_metrics(values, torch.zeros(10, dtype=torch.bool))


def test_flip_labels_is_seeded_and_changes_every_flipped_label():
    y = torch.arange(200) % 10
    noisy, flipped = flip_labels(y, 0.1, seed=3)
    assert flipped.sum() == 20
    assert (noisy[flipped] != y[flipped]).all() and (noisy[~flipped] == y[~flipped]).all()
    again, flipped_again = flip_labels(y, 0.1, seed=3)
    assert torch.equal(again, noisy) and torch.equal(flipped, flipped_again)


def test_noisy_task_exposes_flipped():
    task = DigitsMLPNoisy(n_train=100, n_queries=10, noise=0.1, noise_seed=1)
    problem = task.problem(task.build_model(0), [])
    assert problem.flipped_labels.sum() == 10
    clean = DigitsMLPNoisy(n_train=100, n_queries=10, noise=0.0)
    y_clean, y_noisy = clean.train_set.tensors[1], task.train_set.tensors[1]
    assert torch.equal(y_clean != y_noisy, problem.flipped_labels)


def test_noisy_run_reports_mislabel_metrics(make_cfg):
    record = run(make_cfg("digits_mlp_noisy", "estimator=tracin", "estimator.checkpoints=all",
                          "task.epochs=15", "task.checkpoints={every_n_epochs: 5}"))
    assert 0.0 <= record["mislabel_auc"] <= 1.0
    assert np.isfinite(record["lds"])
    # 12 flipped of 120: a trained model's self-influence finds them far above chance
    # (measured: AUC 0.97, recall@20pct 0.92; chance is 0.5 and 0.2).
    assert record["mislabel_auc"] > 0.8
    assert record["mislabel_recall@20pct"] > 0.5


def test_trak_run_with_ensemble(make_cfg):
    record = run(make_cfg("digits_mlp", "estimator=trak", "estimator.n_models=2",
                          "estimator.projection_dim=128"))
    assert np.isfinite(record["lds"])


def test_index_key_follows_projection_code_version(tiny_mlp, tmp_path, monkeypatch):
    import estimators.projection as projection

    problem, _ = tiny_mlp
    kwargs = dict(projection_dim=64, index_dir=str(tmp_path), chunk_size=32)
    GradDot(**kwargs).score(problem)
    monkeypatch.setattr(projection, "VERSION", projection.VERSION + 1)
    GradDot(**kwargs).score(problem)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # a stale index is never reused
