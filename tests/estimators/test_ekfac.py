"""K-FAC / EK-FAC against the exact solver, on problems where the Kronecker factorisation is
exact, plus layer-wise scores, a tiny transformers LM, the factor cache and the options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import estimators.kfac_factors as kfac_factors
from bench.cli import run
from estimators.ekfac import EKFAC, KFAC
from estimators.explicit import Explicit
from estimators.grad_dot import GradDot
from estimators.problem import IGNORE, AttributionProblem, cross_entropy_sum, sample_categorical

D_IN, D_OUT, DAMPING, L2 = 4, 3, 1e-3, 1e-2


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()


def regression_problem(n_inputs: int = 30, seed: int = 0, d_in: int = D_IN,
                       d_out: int = D_OUT) -> AttributionProblem:
    """Linear regression ``y = W x + b`` with the summed squared loss ½‖y − t‖², float64.

    The GGN is (1/N) Σ ā āᵀ ⊗ I. Each input appears ``d_out`` times, with residuals
    y − t = √d_out eₖ (k = 1..d_out), so the empirical Fisher equals the GGN exactly and is
    exactly Kronecker-factored: K-FAC and EK-FAC must match ``explicit`` to float precision.
    The true Fisher samples t ~ N(y, I), whose covariance is the GGN in expectation.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Linear(d_in, d_out).double()
    x = torch.randn(n_inputs, d_in, generator=gen, dtype=torch.float64) * 2 + 0.5
    x = x.repeat_interleave(d_out, dim=0)
    residuals = math.sqrt(d_out) * torch.eye(d_out, dtype=torch.float64).repeat(n_inputs, 1)
    with torch.no_grad():
        targets = model(x) - residuals
    xq = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
    yq = torch.randn(5, d_out, generator=gen, dtype=torch.float64)

    def loss(out, batch):
        return 0.5 * (out - batch[1]).pow(2).sum(-1)

    def sample(out, batch, generator):
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return batch[0], out.detach() + noise

    return AttributionProblem(
        model=model, train=TensorDataset(x, targets), queries=TensorDataset(xq, yq),
        collate_fn=None, outputs=lambda m, b: m(b[0]), loss=loss,
        measure=lambda out, b: -loss(out, b), sample_targets=sample, l2=L2,
    )


@pytest.fixture(scope="module")
def regression():
    problem = regression_problem()
    return problem, Explicit(damping=DAMPING).score(problem)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_empirical_fisher_matches_explicit_exactly(regression, cls):
    problem, exact = regression
    scores = cls(fisher="empirical", damping=DAMPING).score(problem)
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_true_fisher_matches_explicit_within_sampling(cls):
    problem = regression_problem(n_inputs=400)
    exact = Explicit(damping=DAMPING).score(problem)
    scores = cls(fisher="true", damping=DAMPING, seed=0).score(problem)
    assert pearson(scores, exact) > 0.99
    assert (scores - exact).norm() / exact.norm() < 0.1


def test_layer_scores_sum_to_total(tiny_mlp):
    problem, _ = tiny_mlp
    estimator = EKFAC(per_layer=True)
    total = estimator.score(problem)
    assert estimator.layer_scores.shape == (2, problem.n_queries, problem.n_train)
    torch.testing.assert_close(estimator.layer_scores.sum(0), total)
    assert all(layer.abs().sum() > 0 for layer in estimator.layer_scores)
    torch.testing.assert_close(EKFAC().score(problem), total, rtol=1e-5, atol=1e-6)


def tiny_lm_problem() -> AttributionProblem:
    """A 2-layer GPT-2 (n_embd 32, vocab 50; Conv1D layers) on random token sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (12, 8), generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full((12, 1), IGNORE)], dim=1)
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def sample(logits, batch, generator):
        return {**batch, "labels": sample_categorical(logits, batch["labels"], generator)}

    return AttributionProblem(
        model=model, train=data[:10], queries=data[10:], collate_fn=collate,
        outputs=lambda m, b: m(input_ids=b["input_ids"]).logits,
        loss=lambda out, b: cross_entropy_sum(out, b["labels"]),
        measure=lambda out, b: -cross_entropy_sum(out, b["labels"]),
        sample_targets=sample, l2=0.0,
    )


def test_ekfac_on_tiny_causal_lm_mlp_only():
    problem = tiny_lm_problem()
    estimator = EKFAC(modules="mlp_only", batch_size=4, chunk_size=4, per_layer=True)
    scores = estimator.score(problem)
    assert scores.shape == (2, 10) and torch.isfinite(scores).all()
    expected = [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    assert sorted(estimator.factors) == expected
    assert estimator.layer_scores.shape[0] == 4
    for name, f in estimator.factors.items():
        d_out, d_in = (128, 33) if name.endswith("c_fc") else (32, 129)  # + homogeneous 1
        assert f["q_a"].shape == (d_in, d_in) and f["lam"].shape == (d_out, d_in)
    everything = EKFAC(batch_size=4, chunk_size=4)
    everything.score(problem)
    assert "transformer.h.0.attn.c_attn" in everything.factors and "lm_head" in everything.factors


def test_token_normalisation_on_tiny_lm():
    """Fisher traces: EK-FAC's Λ sums to (1/N) Σₙ ‖Gₙ‖² exactly; K-FAC's tr(A) tr(S) agrees
    up to cross-token terms (a per-token instead of per-example S would be off by T = 8)."""
    from estimators.gradients import squared_norm

    problem = tiny_lm_problem()
    kfac, ekfac_ = KFAC(fisher="empirical", batch_size=4), EKFAC(fisher="empirical", batch_size=4)
    kfac.fit(problem)
    ekfac_.fit(problem)
    grads = ekfac_.engine(problem).all_gradients(problem, "train", 4)
    total = sum(f["lam"].double().sum() for f in ekfac_.factors.values())
    torch.testing.assert_close(total, squared_norm(grads).double().mean(), rtol=1e-5, atol=0)
    for name, f in ekfac_.factors.items():
        assert 0.7 < (kfac.factors[name]["lam"].sum() / f["lam"].sum()).item() < 1.4, name


def test_factor_cache_reuse(tiny_mlp, tmp_path, monkeypatch):
    problem, _ = tiny_mlp
    problem.key = "tiny-mlp-for-factor-cache"
    try:
        first = EKFAC(cache_dir=str(tmp_path))
        scores = first.score(problem)
        assert not first.loaded_from_cache
        assert len(list((tmp_path / "factors").glob("*.pt"))) == 2  # eigenbasis + eigenvalues

        def refit(*args, **kwargs):
            raise AssertionError("factors were refitted instead of loaded from the cache")

        monkeypatch.setattr(kfac_factors, "covariance_pass", refit)
        monkeypatch.setattr(kfac_factors, "eigenvalue_pass", refit)
        second = EKFAC(cache_dir=str(tmp_path))
        second.fit(problem)
        assert second.loaded_from_cache
        torch.testing.assert_close(second.score(problem), scores)
        KFAC(cache_dir=str(tmp_path)).fit(problem)  # K-FAC reuses EK-FAC's first pass
        with pytest.raises(AssertionError, match="refitted"):
            EKFAC(cache_dir=str(tmp_path), fisher="empirical").fit(problem)
    finally:
        problem.key = ""


def test_fisher_options(tiny_mlp):
    problem, _ = tiny_mlp
    true = EKFAC(fisher="true", seed=0).score(problem)
    torch.testing.assert_close(EKFAC(fisher=True, seed=0).score(problem), true)
    other_seed = EKFAC(fisher="true", seed=1).score(problem)
    empirical = EKFAC(fisher="empirical").score(problem)
    assert not torch.allclose(true, other_seed) and not torch.allclose(true, empirical)
    assert pearson(true, empirical) > 0.5
    with pytest.raises(ValueError, match="fisher must be"):
        EKFAC(fisher="sampled")
    problem_no_sampler = AttributionProblem(**{**vars(problem), "sample_targets": None})
    with pytest.raises(ValueError, match=r'use EKFAC\(fisher="empirical"\)'):
        EKFAC(fisher="true").fit(problem_no_sampler)


def test_heuristic_damping(tiny_mlp):
    problem, _ = tiny_mlp
    heuristic = EKFAC(damping=None)
    scores = heuristic.score(problem)
    for name, f in heuristic.factors.items():
        assert heuristic.dampings[name] == pytest.approx(0.1 * f["lam"].mean().item())
    name = next(iter(heuristic.factors))
    fixed = EKFAC(damping=heuristic.dampings[name], per_layer=True)
    fixed.score(problem)
    heuristic_layers = EKFAC(damping=None, per_layer=True)
    heuristic_layers.score(problem)
    torch.testing.assert_close(fixed.layer_scores[0], heuristic_layers.layer_scores[0])
    assert not torch.allclose(EKFAC(damping=1e-8).score(problem), scores)


def test_query_rank(tiny_mlp):
    problem, _ = tiny_mlp
    full = EKFAC().score(problem)
    torch.testing.assert_close(EKFAC(query_rank=1000).score(problem), full)
    low = EKFAC(query_rank=1)
    engine = low.engine(problem)
    grads = engine.all_gradients(problem, "queries", 8)
    pre = low.precondition(problem, engine, grads)
    assert all(torch.linalg.matrix_rank(p).max() == 1 for p in pre.values())
    assert pearson(low.score(problem), full) > 0.5


def test_correlates_with_explicit_on_digits_logreg():
    from tasks.digits_logreg import DigitsLogReg

    task = DigitsLogReg(n_train=200, n_queries=10)
    model = task.build_model(0)
    problem = task.problem(model, task.fit(model, seed=0))
    exact = Explicit(damping=DAMPING).score(problem)
    # Softmax curvature is not Kronecker-exact: at this size and damping EK-FAC reaches
    # 0.82-0.86 over Fisher seeds (0.88 at the full size), grad_dot 0.49.
    ekfac_r = pearson(EKFAC(damping=DAMPING).score(problem), exact)
    assert ekfac_r > 0.75
    assert ekfac_r > pearson(GradDot().score(problem), exact) + 0.2


def test_default_cli_run_caches_factors(make_cfg, tmp_path):
    record = run(make_cfg("digits_mlp"))
    assert record["estimator"] == "ekfac" and math.isfinite(record["lds"])
    assert len(list((tmp_path / "cache" / "factors").glob("*.pt"))) == 2


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_kept_factors_give_the_same_bits_as_recomputed(fisher, monkeypatch):
    """The eigenvalue pass reuses the covariance pass's captured factors where the budget
    allows; where it does not (or only for a prefix of blocks) it recomputes them, with the
    same sampled targets, to the same bits."""
    problem = tiny_lm_problem()
    calls = []
    original = kfac_factors.GradientEngine.capture

    def counting(self, fn, batch):
        calls.append(1)
        return original(self, fn, batch)

    monkeypatch.setattr(kfac_factors.GradientEngine, "capture", counting)
    lams = {}
    for limit in (float("inf"), 0.0, 3e5):  # all kept, none kept, a prefix kept
        estimator = EKFAC(fisher=fisher, batch_size=2)
        estimator.plan_fit(problem)
        estimator.keep_bytes = limit
        calls.clear()
        estimator.fit(problem)
        lams[limit] = ({n: f["lam"] for n, f in estimator.factors.items()}, len(calls))
    blocks = 5  # 10 examples in blocks of 2
    assert lams[float("inf")][1] == blocks and lams[0.0][1] == 2 * blocks
    assert blocks < lams[3e5][1] < 2 * blocks
    for limit in (0.0, 3e5):
        for name, lam in lams[float("inf")][0].items():
            assert torch.equal(lam, lams[limit][0][name])


def test_fresh_refit_targets_draw_new_targets_and_recompute():
    """``refit_targets: fresh`` re-fits Λ on new draws (a second forward/backward pass), so
    Λ differs from ``shared``'s under the true Fisher and equals it under the empirical."""
    problem = tiny_lm_problem()
    lam = {}
    for fisher in ("true", "empirical"):
        for refit in ("shared", "fresh"):
            estimator = EKFAC(fisher=fisher, refit_targets=refit, batch_size=4)
            estimator.fit(problem)
            lam[fisher, refit] = {n: f["lam"] for n, f in estimator.factors.items()}
    name = next(iter(lam["true", "shared"]))
    assert not torch.equal(lam["true", "shared"][name], lam["true", "fresh"][name])
    assert torch.equal(lam["empirical", "shared"][name], lam["empirical", "fresh"][name])
    with pytest.raises(ValueError, match="refit_targets"):
        EKFAC(refit_targets="both")


def test_fit_plan_holds_the_eigenbasis_beside_the_covariance_sums():
    """The eigenbasis is built while the covariance sums still exist: the fit's plan leaves
    room for both at once before it keeps captured factors for the eigenvalue pass. A wide
    input (A: 401², 16-byte sums) makes the two each a few MB; counting only the larger of
    them overshot a Llama-shaped fit's budget by its eigenbasis (1.9 GB)."""
    from estimators.memory import Budget, parameter_bytes

    problem = regression_problem(n_inputs=8, d_in=400, d_out=1)
    estimator = EKFAC(batch_size=2)
    engine = estimator.engine(problem)
    budget = Budget(total_mb=64)
    estimator.plan_fit(problem, budget)
    held = (parameter_bytes(problem.model) + kfac_factors.accumulator_bytes(engine, "covariance")
            + estimator.state_bytes(engine) + kfac_factors.finish_bytes(engine))
    assert 0 < estimator.keep_bytes <= budget.total - held
